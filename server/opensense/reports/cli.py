"""`opensense report render`: the API's path from the command line.

The report is queued in the reports table like POST /v1/reports (origin `cli`),
then claimed and rendered by this command through the same renderer (lease, progress,
SHA-256, `report_ready`), unless a server's renderer takes it first within `--wait`
seconds. A progress bar shows on a terminal. `--local` renders and seals in-process without a
row (any period, the current month too); `--draft` renders in-process unsealed, DRAFT
on every page (with `--logo`, `--mkt-delta-h`); `--again CODE` renders a sealed
report again under its stored seal (reports/verify.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any, TextIO

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from ..errors import ApiError
from ..settings import Config
from . import build, render, seal_store, store, verify
from .load import month_period
from .runner import Renderer
from .templates import TEMPLATES

POLL_S = 0.2
BAR = 30


class Bar:
    """One line redrawn on a terminal; nothing in a pipe or a log (the end is printed)."""

    def __init__(self, out: TextIO) -> None:
        self.out, self.tty = out, out.isatty()

    def show(self, r: store.Row) -> None:
        if not self.tty:
            return
        p = float(r["progress"])
        fill = round(p * BAR)
        stage = r["stage"] or r["status"]
        self.out.write(f"\r[{'#' * fill}{'-' * (BAR - fill)}] {p * 100:3.0f}% {stage:<12}")
        self.out.flush()

    def end(self) -> None:
        if self.tty:
            self.out.write("\n")


async def _row(pool: AsyncConnectionPool, rid: str) -> store.Row:
    async with pool.connection() as conn:
        return await store.get(conn, None, rid)


async def queue_and_wait(
    cfg: Config,
    dsn: str,
    site: str,
    first: date,
    last: date,
    language: str,
    template: str,
    *,
    actor: str,
    wait_s: float = 0.0,
    out: TextIO | None = None,
) -> tuple[store.Row, bytes]:
    ask = store.Ask(site, template, first, last, language)
    cfg = dataclasses.replace(cfg, report_workers=1)
    async with AsyncConnectionPool(
        dsn, min_size=1, max_size=3, kwargs={"autocommit": True}, open=False
    ) as pool:
        async with pool.connection() as conn:
            cur = await conn.execute("SELECT account_id FROM sites WHERE id = %s", (site,))
            acc = await cur.fetchone()
            if acc is None:
                raise ApiError("site_not_found", f"no site {site[:40]!r}")
            async with conn.transaction():
                row = await store.create(
                    conn, acc[0], ask, cfg.clock(), queue_max=cfg.report_queue_max,
                    actor=actor, origin="cli",
                )  # fmt: skip
        renderer, bar = Renderer(pool, cfg), Bar(sys.stderr if out is None else out)
        task: asyncio.Task[tuple[str, bytes | None]] | None = None
        t0 = time.monotonic()
        while True:
            r = await _row(pool, row["id"])
            bar.show(r)
            if r["status"] in ("ready", "failed") and (task is None or task.done()):
                break
            if task is None and r["status"] == "queued" and time.monotonic() - t0 >= wait_s:
                claimed = await renderer.claim(only=row["id"])
                if claimed is not None:  # no server took it: render it here
                    task = asyncio.create_task(renderer.render_pdf(claimed))
            await asyncio.sleep(POLL_S)
        bar.end()
        if r["status"] == "failed":
            raise ApiError("conflict", f"report {r['id']} failed: {r['error']}")
        pdf = task.result()[1] if task is not None else None
        if pdf is None:  # a server rendered it: the same bytes again, checked
            pdf = await renderer.file(r)
            if hashlib.sha256(pdf).hexdigest() != r["sha256"]:
                raise ApiError("conflict", "the site's data changed since the report was rendered")
        return r, pdf


async def local(
    dsn: str, site: str, first: date, last: date, language: str, template: str, **extra: Any
) -> bytes:
    """Render in this process, no row: any period (the current month too), and the
    options the API does not take (a cover logo, another MKT activation energy)."""
    async with AsyncConnectionPool(
        dsn, min_size=1, max_size=1, kwargs={"autocommit": True}, open=False
    ) as pool:
        return await build.build(pool, None, site, template, first, last, language, **extra)


def period(args: Any) -> tuple[date, date]:
    """--month, or --from and --to (months, both inclusive), checked against the
    template's longest period."""
    if args.month:
        first, last = month_period(args.month)
    elif args.from_month and args.to_month:
        first, last = month_period(args.from_month)[0], month_period(args.to_month)[1]
    else:
        raise ValueError("give --month, or --from and --to (months, YYYY-MM)")
    tpl = TEMPLATES[args.template]
    if not first <= last or (last - first).days + 1 > tpl.max_days:
        raise ValueError(f"{tpl.name} takes a period of 1 to {tpl.max_days} days")
    return first, last


