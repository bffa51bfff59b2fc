"""The renderer: claims queued reports (one process among several gets each, FOR
UPDATE SKIP LOCKED), renders them through `build.build` and records the end.

Concurrency is bounded per process: at most OPENSENSE_REPORT_WORKERS reports at once
(the same slots serve GET /v1/reports/{id}/file's renders). The drawing runs in a
worker thread, so the event loop keeps serving. Each progress step extends the claim's
lease (OPENSENSE_REPORT_LEASE_S); a renderer that dies leaves a lease that runs out,
and the report is claimed again, at most OPENSENSE_REPORT_MAX_ATTEMPTS times.

When a report is ready, the `report_ready` webhook is queued in the alarms' outbox
(the same signed, retried delivery as alarm webhooks) in the same transaction, and
a scheduled report's email is planned (schedule.py sends it).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import secrets
import socket
from datetime import datetime, timedelta
from typing import Any

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from .. import aio
from ..alarms import outbox, paths
from ..audit.publish import AuditPlaces
from ..errors import ApiError
from ..settings import Config
from . import build, schedule, seal_store, store, verify

log = logging.getLogger(__name__)
POLL_S = 2.0


def report_ready_message(r: store.Row, site_name: str) -> dict[str, Any]:
    period = f"{r['period_from']} – {r['period_to']}"
    return {
        "kind": "report_ready",
        "subject": f"Report ready: {site_name} {period}",
        "text": f"The {r['template']} report of {site_name} for {period} is ready.",
        "site_id": r["site_id"],
        "data": {
            "report_id": r["id"],
            "site_id": r["site_id"],
            "template": r["template"],
            "period": {"from": r["period_from"].isoformat(), "to": r["period_to"].isoformat()},
            "language": r["language"],
            "sha256": r["sha256"],
            "file": f"/v1/reports/{r['id']}/file",
        },
    }


async def queue_report_ready(conn: AsyncConnection[Any], r: store.Row, now: datetime) -> int:
    """One outbox row per webhook recipient of the report's site (or of the account)."""
    cur = await conn.execute(
        "SELECT t.id, s.name FROM notify_targets t JOIN sites s ON s.id = %s"
        " WHERE t.account_id = %s AND t.deleted_at IS NULL AND t.path = ANY(%s)"
        " AND (t.site_id IS NULL OR t.site_id = %s) ORDER BY t.id",
        (r["site_id"], r["account_id"], paths.machine_paths(), r["site_id"]),
    )
    rows = await cur.fetchall()
    for target_id, site_name in rows:
        await outbox.put(
            conn,
            account_id=r["account_id"],
            target_id=target_id,
            event_id=None,
            kind="report_ready",
            key=f"report_ready:{r['id']}:{target_id}",
            payload=report_ready_message(r, site_name),
            due=now,
        )
    await conn.execute("UPDATE reports SET notified_at = %s WHERE id = %s", (now, r["id"]))
    return len(rows)


def _log_failure(task: asyncio.Task[str]) -> None:
    """A render that raised past its own handling (the database gone while it saved):
    logged here; its lease runs out and the report is claimed again."""
    if not task.cancelled() and task.exception() is not None:
        log.error("a report render ended with an error", exc_info=task.exception())


