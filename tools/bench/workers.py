"""OpenSense workers benchmark: HTTP ingest readings/s with OPENSENSE_WORKERS=1 and 2
(issue 14 item 4, docs/scaling.md "Several workers on one port").

One database, one set of devices, the same closed-loop HTTP load as tools/bench/ingest
(`POST /v1/ingest`, every reading new, client concurrency 64, 1 and 32 readings per
request). `opensense serve` is started with 1 worker, measured, stopped, started with
2 workers, measured, and the pair is run `--rounds` times back to back (1, 2, 1, 2 …)
so that a change in what else the machine runs shows as a spread, not as a gain. Each
start is warmed up first (one request per device: each worker's token cache). The
CPU line under each phase says who used the cores: with PostgreSQL and the load
client on the same cores, a second worker can only use what they leave.

    tools/bench/workers                  # 2 rounds of 8 s phases (about 2 min)
    tools/bench/workers --quick          # smoke run, seconds
    tools/bench/workers --dsn postgresql://postgres@127.0.0.1:5432/test  # a server to make a scratch db on
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from datetime import UTC, datetime

import aiohttp
import psutil

from _lib import pg, runner
from _lib.cpu import CpuMeter
from _lib.fleet import bcrypt_rounds, ingest_devices
from _lib.http_load import Dev, Stats, closed_loop, warm_up
from _lib.procs import Serve, watched
from _lib.report import say
from opensense.workers import HEADER

RATE = 10_000_000  # per device per minute: measure throughput, not the limiter


async def all_workers_up(srv: Serve, n: int, within: float = 60) -> None:
    """Every worker has answered on the shared port (new connections each time)."""
    seen: set[str] = set()
    deadline = time.monotonic() + within
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
        while len(seen) < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only workers {sorted(seen)} of {n} answered")
            async with http.get(srv.base + "/healthz") as r:
                seen.add(r.headers.get(HEADER, "0").split()[0])
            await asyncio.sleep(0.01)


async def one_start(
    frame: runner.Frame, app_dsn: str, devs: list[Dev], workers: int, duration: float, i: int
) -> list[Stats]:
    env = {
        "OPENSENSE_WORKERS": str(workers),
        "OPENSENSE_INGEST_RATE_PER_MIN": str(RATE),
        "OPENSENSE_MQTT": "off",
        "OPENSENSE_STATE_DIR": str(frame.work / "state"),
        "OPENSENSE_TOKEN_MAC_KEY": "5e" * 32,
    }
    srv = Serve(app_dsn, frame.work / f"serve-{i}-w{workers}.log", env).start()
    out = []
    with watched(srv):
        await srv.wait_ready()
        await all_workers_up(srv, workers)
        w = await warm_up(srv.base, devs)
        if w.bad:
            raise RuntimeError(f"warm-up failed: {w.sample}")
        meter = CpuMeter({"server": srv.pid, "PostgreSQL": frame.pg_pid}, "load client")
        for k in (1, 32):
            s = await closed_loop(srv.base, devs, k, 64, duration, meter)
            say(
                f"  workers={workers}  {k:>2}/request  {s.readings_s:>9,.0f} readings/s"
                f"  {s.req_s:>7,.0f} req/s  p50 {s.ms(50):5.1f} ms  p99 {s.ms(99):6.1f} ms"
                f"  ({s.problems()})"
            )
            if s.cpu:
                say(f"      {s.cpu.line()}")
            if s.bad:
                raise RuntimeError(f"requests failed: {s.sample}")
            out.append(s)
    return out


async def run(frame: runner.Frame, rounds: int, duration: float, devices: int, quick: bool) -> None:
    (frame.work / "state").mkdir()
    os.chmod(frame.work / "state", 0o700)
    with pg.scratch(frame.dsn, "opensense_bench_workers") as dsn:
        app_dsn = await asyncio.to_thread(pg.serving_dsn, dsn)
        _, devs = await ingest_devices(dsn, bcrypt_rounds(quick), devices, datetime.now(UTC))
        say(
            f"{devices} devices, closed loop at concurrency 64, {duration:g} s per phase;"
            f" {psutil.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start"
        )
        by: dict[tuple[int, int], list[float]] = {}
        for r in range(rounds):
            for workers in (1, 2):
                for s in await one_start(frame, app_dsn, devs, workers, duration, r):
                    by.setdefault((workers, s.per_request), []).append(s.readings_s)
        say()
        say("best of each (readings/s), and 2 workers against 1:")
        for k in (1, 32):
            one, two = max(by[(1, k)]), max(by[(2, k)])
            say(
                f"  {k:>2}/request  1 worker {one:>9,.0f}  2 workers {two:>9,.0f}  x{two / one:.2f}"
            )
        say(f"load average at the end {os.getloadavg()[0]:.2f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="1 round of 1 s phases, 8 devices")
    ap.add_argument("--rounds", type=int, help="1-then-2-worker pairs (default 2)")
    ap.add_argument("--duration", type=float, help="seconds per phase (default 8)")
    ap.add_argument("--devices", type=int, help="devices (default 128)")
    ap.add_argument("--dsn", help="PostgreSQL server (admin DSN) to make a scratch database on")
    args = ap.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 2)
    duration = args.duration or (1.0 if args.quick else 8.0)
    devices = args.devices or (8 if args.quick else 128)
    return runner.run(
        "workers", args.dsn, lambda frame: run(frame, rounds, duration, devices, args.quick)
    )


if __name__ == "__main__":
    sys.exit(main())
