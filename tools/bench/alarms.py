"""OpenSense alarm latency benchmark: commit of the reading that opens an alarm →
the notifier handing the message to HTTP (a signed webhook) and to SMTP.

Setup: one account with N live channels (default 10 000: 1 000 devices × 10
probes) on the default HACCP rule, plus P probe channels (range ≤ 5 °C, grace
1 min), a webhook recipient (a local aiohttp receiver in this process) and an email
recipient (a local aiosmtpd server in this process). The server runs as a separate
`opensense serve` process with its alarm loops on (one evaluator, one sender).

Load: every live channel gets one in-range reading a minute (N/60 readings/s,
committed in one batch a second, the way the group-commit writer batches ingest),
through the server's own write statement (`storage.batcher.BATCH_SQL`), so each
batch wakes the evaluator exactly as ingest does.

Probe: every `--every` seconds one fresh probe channel gets two out-of-range
readings in one commit, 2 min apart (ts = now − 2 min and now): the grace has
already elapsed, so this commit opens the alarm. The time from the commit's return
to the webhook's arrival (and to the SMTP server's DATA) is the figure; p50/p99
are printed with the target (p99 < 1 s) and, as a baseline measured in the same
run, the bare PostgreSQL NOTIFY round trip (commit → a LISTENing connection).

    tools/bench/alarms            # 10 000 channels, 120 probes (~3 min on 2 cores)
    tools/bench/alarms --quick    # 300 channels, 6 probes 0.3 s apart (a smoke run)
    tools/bench/alarms --dsn postgresql://postgres@127.0.0.1:5432/test   # a server to make a scratch db on
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import psutil
import psycopg
from aiohttp import web
from aiosmtpd.controller import Controller
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from _lib import pg, runner
from _lib.cpu import process_cpu as _cpu
from _lib.procs import Serve, free_port
from _lib.report import percentile, ratio, say, verdict
from opensense.alarms import evaluator
from opensense.db import arrays
from opensense.ids import new_id
from opensense.storage.batcher import BATCH_SQL


def setup(
    dsn: str, live: int, probes: int, hook_url: str, mail: str
) -> tuple[list[int], list[int]]:
    """Account, site, devices and channels by SQL (fast); returns (live, probe) channel nums."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        acc = new_id("acc")
        site = new_id("site")
        conn.execute(
            "INSERT INTO accounts (id, name, email) VALUES (%s, 'Bench', 'b@x.invalid')", (acc,)
        )
        conn.execute(
            "INSERT INTO sites (id, account_id, name, vertical, timezone) VALUES (%s, %s, 'Bench', 'chilled_storage', 'Europe/Berlin')",
            (site, acc),
        )
        per_dev = 10
        devs = (live + probes + per_dev - 1) // per_dev
        dev_ids = [new_id("dev") for _ in range(devs)]
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO devices (id, account_id, site_id, local_id, name) VALUES (%s, %s, %s, %s, %s)",
                [(d, acc, site, f"n{i:05d}", f"node {i}") for i, d in enumerate(dev_ids)],
            )
            rows = []
            for i in range(live + probes):
                rows.append(
                    (new_id("chn"), new_id("snr"), acc, dev_ids[i // per_dev], f"p{i % per_dev}")
                )
            cur.executemany(
                "INSERT INTO channels (id, sensor_id, account_id, device_id, kind, label, unit, name)"
                " VALUES (%s, %s, %s, %s, 'temperature', %s, '°C', 'fridge')",
                rows,
            )
            cur.executemany(
                "INSERT INTO rules (id, channel_id, kind, params, grace_min, is_default)"
                " VALUES (%s, %s, 'range', %s, %s, true)",
                [
                    (
                        new_id("rul"),
                        r[0],
                        Jsonb({"ok_min": -2.0, "ok_max": 5.0}),
                        15 if i < live else 1,
                    )
                    for i, r in enumerate(rows)
                ],
            )
        conn.execute(
            "INSERT INTO notify_targets (id, account_id, path, address, secret) VALUES (%s, %s, 'webhook', %s, 'whsec_bench')",
            (new_id("tgt"), acc, hook_url),
        )
        conn.execute(
            "INSERT INTO notify_targets (id, account_id, path, address, verified, token)"
            " VALUES (%s, %s, 'email', %s, true, 'bench-confirmed-address')",
            (new_id("tgt"), acc, mail),
        )
        ids = [r[0] for r in rows]
        got: dict[str, int] = dict(
            conn.execute("SELECT id, num FROM channels WHERE id = ANY(%s)", (ids,)).fetchall()
        )
        nums = [got[i] for i in ids]
        return nums[:live], nums[live:]


class Done(asyncio.Event):
    expected = 1 << 30


class Sink:
    def __init__(self) -> None:
        self.hook: dict[str, float] = {}  # channel id -> arrival
        self.mail: dict[str, float] = {}
        self.ch_by_num: dict[int, str] = {}

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        t = time.time()
        text = envelope.content.decode(errors="replace")
        for line in text.splitlines():
            if line.startswith("Subject:") and "[ALARM]" in line:
                self.mail.setdefault(str(len(self.mail)), t)
        return "250 OK"


async def write(
    conn: psycopg.AsyncConnection[Any], nums: list[int], ts: list[datetime], vals: list[float]
) -> None:
    """Readings committed through the server's own write statement, as the group-commit
    writer does: each commit wakes the evaluator exactly as ingest does."""
    now = datetime.now(UTC)
    # no channel offered to the writer's calm look-up (storage/batcher.py CALM_CTE):
    # every reading is the engine's, whose latency this measures
    params = {
        "nums": nums,
        "ts": ts,
        "vals": vals,
        "now": now,
        "devices": [],
        "calm": arrays.int4s([]),
    }
    await conn.execute(BATCH_SQL, params)


async def _passes(
    pool: AsyncConnectionPool, backend: int | None, limit: int
) -> tuple[int, int, int, float, float | None, float]:
    """evaluate_dirty until nothing is dirty: (passes, channels, readings, this
    process's CPU s, the backend's CPU s, wall s)."""
    me, be, t0 = _cpu(psutil.Process().pid), _cpu(backend), time.perf_counter()
    passes = channels = readings = 0
    while True:
        st = await evaluator.evaluate_dirty(pool, datetime.now(UTC), limit=limit, budget_s=60)
        if not st.readings:
            break
        passes += 1
        channels += st.channels
        readings += st.readings
    wall = time.perf_counter() - t0
    me1, be1 = _cpu(psutil.Process().pid), _cpu(backend)
    assert me is not None and me1 is not None
    return passes, channels, readings, me1 - me, (be1 - be) if be and be1 else None, wall


async def pass_cost(dsn: str, fresh: list[int], aged: list[int], rounds: int) -> None:
    """The evaluator's cost per channel evaluated (see the module doc)."""
    async with (
        AsyncConnectionPool(dsn, min_size=1, max_size=1, open=False) as pool,
        await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn,
    ):
        async with pool.connection() as c:
            row = await (await c.execute("SELECT pg_backend_pid()")).fetchone()
        backend: int | None = int(row[0]) if row else None
        if _cpu(backend) is None:
            backend = None
        now0 = datetime.now(UTC).replace(second=0, microsecond=0)
        first = now0 - timedelta(minutes=2 * rounds + 1)
        # the aged channels: one judged over 25 h of readings, its state copied to the others
        tmpl = aged[0]
        hist = [first - timedelta(minutes=m) for m in range(25 * 60, 0, -1)]
        for i in range(0, len(hist), 10):  # a pass per 10 minutes: a checkpoint each
            part = hist[i : i + 10]
            vals = [3.0 + (j % 7) * 0.1 for j in range(len(part))]
            await write(conn, [tmpl] * len(part), part, vals)
            while (await evaluator.evaluate_dirty(pool, now0, budget_s=60)).channels:
                pass
        await conn.execute(
            "INSERT INTO alarm_state (channel_num, channel_id) SELECT num, id FROM channels"
            " WHERE num = ANY(%s) ORDER BY num ON CONFLICT DO NOTHING",
            (aged,),
        )
        rid = await (
            await conn.execute(
                "SELECT r.id FROM rules r JOIN channels c ON c.id = r.channel_id WHERE c.num = %s",
                (tmpl,),
            )
        ).fetchone()
        assert rid is not None
        await conn.execute(
            "UPDATE alarm_state s SET rules = replace(t.rules::text, %(rid)s, r.id)::jsonb,"
            " events = t.events, last_ts = t.last_ts, due_at = t.due_at, status = t.status,"
            " cp_first = t.cp_first, cp_last = t.cp_last"
            " FROM alarm_state t, rules r WHERE t.channel_num = %(tmpl)s"
            " AND r.channel_id = s.channel_id AND s.channel_num = ANY(%(nums)s)"
            " AND s.channel_num <> %(tmpl)s",
            {"rid": rid[0], "tmpl": tmpl, "nums": aged},
        )
        await conn.execute(  # its checkpoints, in rows of their own (migration 0030)
            "INSERT INTO alarm_checkpoints (channel_num, at, cp)"
            " SELECT s.channel_num, c.at, replace(c.cp::text, %(rid)s, r.id)::jsonb"
            " FROM alarm_checkpoints c, alarm_state s JOIN rules r ON r.channel_id = s.channel_id"
            " WHERE c.channel_num = %(tmpl)s AND s.channel_num = ANY(%(nums)s)"
            " AND s.channel_num <> %(tmpl)s ORDER BY s.channel_num, c.id",
            {"rid": rid[0], "tmpl": tmpl, "nums": aged},
        )
        size = await (
            await conn.execute(
                "SELECT count(*)::float8 / %(n)s, sum(pg_column_size(cp))::float8 / %(n)s"
                " FROM alarm_checkpoints WHERE channel_num = ANY(%(nums)s)",
                {"n": len(aged), "nums": aged},
            )
        ).fetchone()
        assert size is not None
        for li, limit in enumerate((128, 8)):
            for name, nums in (("fresh", fresh), ("25 h", aged)):
                agg = [0.0] * 6
                be_known = backend is not None
                for k in range(rounds):  # both states get the same reading times
                    ts = first + timedelta(minutes=li * rounds + k)
                    await write(conn, nums, [ts] * len(nums), [4.0] * len(nums))
                    res = await _passes(pool, backend, limit)
                    for i, v in enumerate(res):
                        be_known = be_known and v is not None
                        agg[i] += v or 0.0
                passes, chans = int(agg[0]), max(1, int(agg[1]))
                be_txt = f"{agg[4] / chans * 1e6:,.0f} µs" if be_known else "n/a"
                say(
                    f"evaluator pass, {name} state, {limit} channels a pass: client"
                    f" {agg[3] / chans * 1e6:,.0f} µs + PostgreSQL {be_txt} CPU per channel"
                    f" ({int(agg[1])} channels, {int(agg[2])} readings, {passes} passes,"
                    f" {agg[5] / max(1, passes) * 1000:.1f} ms wall a pass)"
                )
        say(
            f"  (25 h state: {float(size[0] or 0):.0f} checkpoints,"
            f" {float(size[1] or 0) / 1024:.1f} KiB stored per channel)"
        )


async def notify_round_trip(dsn: str, n: int) -> list[float]:
    """The baseline: a bare NOTIFY, commit -> a LISTENing connection, n times."""
    base: list[float] = []
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as lc, \
            await psycopg.AsyncConnection.connect(dsn, autocommit=True) as nc:  # fmt: skip
        await lc.execute("LISTEN bench_rt")
        got = asyncio.Queue[float]()

        async def pump() -> None:
            async for _ in lc.notifies():
                got.put_nowait(time.time())

        pumper = asyncio.create_task(pump())
        await asyncio.sleep(0.1)
        for _ in range(n):
            t = time.time()
            await nc.execute("NOTIFY bench_rt")
            base.append(await asyncio.wait_for(got.get(), 5) - t)
        pumper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pumper
    return base


async def run(frame: runner.Frame, args: argparse.Namespace) -> None:
    live = args.channels or (300 if args.quick else 10000)
    nprobes = args.probes or (6 if args.quick else 120)
    every = args.every or (0.3 if args.quick else 1.0)
    with pg.scratch(frame.dsn, "opensense_bench_alarms") as dsn:
        runner = None
        ctl = None
        server = None
        try:
            sink = Sink()
            arrivals: dict[str, float] = {}
            all_in = Done()

            async def hook(request: web.Request) -> web.Response:
                t = time.time()
                body = json.loads(await request.read())
                if body.get("type") == "alarm_opened":
                    arrivals.setdefault(body["data"]["channel_id"], t)
                    if len(arrivals) >= all_in.expected:
                        all_in.set()
                return web.Response(status=204)

            app = web.Application()
            app.router.add_post("/hook", hook)
            runner = web.AppRunner(app)
            await runner.setup()
            hport = free_port()
            await web.TCPSite(runner, "127.0.0.1", hport).start()
            ctl = Controller(sink, hostname="127.0.0.1", port=free_port())
            ctl.start()
            # the server connects as the app role (it refuses a superuser): db/roles.py
            app_dsn = await asyncio.to_thread(pg.serving_dsn, dsn)

            t0 = time.monotonic()
            live_nums, probe_nums = setup(
                dsn, live, nprobes, f"http://127.0.0.1:{hport}/hook", "bench@x.invalid"
            )
            with psycopg.connect(dsn) as c:
                probe_ids: dict[int, str] = dict(
                    c.execute(
                        "SELECT num, id FROM channels WHERE num = ANY(%s)", (probe_nums,)
                    ).fetchall()
                )
            say(
                f"setup: {live} live channels + {nprobes} probe channels in"
                f" {time.monotonic() - t0:.1f} s"
            )
            k = min(len(live_nums) // 2, 100 if args.quick else 1000)
            await pass_cost(
                dsn, sorted(live_nums[:k]), sorted(live_nums[k : 2 * k]), 1 if args.quick else 3
            )
            env = {
                "OPENSENSE_MQTT": "off",
                "OPENSENSE_SMTP_HOST": "127.0.0.1",
                "OPENSENSE_SMTP_PORT": str(ctl.port),
                "OPENSENSE_SMTP_TLS": "none",
                # the receiver is on 127.0.0.1, which the server refuses to call unless
                # allowed (alarms/egress.py: SSRF)
                "OPENSENSE_WEBHOOK_ALLOW_PRIVATE": "true",
            }
            server = Serve(app_dsn, frame.work / "serve.log", env).start()
            await server.wait_ready()
            base = await notify_round_trip(dsn, 50)
            stop = asyncio.Event()
            written = [0]

            async def background() -> None:
                """N/60 in-range readings a second, one batch a second, as the writer commits."""
                per_s = max(1, live // 60)
                i = 0
                async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
                    while not stop.is_set():
                        started = time.monotonic()
                        now = datetime.now(UTC)
                        nums = [live_nums[(i + k) % live] for k in range(per_s)]
                        i += per_s
                        nums.sort()
                        await write(conn, nums, [now] * len(nums), [4.0] * len(nums))
                        written[0] += len(nums)
                        await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - started)))

            bg = asyncio.create_task(background())
            await asyncio.sleep(1.5 if args.quick else 10)  # the evaluator settles on the live set
            commits: dict[str, float] = {}
            async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
                for num in probe_nums:
                    now = datetime.now(UTC)
                    await write(conn, [num, num], [now - timedelta(minutes=2), now], [9.0, 9.0])
                    commits[probe_ids[num]] = time.time()
                    await asyncio.sleep(every)
            all_in.expected = len(commits)
            if len(arrivals) < len(commits):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(all_in.wait(), 15)
            stop.set()
            await bg

            lat = [arrivals[c] - t for c, t in commits.items() if c in arrivals]
            # where the time went: the evaluator's transaction start (events.created_at) and
            # the sender's attempt (outbound_log.at), both on this machine's clock
            with psycopg.connect(dsn) as c:
                rows = c.execute(
                    "SELECT e.channel_id, extract(epoch FROM e.created_at),"
                    " (SELECT extract(epoch FROM min(l.at)) FROM outbound_log l"
                    "  WHERE l.event_id = e.id AND l.path = 'webhook')"
                    " FROM events e WHERE e.channel_id = ANY(%s)",
                    (list(commits),),
                ).fetchall()
            picked = [float(r[1]) - commits[r[0]] for r in rows]
            sent = [float(r[2]) - commits[r[0]] for r in rows if r[2] is not None]
            mails = len(sink.mail)
            say(
                f"live load: {written[0]} in-range readings committed ({live // 60}/s over {live} channels)"
            )
            say(
                f"probes: {len(commits)} alarms opened by a commit; webhooks received {len(lat)}; alarm emails {mails}"
            )
            say(
                f"baseline NOTIFY round trip: p50 {percentile(base, 50) * 1000:.1f} ms  p99 {percentile(base, 99) * 1000:.1f} ms"
            )
            if lat:
                p50, p99 = percentile(lat, 50), percentile(lat, 99)
                say(
                    f"commit -> webhook handed over: p50 {p50 * 1000:.0f} ms  p99 {p99 * 1000:.0f} ms"
                    f"  max {max(lat) * 1000:.0f} ms  mean {statistics.mean(lat) * 1000:.0f} ms"
                    f"  (p50 = {ratio(p50, percentile(base, 50)):.0f}x the NOTIFY round trip)"
                )
                say(
                    f"  of which commit -> evaluator transaction began: p50 {percentile(picked, 50) * 1000:.0f} ms"
                    f"  p99 {percentile(picked, 99) * 1000:.0f} ms; commit -> sender attempt began:"
                    f" p50 {percentile(sent, 50) * 1000:.0f} ms  p99 {percentile(sent, 99) * 1000:.0f} ms"
                )
                ok = p99 < 1.0 and len(lat) == len(commits)
                say(f"target p99 < 1 s with {live} channels live: {verdict(ok)}")
            else:
                say(f"no webhook arrived: {verdict(False)}\n{server.log_tail()}")
        finally:
            if server is not None:
                server.stop(10)
            if ctl is not None:
                ctl.stop()
            if runner is not None:
                await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dsn", help="PostgreSQL server (admin DSN) to make a scratch database on")
    ap.add_argument("--channels", type=int)
    ap.add_argument("--probes", type=int)
    ap.add_argument("--every", type=float, help="seconds between probes (default 1, --quick 0.3)")
    args = ap.parse_args(argv)
    return runner.run("alarms", args.dsn, lambda frame: run(frame, args))


if __name__ == "__main__":
    sys.exit(main())