class Renderer:
    def __init__(self, pool: AsyncConnectionPool, cfg: Config) -> None:
        self.pool, self.cfg = pool, cfg
        self.me = f"{socket.gethostname()[:40]}:{os.getpid()}:{secrets.token_hex(3)}"
        self.slots = asyncio.Semaphore(max(1, cfg.report_workers))
        self.wake = asyncio.Event()
        self.lease = timedelta(seconds=cfg.report_lease_s)

    async def claim(self, only: str | None = None) -> store.Row | None:
        """The next report to render here (`only`: that one, if it is free)."""
        async with self.pool.connection() as conn, conn.transaction():
            return await store.claim(
                conn, self.me, self.cfg.clock(), self.lease, self.cfg.report_max_attempts, only
            )

    async def render(self, r: store.Row) -> str:
        """Render a claimed report to its end; returns its final status (or `lost`)."""
        return (await self.render_pdf(r))[0]

    async def render_pdf(self, r: store.Row) -> tuple[str, bytes | None]:
        """The same, with the PDF when it became ready here."""
        async with self.slots:
            return await self._render(r)

    async def _render(self, r: store.Row) -> tuple[str, bytes | None]:
        async def step(fraction: float, stage: str) -> None:
            async with self.pool.connection() as conn:
                await store.progress(
                    conn, r, self.me, fraction, stage, self.cfg.clock(), self.lease
                )

        try:
            if AuditPlaces.from_config(self.cfg).key_path.exists():
                # sealed (reports/verify.py): a signed checkpoint, the hash in the trail
                await step(0.05, "sealing")
                pdf, _seal = await verify.sealed_render(
                    self.pool, account_id=r["account_id"], site_id=r["site_id"],
                    template=r["template"], period_from=r["period_from"],
                    period_to=r["period_to"], language=r["language"], now=self.cfg.clock(),
                    config=self.cfg, actor=f"report:{r['id']}",
                )  # fmt: skip
            else:  # no audit signing key on this server: a DRAFT, said on every page
                pdf = await build.build(
                    self.pool, r["account_id"], r["site_id"], r["template"],
                    r["period_from"], r["period_to"], r["language"], step,
                )  # fmt: skip
        except verify.SealError as exc:
            return await self._fail(r, str(exc)), None
        except store.ClaimLost:
            log.warning("report %s: the claim ran out and was taken over", r["id"])
            return "lost", None
        except ApiError as exc:  # the site went away between the request and the render
            return await self._fail(r, exc.message), None
        except Exception as exc:
            log.exception("report %s failed", r["id"])
            why = f"rendering failed ({type(exc).__name__}); the server's log has the details"
            return await self._fail(r, why), None
        now = self.cfg.clock()
        async with self.pool.connection() as conn, conn.transaction():
            sha = hashlib.sha256(pdf).hexdigest()
            if not await store.ready(conn, r, self.me, sha, len(pdf), now):
                return "lost", None
            await queue_report_ready(conn, {**r, "sha256": sha}, now)
            await schedule.plan_mail(conn, r, now)  # a scheduled report: its email
        return "ready", pdf

    async def _fail(self, r: store.Row, reason: str) -> str:
        async with self.pool.connection() as conn:
            ok = await store.failed(conn, r, self.me, reason, self.cfg.clock())
        return "failed" if ok else "lost"

    async def file(self, r: store.Row) -> bytes:
        """A ready report's PDF rendered again (in a slot, like any render)."""
        async with self.slots:
            async with self.pool.connection() as conn:
                sealed = await seal_store.by_sha256(conn, r["sha256"]) if r["sha256"] else None
                if sealed is not None:  # under its stored seal: the same bytes
                    return (await verify.render_again(conn, sealed.code))[0]
            return await build.build(
                self.pool, r["account_id"], r["site_id"], r["template"],
                r["period_from"], r["period_to"], r["language"],
            )  # fmt: skip

    async def run_once(self) -> str | None:
        """Claim one report and render it here; None: nothing was queued."""
        r = await self.claim()
        return None if r is None else await self.render(r)

    async def loop(self) -> None:
        """Keep up to `report_workers` renders going; wake on a new report (this
        process's POST) or every POLL_S (another process's)."""
        running: set[asyncio.Task[str]] = set()
        try:
            while True:
                try:
                    while len(running) < self.cfg.report_workers:
                        r = await self.claim()
                        if r is None:
                            break
                        task = asyncio.create_task(self.render(r))
                        running.add(task)
                        task.add_done_callback(running.discard)
                        task.add_done_callback(_log_failure)
                except Exception:
                    log.exception("report claim failed")
                self.wake.clear()
                woken = asyncio.create_task(self.wake.wait())
                await asyncio.wait(
                    {woken, *running}, timeout=POLL_S, return_when=asyncio.FIRST_COMPLETED
                )
                await aio.cancel(woken)
        finally:
            for task in list(running):
                await aio.cancel(task)
