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
    tools/bench/gateway --quick        # 5,000 readings (a smoke run)
    tools/bench/gateway --dsn postgresql://user@host/scratch --backlog 200000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp

from _lib import pg, runner
from _lib.fleet import account_site, devices, gateway_token
from _lib.procs import BIN, Serve, launch, rss_kb, stop_popen, watched
from _lib.report import ratio, say, verdict
from opensense_gateway.config import Config as GwConfig
from opensense_gateway.payload import Reading
from opensense_gateway.store import Store

NODES = 50
ROUNDS = 4  # bcrypt cost of the bench's tokens: a checked token is cached


async def make_site(dsn: str) -> tuple[str, list[tuple[str, str]], str]:
    """An account, a site with NODES nodes and a gateway; the nodes' tokens and the
    gateway's."""
    async with await pg.connect(dsn) as conn:
        acc, site = await account_site(conn, "Gateway bench")
        made = await devices(conn, acc, site["id"], [f"node{i:03d}" for i in range(NODES)], ROUNDS)
        gw_token = await gateway_token(conn, acc, site["id"], ROUNDS)
    return acc, [(dev["local_id"], tok) for dev, tok in made], gw_token


async def count(dsn: str, acc: str) -> int:
    async with await pg.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM measurements m JOIN channels c ON c.num = m.channel_num"
            " WHERE c.account_id = %s",
            (acc,),
        )
        row = await cur.fetchone()
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


def gateway_conf(work: Path, name: str, url: str, token: str, extra: str = "") -> Path:
    """A gateway's directory under work/ with its config; returns the directory."""
    d = work / name
    d.mkdir()
    (d / "gateway.conf").write_text(
        f"[gateway]\nstate_dir = {d / 'state'}\n[server]\nurl = {url}\ntoken = {token}\n"
        "[mqtt]\nhost =\n[alarms]\ncheck_interval_s = 1\n" + extra
    )
    return d


def run_gateway(d: Path) -> subprocess.Popen[bytes]:
    cmd = [str(BIN / "opensense-gateway"), "--config", str(d / "gateway.conf")]
    return launch([*cmd, "--log-level", "WARNING"], d / "gateway.log")


async def run(frame: runner.Frame, args: argparse.Namespace) -> None:
    backlog = args.backlog or (5_000 if args.quick else 500_000)
    app_dsn = await asyncio.to_thread(pg.serving_dsn, frame.dsn)
    env = {"OPENSENSE_INGEST_RATE_PER_MIN": "1000000", "OPENSENSE_MQTT": "off"}
    server = Serve(app_dsn, frame.work / "server.log", env).start()
    with watched(server):
        site = await make_site(frame.dsn)  # while the server starts
        await server.wait_ready()
        await measure(frame, args, backlog, server.base, site)


async def measure(
    frame: runner.Frame,
    args: argparse.Namespace,
    backlog: int,
    base: str,
    site: tuple[str, list[tuple[str, str]], str],
) -> None:
    dsn, work = frame.dsn, frame.work
    acc, devs, gw_token = site
    gcfg = GwConfig(
        batch_size=args.batch_size or GwConfig.batch_size,
        max_rate=args.max_rate or GwConfig.max_rate,
    )
    say(
        f"OpenSense gateway benchmark{' (--quick)' if args.quick else ''},"
        f" {datetime.now(UTC):%Y-%m-%d %H:%M:%S}Z"
    )
    say(f"  database: {pg.describe(dsn, frame.embedded)}; one `opensense serve`")
    say(
        f"  machine: {os.cpu_count()} cores shared by PostgreSQL, the server, the gateway"
        " and this driver"
    )
    say(
        f"  gateway defaults: batch_size {gcfg.batch_size}, max_rate {gcfg.max_rate:,.0f}"
        " readings/s"
    )
    say()

    base_n = min(backlog, 50_000)
    base_rate = await baseline(base, devs, base_n)
    say(
        f"baseline  direct POST /v1/ingest, 32/request, 16 clients: {base_rate:,.0f}"
        f" readings/s ({base_n:,} readings)"
    )

    # idle gateway: memory with an empty queue
    d = gateway_conf(work, "idle", base, gw_token)
    p = run_gateway(d)
    await asyncio.sleep(2 if args.quick else 4)
    idle_kb = rss_kb(p.pid)
    stop_popen(p, 10)
    say(f"baseline  idle gateway (empty queue): peak RSS {idle_kb / 1024:.1f} MB")

    extra = "[forward]\n"
    extra += f"batch_size = {args.batch_size}\n" if args.batch_size else ""
    extra += f"max_rate = {args.max_rate}\n" if args.max_rate else ""
    d = gateway_conf(work, "drain", base, gw_token, extra)
    t = time.monotonic()
    queue = d / "state" / "queue.sqlite3"
    await asyncio.to_thread(fill, queue, backlog)
    n = backlog // NODES * NODES
    say(
        f"backlog   {n:,} readings queued in {time.monotonic() - t:.1f} s"
        f" (queue file {queue.stat().st_size / 1e6:.0f} MB)"
    )
    before = await count(dsn, acc)
    p = run_gateway(d)
    t = time.monotonic()
    peak = 0
    while await count(dsn, acc) - before < n:
        if p.poll() is not None:
            raise RuntimeError(f"the gateway exited: {(d / 'gateway.log').read_text()[-2000:]}")
        peak = max(peak, rss_kb(p.pid))
        await asyncio.sleep(0.25)
        if time.monotonic() - t > 1800:
            raise RuntimeError("the drain took over 30 minutes")
    elapsed = time.monotonic() - t
    peak = max(peak, rss_kb(p.pid))
    await asyncio.sleep(1.5)  # the gateway writes its health file
    health = json.loads((d / "state" / "health.json").read_text())
    stop_popen(p)
    rate = n / elapsed
    say(
        f"drain     {n:,} readings in {elapsed:.1f} s: {rate:,.0f} readings/s"
        f" ({ratio(rate, base_rate):.2f}× the direct baseline); queue after:"
        f" {health['queue_depth']}, dead letters {health['dead_letters']}"
    )
    say(
        f"memory    gateway peak RSS while draining {n:,}: {peak / 1024:.1f} MB"
        f" ({peak / max(idle_kb, 1):.2f}× idle)"
    )
    say()
    say("targets (issue 5)")
    say(f"  drain >= 5,000 readings/s to a local server: {rate:,.0f}  {verdict(rate >= 5000)}")
    say(
        f"  gateway memory < 100 MB with {n:,} queued: {peak / 1024:.1f} MB"
        f"  {verdict(peak < 100 * 1024)}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--dsn", help="a scratch PostgreSQL database (default: embedded, temporary)")
    ap.add_argument("--backlog", type=int, help="readings in the gateway's queue")
    ap.add_argument("--quick", action="store_true", help="5,000 readings")
    ap.add_argument("--batch-size", type=int, help="the gateway's [forward] batch_size")
    ap.add_argument("--max-rate", type=float, help="the gateway's [forward] max_rate")
    args = ap.parse_args(argv)
    return runner.run("gateway", args.dsn, lambda frame: run(frame, args))


if __name__ == "__main__":
    sys.exit(main())
