"""OpenSense status benchmark: does /status.json answer in < 50 ms p99 while the
ingest benchmark's load runs? (issue 7, "Done when")

What it does, in one run against one database:

1. starts `opensense serve` as a separate process (as the ingest benchmark runs it:
   ingest rate limit raised, jobs off) and makes the ingest benchmark's devices
   (32 temperature channels each), warmed up;
2. baseline: a prober process reads `/status.json` at a fixed rate (open loop:
   latency counted from the scheduled send time) with the server otherwise idle;
3. under load: the ingest benchmark's closed loop (32 readings per request, client
   concurrency 16, the same code: `_lib/http_load.py` `closed_loop`) runs in this
   process while the prober, a separate process with its own event loop (so the load
   client's busy loop does not inflate its figures), reads `/status.json`, `/status`
   and `/metrics` at the same fixed rate;
4. prints p50/p99/max of each, the ingest rate achieved meanwhile (so the load was
   real), the ratio of loaded to idle p99, and the target with PASS/MISS. A miss is
   reported, never fatal (exit status 0 unless the run broke).

The server refreshes its status snapshot every OPENSENSE_STATUS_INTERVAL_S (10 s;
the bench leaves it at the default): the reads measure the answer from memory, the
refresh queries run in the background meanwhile. All processes share the machine's
cores; the CPU line of the loaded phase says who used them.

    tools/bench/status              # 20 s per phase, about 1 minute
    tools/bench/status --quick      # 2 s per phase (a smoke run)
    tools/bench/status --dsn postgresql://user@host/scratch
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from typing import Any

import aiohttp
import psutil

from _lib import pg, runner
from _lib.cpu import CpuMeter
from _lib.fleet import bcrypt_rounds, ingest_devices
from _lib.http_load import closed_loop, warm_up
from _lib.procs import Serve, free_port, watched
from _lib.report import percentile, ratio, say, verdict

TARGET_P99_MS = 50.0
PATHS = ("/status.json", "/status", "/metrics")


# --- the prober (a child process) ------------------------------------------------------


def url(base: str, path: str) -> str:
    return path if path.startswith("http") else base + path


async def probe(base: str, paths: list[str], rate: float, duration: float) -> dict[str, Any]:
    """Open loop: request i to paths[i % len] leaves at start + i / rate. A path may be
    a whole URL (another server process)."""
    lat: dict[str, list[float]] = {p: [] for p in paths}
    bad: dict[str, int] = {p: 0 for p in paths}
    n = max(1, round(rate * duration))
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as http:

        async def one(path: str, due: float) -> None:
            try:
                async with http.get(url(base, path)) as r:
                    await r.read()
                    ok = r.status == 200
            except (aiohttp.ClientError, TimeoutError):
                ok = False
            if ok:
                lat[path].append(time.perf_counter() - due)
            else:
                bad[path] += 1

        # one connection warmed per path before the clock starts
        for p in paths:
            async with http.get(url(base, p)) as r:
                await r.read()
        start = time.perf_counter() + 0.05
        tasks = []
        for i in range(n):
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(paths[i % len(paths)], due)))
        await asyncio.gather(*tasks)
    return {"lat": lat, "bad": bad}


def run_prober(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--probe", required=True)
    ap.add_argument("--paths", required=True)
    ap.add_argument("--rate", type=float, required=True)
    ap.add_argument("--duration", type=float, required=True)
    a = ap.parse_args(argv)
    out = asyncio.run(probe(a.probe, a.paths.split(","), a.rate, a.duration))
    print(json.dumps(out))
    return 0


def start_prober(
    base: str, paths: tuple[str, ...], rate: float, duration: float
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--probe",
            base,
            "--paths",
            ",".join(paths),
            "--rate",
            str(rate),
            "--duration",
            str(duration),
        ],
        stdout=subprocess.PIPE,
    )


def finish_prober(p: subprocess.Popen[bytes]) -> dict[str, Any]:
    out, _ = p.communicate(timeout=300)
    if p.returncode != 0:
        raise RuntimeError(f"the prober exited with {p.returncode}")
    doc: dict[str, Any] = json.loads(out)
    return doc


def line(name: str, lat: list[float], bad: int) -> str:
    ms = [x * 1000 for x in lat]
    return (
        f"  {name:<14} {len(ms):>6}  p50 {percentile(ms, 50):7.2f} ms  p99 {percentile(ms, 99):7.2f} ms"
        f"  max {max(ms, default=float('nan')):7.2f} ms  non-200/errors {bad}"
    )


# --- the run ----------------------------------------------------------------------------


async def run(frame: runner.Frame, duration: float, rate: float, devices: int, rounds: int) -> None:
    dsn = frame.dsn
    now = datetime.now(UTC)
    # the servers connect as the app role (they refuse a superuser): db/roles.py
    app_dsn = await asyncio.to_thread(pg.serving_dsn, dsn)
    mqtt_port = free_port()  # the embedded broker's: not the default 8883, which a
    # demo or another run on this machine may hold
    env = {
        "OPENSENSE_INGEST_RATE_PER_MIN": "1000000000",  # as tools/bench/ingest
        "OPENSENSE_MQTT_PORT": str(mqtt_port),
    }
    server = Serve(app_dsn, frame.work / "server.log", env, mqtt_port=mqtt_port).start()
    status_proc = Serve(
        app_dsn, frame.work / "status.log", {**env, "OPENSENSE_ROLE": "status"}
    ).start()
    with watched(server, status_proc):  # stopping flushes the request log
        _, devs = await ingest_devices(dsn, rounds, devices, now)
        await server.wait_ready()
        await status_proc.wait_ready()
        w = await warm_up(server.base, devs)
        if w.bad:
            raise RuntimeError(f"warm-up failed: {w.sample}")
        say(
            f"setup: server {server.base} (OPENSENSE_ROLE=all), status-only process"
            f" {status_proc.base} (OPENSENSE_ROLE=status), {devices} devices warmed up"
            f" ({w.problems()})"
        )

        say()
        say(f"[1] idle: /status.json at {rate:g}/s for {duration:g} s, nothing else running")
        idle = finish_prober(start_prober(server.base, ("/status.json",), rate, duration))
        say(line("/status.json", idle["lat"]["/status.json"], idle["bad"]["/status.json"]))
        sj = status_proc.base + "/status.json"

        say()
        say(
            f"[2] under ingest load: tools/bench/ingest closed loop, 32 readings per request,"
            f" concurrency 16, {duration:g} s; meanwhile {', '.join(PATHS)} in turn at {rate:g}/s"
        )
        meter = CpuMeter({"server": server.pid, "PostgreSQL": frame.pg_pid}, "load client")
        prober = start_prober(server.base, (*PATHS, sj), rate * 4 / 3, duration)
        await asyncio.sleep(0.3)  # the prober's clock starts after its warm-up reads
        load = await closed_loop(server.base, devs, 32, 16, duration, meter)
        loaded = await asyncio.to_thread(finish_prober, prober)
        say(
            f"  ingest meanwhile: {load.req_s:,.0f} requests/s, {load.readings_s:,.0f} readings/s,"
            f" p99 {load.ms(99):.1f} ms; {load.problems()}"
        )
        if load.cpu:
            say(f"  {load.cpu.line()}")
        say("  answered by the ingest server itself (one process, OPENSENSE_ROLE=all):")
        for p in PATHS:
            say(line(p, loaded["lat"][p], loaded["bad"][p]))
        say("  answered by the status-only process (OPENSENSE_ROLE=status):")
        say(line("/status.json", loaded["lat"][sj], loaded["bad"][sj]))

    # the server's own time per answer (the error middleware's duration, request_log):
    # what the client sees beyond it is queueing for a CPU on a shared machine
    async with await pg.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT path, count(*), percentile_cont(0.5) WITHIN GROUP (ORDER BY duration_ms),"
            " percentile_cont(0.99) WITHIN GROUP (ORDER BY duration_ms), max(duration_ms)"
            " FROM request_log WHERE path = ANY(%s) AND ts >= %s GROUP BY path ORDER BY path",
            (list(PATHS), now),
        )
        server_side = await cur.fetchall()
    say()
    say("[3] the server's own time per answer, both phases (request_log.duration_ms)")
    for path, n, p50, p99, mx in server_side:
        say(f"  {path:<14} {n:>6}  p50 {p50:7.2f} ms  p99 {p99:7.2f} ms  max {mx:7.2f} ms")

    idle99 = percentile([x * 1000 for x in idle["lat"]["/status.json"]], 99)
    load99 = percentile([x * 1000 for x in loaded["lat"]["/status.json"]], 99)
    own99 = percentile([x * 1000 for x in loaded["lat"][sj]], 99)
    say()
    say("=" * 78)
    say("SUMMARY")
    say(
        f"  /status.json p99: idle {idle99:.2f} ms; under ingest load {load99:.2f} ms from the"
        f" ingest server (×{ratio(load99, idle99):.1f} idle), {own99:.2f} ms from a status-only"
        f" process (×{ratio(own99, idle99):.1f} idle)"
    )
    ok_own = own99 < TARGET_P99_MS and not loaded["bad"][sj]
    ok_one = load99 < TARGET_P99_MS and not loaded["bad"]["/status.json"]
    say(
        f"  target: /status.json p99 < {TARGET_P99_MS:g} ms while the ingest benchmark runs:"
        f" status-only process {own99:.2f} ms {verdict(ok_own)};"
        f" the ingest server itself {load99:.2f} ms {verdict(ok_one)}"
    )
    if load.cpu and frame.pg_pid:
        rest = load.cpu.rest / max(load.cpu.wall, 1e-9)
        if rest > 0.5:
            say(
                f"  NOTE: other work on this machine used {rest:.2f} cores during the loaded"
                " phase; the latencies above include waiting for a CPU behind it"
            )
    if load.accepted == 0:
        say("  WARNING: the ingest load stored nothing; the figures above are not under load")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--probe":
        return run_prober(argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--dsn", help="PostgreSQL DSN of a scratch database (default: embedded)")
    ap.add_argument("--duration", type=float, help="seconds per phase (default 20, --quick 2)")
    ap.add_argument("--rate", type=float, default=50.0, help="status reads per second (default 50)")
    ap.add_argument("--quick", action="store_true", help="smoke run")
    args = ap.parse_args(argv)
    duration = args.duration or (2.0 if args.quick else 20.0)
    devices = 8 if args.quick else 64

    async def body(frame: runner.Frame) -> None:
        say(
            f"OpenSense status benchmark{' (--quick)' if args.quick else ''},"
            f" {datetime.now(UTC):%Y-%m-%d %H:%M:%S}Z; {psutil.cpu_count()} cores shared by"
            f" PostgreSQL, one server process, the load client and the prober;"
            f" load average {os.getloadavg()[0]:.2f}"
        )
        say(f"  database: {pg.describe(frame.dsn, frame.embedded)}")
        await run(frame, duration, args.rate, devices, bcrypt_rounds(args.quick))

    return runner.run("status", args.dsn, body)


if __name__ == "__main__":
    sys.exit(main())