def extras(args: Any) -> dict[str, Any]:
    """--logo and --mkt-delta-h, checked (they need --local: the API has neither)."""
    extra: dict[str, Any] = {}
    if args.mkt_delta_h is not None:
        if args.template == "haccp_annual" or not 10 <= args.mkt_delta_h <= 1000:
            raise ValueError("--mkt-delta-h is 10..1000 kJ/mol, for the monthly templates")
        extra["mkt_delta_h"] = args.mkt_delta_h * 1000
    if args.logo:
        try:
            with open(args.logo, "rb") as fh:  # read one byte past the bound, not the file
                logo = fh.read(render.LOGO_MAX_BYTES + 1)
            render.check_logo(logo)
        except (OSError, ValueError) as exc:
            raise ValueError(f"--logo {args.logo}: {exc}") from exc
        extra["logo"] = logo
    if extra and not args.draft:
        raise ValueError("--logo and --mkt-delta-h render a draft: add --draft")
    return extra


async def _again(dsn: str, code: str) -> tuple[bytes, Any]:
    async with await AsyncConnection.connect(dsn, autocommit=True) as conn:
        return await verify.render_again(conn, code)


async def _sealed(
    cfg: Config, dsn: str, args: Any, first: date, last: date, actor: str
) -> tuple[bytes, Any]:
    async with await AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute("SELECT account_id FROM sites WHERE id = %s", (args.site,))
        row = await cur.fetchone()
        if row is None:
            raise ApiError("site_not_found", f"no site {args.site[:40]!r}")
        return await verify.sealed_render(
            conn, config=cfg, account_id=row[0], site_id=args.site, template=args.template,
            period_from=first, period_to=last, language=args.language, now=cfg.clock(),
            actor=actor,
        )  # fmt: skip


def run(cfg: Config, dsn: str, args: Any, actor: str) -> int:
    if args.again:
        if args.site or args.month or args.draft or args.local:
            print("opensense report: --again takes only --out", file=sys.stderr)
            return 2
        pdf, seal = asyncio.run(_again(dsn, args.again))
        Path(args.out).write_bytes(pdf)
        sha = hashlib.sha256(pdf).hexdigest()
        same = "the same bytes as sealed" if sha == seal.sha256 else "NOT the bytes sealed"
        print(f"{args.out}: {len(pdf)} bytes, sha256 {sha}: {same} (sha256 {seal.sha256})")
        print(f"verify at {seal.link}")
        return 0 if sha == seal.sha256 else 1
    try:
        if not args.site:
            raise ValueError("--site is required")
        first, last = period(args)
        extra = extras(args)
    except ValueError as exc:
        print(f"opensense report: {exc}", file=sys.stderr)
        return 2
    if args.draft:
        pdf = asyncio.run(local(dsn, args.site, first, last, args.language, args.template, **extra))
        Path(args.out).write_bytes(pdf)
        print(
            f"{args.out}: {len(pdf)} bytes, {args.site} {first} – {last} ({args.language}), DRAFT"
        )
        return 0
    if args.local:
        try:
            pdf, seal = asyncio.run(_sealed(cfg, dsn, args, first, last, actor))
        except verify.SealError as exc:
            print(f"opensense report: {exc}", file=sys.stderr)
            return 1
        Path(args.out).write_bytes(pdf)
        print(
            f"{args.out}: {len(pdf)} bytes, {args.site} {first} – {last}"
            f" ({args.language}), sealed, sha256 {seal.sha256}"
        )
        print(f"verify at {seal.link}")
        return 0
    r, pdf = asyncio.run(
        queue_and_wait(
            cfg, dsn, args.site, first, last, args.language, args.template,
            actor=actor, wait_s=args.wait,
        )
    )  # fmt: skip
    Path(args.out).write_bytes(pdf)
    print(
        f"{args.out}: {len(pdf)} bytes, {args.site} {r['period_from']} – {r['period_to']}"
        f" ({args.language}), report {r['id']} sha256 {r['sha256']}"
    )
    sealed = asyncio.run(_seal_of(dsn, r["sha256"]))
    print(f"verify at {sealed.link}" if sealed else "not sealed (no audit signing key): a DRAFT")
    return 0


async def _seal_of(dsn: str, sha: str) -> Any:
    async with await AsyncConnection.connect(dsn, autocommit=True) as conn:
        return await seal_store.by_sha256(conn, sha)
