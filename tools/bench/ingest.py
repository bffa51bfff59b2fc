"""OpenSense ingest benchmark: one run, one database, four figures.

What it measures (in this order in the summary):

1. COPY ceiling: the database's own bulk-load rate, binary COPY of
   (channel_num, ts, value) rows into the real `measurements` table (partitioned,
   primary key (channel_num, ts)), for channel numbers no channel uses (1 000 000 and
   up, deleted again right after). One stream and two parallel streams; the better is
   the ceiling every HTTP figure is compared with.
2. HTTP ingest: `POST /v1/ingest` with the PRODUCT payload, 1 and 32 measurements per
   request, each at client concurrency 16 and 64 (closed loop: every client sends its
   next request when the previous answer arrived). Every reading is new (a unique
   channel and timestamp), so the server stores all of them; the answers' `accepted`
   counts are checked and every non-200 is reported. Readings/s divided by the COPY
   ceiling is the share of the database's raw insert capacity that survives HTTP,
   JSON, authentication, the rate-limit counter, channel lookup and the rollups.
3. Latency at half the peak: an open-loop run (a fixed request schedule that does not
   wait for answers) at 50 % of the best 32-per-request readings/s. Latency is counted
   from the scheduled send time, so a stall on either side is not hidden.
4. Bytes per stored reading: three whole closed days of realistic readings (1-minute
   cadence, DS18B20 1/16 °C steps from a simulated fridge or freezer) written through
   the server's own writer (`opensense.storage.write.insert_readings`, rollups
   included) into a month partition nothing else in the bench touches, measured
   fresh, then packed by `opensense.storage.compaction.compact` and VACUUMed and
   measured again. Raw rows (table, indexes) are reported apart from the rollups.

The phases run in the order 2, 3, 1, 4: the HTTP phases first, on a table the COPY
rows (deleted again afterwards) never touched; the ratio to the COPY ceiling is
filled in by the summary.

How to read it: the closing "targets" block puts the issue's targets next to the
measured figures with PASS/MISS; a miss never makes the bench fail (exit status 0
unless something broke). The HTTP figures are only as good as the machine: the
server (one process), PostgreSQL and this load client share its cores, and a CPU
line under each phase shows who used them (a busy "rest of machine" means other
work was running and the figures are low). The bench raises the per-device ingest
rate limit (OPENSENSE_INGEST_RATE_PER_MIN, 60/min in the product) so it measures
throughput rather than the limiter.

Without --dsn the bench starts an embedded PostgreSQL in a temporary directory and
removes it afterwards. With --dsn it migrates that database and leaves its bench
account, devices and readings there (the COPY rows are deleted), and compaction packs
every closed day in it: use a scratch database.

    tools/bench/ingest              # full run, about 1.5 minutes on 2 cores
    tools/bench/ingest --quick      # smoke run with tiny sizes, tokens at bcrypt cost 4
    tools/bench/ingest --dsn postgresql://user@host/scratch --duration 10
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import math
import os
import random
import struct
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import psutil
import psycopg

from _lib import pg, runner
from _lib.cpu import CpuMeter, CpuUse
from _lib.fleet import bcrypt_rounds, ingest_devices
from _lib.http_load import Stats, closed_loop, paced, warm_up
from _lib.pg import checkpoint, connect
from _lib.procs import Serve, watched
from _lib.report import banner, fmt, percentile, say, verdict
from opensense import db
from opensense.demo import simulated
from opensense.settings import Config
from opensense.storage import compaction
from opensense.storage.write import insert_readings

BENCH_RATE_PER_MIN = 1_000_000_000  # the product default is 60 per device and minute
COPY_BASE = 1_000_000  # COPY rows use channel numbers from here up
COPY_CHUNK = 1 << 20
PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
TARGET_RATIO = 0.25  # readings/s with 32 per request, as a share of the COPY ceiling
TARGET_P99_MS = 50.0  # at half the peak rate
TARGET_BYTES = 12.0  # per reading after compaction


@dataclass(frozen=True)
class Plan:
    devices: int
    duration: float  # seconds per measured HTTP phase
    copy_rows: int
    copy_channels: int
    storage_days: int
    storage_channels: int
    per_request: tuple[int, ...] = (1, 32)
    concurrency: tuple[int, ...] = (16, 64)


FULL = Plan(
    devices=64,
    duration=8.0,
    copy_rows=1_000_000,
    copy_channels=2000,
    storage_days=3,
    storage_channels=64,
)
QUICK = Plan(
    devices=8,
    duration=1.0,
    copy_rows=20_000,
    copy_channels=100,
    storage_days=1,
    storage_channels=2,
)


def day_start(d: date) -> datetime:
    return datetime(d.year, d.month, d.day, tzinfo=UTC)


# --- 1. COPY ceiling ---------------------------------------------------------------------


def copy_buffer(rows: int, first_num: int, channels: int, lo: datetime, hi: datetime) -> bytes:
    """Binary COPY data: `channels` channels, timestamps rising through [lo, hi], rows
    in time order (all channels at one instant, then the next), as ingest sees them."""
    ticks = max(1, math.ceil(rows / channels))
    lo_us = int((lo - PG_EPOCH).total_seconds()) * 1_000_000
    step = max(1, int((hi - lo).total_seconds() * 1_000_000) // ticks)
    pack = struct.Struct("!hiiiqid").pack
    body = b"".join(
        pack(
            3, 4, first_num + i % channels, 8, lo_us + (i // channels) * step, 8, 4 + (i % 61) / 16
        )
        for i in range(rows)
    )
    return b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0) + body + struct.pack("!h", -1)


@dataclass(frozen=True)
class CopyResult:
    streams: int
    rows: int
    seconds: float
    cpu: CpuUse

    @property
    def rows_s(self) -> float:
        return self.rows / self.seconds


async def copy_run(
    dsn: str, bufs: list[bytes], rows: int, meter: CpuMeter, streams: int
) -> CopyResult:
    conns = [await connect(dsn) for _ in bufs]
    try:

        async def one(conn: psycopg.AsyncConnection[Any], buf: bytes) -> None:
            view = memoryview(buf)
            async with conn.cursor() as cur:
                async with cur.copy(
                    "COPY measurements (channel_num, ts, value) FROM STDIN (FORMAT BINARY)"
                ) as cp:
                    for off in range(0, len(view), COPY_CHUNK):
                        await cp.write(view[off : off + COPY_CHUNK])

        meter.start()
        t0 = time.perf_counter()
        await asyncio.gather(*(one(c, b) for c, b in zip(conns, bufs, strict=True)))
        seconds = time.perf_counter() - t0
        return CopyResult(streams, rows, seconds, meter.stop())
    finally:
        for c in conns:
            await c.close()


async def copy_ceiling(dsn: str, plan: Plan, now: datetime, meter: CpuMeter) -> list[CopyResult]:
    async with await connect(dsn) as conn:
        cur = await conn.execute("SELECT coalesce(max(num), 0) FROM channels")
        row = await cur.fetchone()
        top = int(row[0]) if row else 0
    base = COPY_BASE if top < COPY_BASE else (top // COPY_BASE + 1) * COPY_BASE
    lo = day_start(db.month_start(now.date()))
    results = []
    try:
        await delete_copy_rows(dsn, base)  # leftovers of an interrupted run, if any
        for streams in (1, 2):
            per = plan.copy_rows // streams
            chans = plan.copy_channels // streams
            first = base + (streams - 1) * plan.copy_channels
            bufs = [copy_buffer(per, first + s * chans, chans, lo, now) for s in range(streams)]
            await checkpoint(dsn)
            r = await copy_run(dsn, bufs, per * streams, meter, streams)
            say(
                f"  {streams} stream{'s' if streams > 1 else ''}: {r.rows:,} rows in"
                f" {r.seconds:.2f} s = {fmt(r.rows_s)} rows/s"
            )
            say(f"    {r.cpu.line()}")
            results.append(r)
    finally:
        t0 = time.perf_counter()
        await delete_copy_rows(dsn, base)
        say(f"  deleted the COPY rows again ({time.perf_counter() - t0:.1f} s)")
    return results


async def delete_copy_rows(dsn: str, base: int) -> None:
    async with await connect(dsn) as conn:
        cur = await conn.execute("DELETE FROM measurements WHERE channel_num >= %s", (base,))
        if cur.rowcount:
            await conn.execute("VACUUM measurements")


# --- 4. bytes per reading ------------------------------------------------------------------


@dataclass(frozen=True)
class Size:
    table: int  # heap incl. TOAST, free-space and visibility maps
    indexes: int

    @property
    def total(self) -> int:
        return self.table + self.indexes

    def __sub__(self, other: Size) -> Size:
        return Size(self.table - other.table, self.indexes - other.indexes)


async def sizes(conn: psycopg.AsyncConnection[Any], rels: list[str]) -> dict[str, Size]:
    out = {}
    for rel in rels:
        cur = await conn.execute(
            "SELECT pg_table_size(%s::regclass), pg_indexes_size(%s::regclass)", (rel, rel)
        )
        row = await cur.fetchone()
        assert row is not None
        out[rel] = Size(int(row[0]), int(row[1]))
    return out


@dataclass(frozen=True)
class StorageResult:
    month: date
    days: list[date]
    channels: int
    readings: int
    ingest_s: float
    packed: int
    compact_s: float
    rels: dict[str, str]  # role -> relation name
    fresh: dict[str, Size]  # growth per relation, after ingest
    after: dict[str, Size]  # growth per relation, after compaction and VACUUM
    raw_left: int  # raw rows of the bench days still in measurements


def storage_rows(
    nums: list[int], d: date, hour: int, rng: random.Random
) -> list[tuple[int, datetime, float]]:
    """One hour of 1-minute readings of every channel, in time order. Each channel has
    its own second within the minute, and one reading in ten comes a second early or
    late (whole-second device clocks); values follow a fridge or freezer (compressor
    cycle, slow daily drift, a door now and then) in DS18B20 steps with ±1 step of
    noise on a fifth of the readings."""
    setpoints = (3.0, 4.0, 5.0, -18.0, -20.0)
    rows = []
    t0 = day_start(d) + timedelta(hours=hour)
    for minute in range(60):
        for j, num in enumerate(nums):
            jitter = rng.choice((-1, 1)) if rng.random() < 0.1 else 0
            ts = t0 + timedelta(minutes=minute, seconds=(j * 7) % 58 + 1 + jitter)
            v = simulated(setpoints[j % 5], 1.0 + (j % 3) * 0.25, ts, j % 97)
            if rng.random() < 0.2:
                v += rng.choice((-0.0625, 0.0625))
            rows.append((num, ts, v))
    return rows


async def storage(dsn: str, cfg: Config, plan: Plan, acc: str, now: datetime) -> StorageResult:
    last_closed = now.date() - timedelta(days=cfg.compact_after_days + 1)
    # The month before the last closed day's: no other phase writes there.
    month = db.add_months(db.month_start(last_closed), -1)
    days = [month + timedelta(days=i) for i in range(plan.storage_days)]
    rels = {
        "raw": db.partition_name("measurements", month),
        "packed": db.partition_name("measurements_packed", month),
        "rollup_5m": db.partition_name("rollup_5m", month),
        "rollup_1h": db.partition_name("rollup_1h", month),
        "rollup_1d": "rollup_1d",
    }
    names = list(rels.values())
    rng = random.Random(42)
    async with await connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT num FROM channels WHERE account_id = %s ORDER BY num LIMIT %s",
            (acc, plan.storage_channels),
        )
        nums = [int(r[0]) for r in await cur.fetchall()]
        s0 = await sizes(conn, names)
        total = stored = 0
        t0 = time.perf_counter()
        for d in days:
            for hour in range(24):
                rows = storage_rows(nums, d, hour, rng)
                async with conn.transaction():
                    stored += await insert_readings(
                        conn, rows, now=now, compact_after_days=cfg.compact_after_days
                    )
                total += len(rows)
        ingest_s = time.perf_counter() - t0
        if stored != total:
            raise RuntimeError(f"the writer stored {stored} of {total} storage readings")
        s1 = await sizes(conn, names)
        t0 = time.perf_counter()
        packed = await compaction.compact(conn, now, cfg.compact_after_days)
        compact_s = time.perf_counter() - t0
        for rel in names:
            await conn.execute(f'VACUUM "{rel}"')
        s2 = await sizes(conn, names)
        cur = await conn.execute(
            "SELECT count(*) FROM measurements WHERE channel_num = ANY(%s) AND ts >= %s AND ts < %s",
            (nums, day_start(days[0]), day_start(days[-1]) + timedelta(days=1)),
        )
        left = await cur.fetchone()
    return StorageResult(
        month=month,
        days=days,
        channels=len(nums),
        readings=total,
        ingest_s=ingest_s,
        packed=packed,
        compact_s=compact_s,
        rels=rels,
        fresh={r: s1[r] - s0[r] for r in names},
        after={r: s2[r] - s0[r] for r in names},
        raw_left=int(left[0]) if left else -1,
    )


# --- the run ------------------------------------------------------------------------------


@dataclass
class Results:
    copies: list[CopyResult] = field(default_factory=list)
    phases: list[Stats] = field(default_factory=list)
    paced: Stats | None = None
    paced_target: float = 0.0
    storage: StorageResult | None = None


def phase_line(s: Stats, ceiling: float | None) -> str:
    ratio = f"{s.readings_s / ceiling * 100:6.1f} %" if ceiling else "   later"
    return (
        f"  {s.per_request:>7}  {s.concurrency:>5}  {s.req_s:>8,.0f}  {s.readings_s:>10,.0f}"
        f"  {s.ms(50):>6.1f}  {s.ms(99):>6.1f}  {ratio}  {s.requests:>8,}  {s.problems()}"
    )


PHASE_HEAD = "  per req   conc     req/s  readings/s  p50 ms  p99 ms  of COPY  requests  answers"


def report(res: Results, plan: Plan) -> None:
    banner("SUMMARY")
    ceiling = max((c.rows_s for c in res.copies), default=0.0)
    say("1. COPY ceiling (binary COPY into measurements, rows in time order)")
    for c in res.copies:
        say(f"     {c.streams} stream(s): {fmt(c.rows_s)} rows/s ({c.rows:,} rows)")
    say(f"   ceiling = {fmt(ceiling)} rows/s")
    say()
    say(f"2. HTTP ingest, closed loop, {plan.duration:g} s per phase")
    say(PHASE_HEAD)
    for s in res.phases:
        say(phase_line(s, ceiling))
    say()
    p = res.paced
    if p is not None:
        say(
            f"3. Open loop at 50 % of the best 32-per-request rate: offered"
            f" {res.paced_target:,.0f} readings/s ({res.paced_target / 32:,.1f} req/s)"
        )
        say(
            f"   achieved {p.readings_s:,.0f} readings/s ({p.req_s:,.1f} req/s),"
            f" p50 {p.ms(50):.1f} ms, p99 {p.ms(99):.1f} ms, max {p.ms(100):.1f} ms"
            f" (from the scheduled send time; client send lag p99"
            f" {percentile(p.lag, 99) * 1000:.1f} ms); {p.problems()}"
        )
        say()
    st = res.storage
    if st is not None:
        n = st.readings
        say(
            f"4. Bytes per reading: {n:,} readings = {st.channels} channels × {len(st.days)}"
            f" day(s) × 1440, {st.days[0]}..{st.days[-1]} (partitions of {st.month:%Y-%m})"
        )
        say("                         fresh (table + indexes)     after compaction + VACUUM")
        for role, rel in st.rels.items():
            f, a = st.fresh[rel], st.after[rel]
            say(
                f"     {role:<10} {f.table / n:7.2f} + {f.indexes / n:6.2f} = {f.total / n:7.2f}"
                f"     {a.table / n:7.2f} + {a.indexes / n:6.2f} = {a.total / n:7.2f}"
            )
        raw_f = st.fresh[st.rels["raw"]].total / n
        rollups_f = sum(st.fresh[st.rels[r]].total for r in st.rels if r.startswith("rollup")) / n
        packed_a = st.after[st.rels["packed"]].total / n
        raw_a = st.after[st.rels["raw"]].total / n
        rollups_a = sum(st.after[st.rels[r]].total for r in st.rels if r.startswith("rollup")) / n
        say(f"   fresh: raw {raw_f:.1f} B/reading, rollups {rollups_f:.1f} B/reading")
        say(
            f"   after: packed {packed_a:.2f} B/reading (incl. index and TOAST), raw partition"
            f" still holds {raw_a:.2f} B/reading ({st.raw_left} raw rows left),"
            f" rollups {rollups_a:.1f} B/reading"
        )
        say(
            f"   writer {n / st.ingest_s:,.0f} readings/s (insert_readings, 1 connection);"
            f" compaction packed {st.packed:,} readings in {st.compact_s:.1f} s"
        )
        say()

    say("TARGETS (from the issue; a MISS is reported, never fatal)")
    rows: list[tuple[str, str, str]] = []
    best32 = max((s.readings_s for s in res.phases if s.per_request == 32), default=math.nan)
    if ceiling and math.isfinite(best32):
        r = best32 / ceiling
        rows.append(
            (
                f"32 per request >= {TARGET_RATIO:.0%} of COPY ceiling",
                f"{r:.1%} ({best32:,.0f} of {ceiling:,.0f}/s)",
                verdict(r >= TARGET_RATIO),
            )
        )
    if p is not None:
        p99 = p.ms(99)
        rows.append(
            (
                f"p99 < {TARGET_P99_MS:.0f} ms at half the peak rate",
                f"{p99:.1f} ms",
                verdict(p99 < TARGET_P99_MS),
            )
        )
    if st is not None:
        packed_a = st.after[st.rels["packed"]].total / st.readings
        rows.append(
            (
                f"<= {TARGET_BYTES:.0f} bytes/reading after compaction",
                f"{packed_a:.2f} B (measurements_packed)",
                verdict(packed_a <= TARGET_BYTES),
            )
        )
    for what, measured, v in rows:
        say(f"  {what:<40} {measured:<36} {v}")
    if st is not None:
        n = st.readings
        raw_a = st.after[st.rels["raw"]].total / n
        everything = sum(a.total for a in st.after.values()) / n
        say(
            f"  (not the target, for the record: the raw partition keeps {raw_a:.1f} B/reading"
            f" of freed index pages and maps, and everything after compaction incl. rollups"
            f" is {everything:.1f} B/reading)"
        )


async def run(frame: runner.Frame, cfg: Config, plan: Plan, rounds: int) -> None:
    dsn = frame.dsn
    t_start = time.perf_counter()
    now = datetime.now(UTC)
    res = Results()
    say(f"setup: migrating, starting the server, creating {plan.devices} devices")
    # the server connects as the app role (it refuses a superuser): db/roles.py
    app_dsn = await asyncio.to_thread(pg.serving_dsn, dsn)
    env = {"OPENSENSE_INGEST_RATE_PER_MIN": str(BENCH_RATE_PER_MIN)}
    server = Serve(app_dsn, frame.work / "server.log", env).start()
    with watched(server):
        t0 = time.perf_counter()
        acc, devs = await ingest_devices(dsn, rounds, plan.devices, now)
        say(
            f"  {plan.devices} devices and tokens (bcrypt cost {rounds}) in"
            f" {time.perf_counter() - t0:.1f} s"
        )
        await server.wait_ready()
        meter = CpuMeter({"server": server.pid, "PostgreSQL": frame.pg_pid}, "load client")
        t0 = time.perf_counter()
        w = await warm_up(server.base, devs)
        say(
            f"  warm-up: one 32-reading request per device (bcrypt check of each token,"
            f" 32 channels created) in {time.perf_counter() - t0:.1f} s: {w.problems()}"
        )
        if w.bad:
            raise RuntimeError(f"warm-up failed: {w.sample}")

        say()
        say(f"[2] HTTP ingest, closed loop, {plan.duration:g} s per phase")
        say(PHASE_HEAD)
        for k in plan.per_request:
            for conc in plan.concurrency:
                await checkpoint(dsn)
                s = await closed_loop(server.base, devs, k, conc, plan.duration, meter)
                res.phases.append(s)
                say(phase_line(s, None))
                if s.cpu:
                    say(f"      {s.cpu.line()}")
                if s.sample:
                    say(f"      first failure: {s.sample}")

        best32 = max(s.readings_s for s in res.phases if s.per_request == 32)
        res.paced_target = best32 / 2
        say()
        say(
            f"[3] open loop at {res.paced_target:,.0f} readings/s"
            f" ({res.paced_target / 32:,.1f} requests/s of 32), {plan.duration:g} s"
        )
        await checkpoint(dsn)
        res.paced = await paced(server.base, devs, 32, res.paced_target / 32, plan.duration, meter)
        p = res.paced
        say(
            f"  achieved {p.readings_s:,.0f} readings/s, p50 {p.ms(50):.1f} ms, p99"
            f" {p.ms(99):.1f} ms; {p.problems()}"
        )
        if p.cpu:
            say(f"  {p.cpu.line()}")

        say()
        say(f"[1] COPY ceiling: {plan.copy_rows:,} rows over {plan.copy_channels} channels")
        res.copies = await copy_ceiling(dsn, plan, now, meter)

        say()
        say(
            f"[4] storage: {plan.storage_days} closed day(s) × {plan.storage_channels}"
            " channels × 1440 readings through the writer, then compaction"
        )
        res.storage = await storage(dsn, cfg, plan, acc, now)
        say(
            f"  wrote {res.storage.readings:,} readings in {res.storage.ingest_s:.1f} s,"
            f" compacted in {res.storage.compact_s:.1f} s"
        )
    report(res, plan)
    say()
    say(f"bench finished in {time.perf_counter() - t_start:.0f} s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--dsn", help="PostgreSQL DSN of a scratch database (default: embedded)")
    ap.add_argument("--duration", type=float, help="seconds per measured HTTP phase")
    ap.add_argument("--quick", action="store_true", help="smoke run with tiny sizes")
    args = ap.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.duration:
        plan = dataclasses.replace(plan, duration=args.duration)
    cfg = Config.from_env()

    async def body(frame: runner.Frame) -> None:
        say(
            f"OpenSense ingest benchmark{' (--quick)' if args.quick else ''},"
            f" {datetime.now(UTC):%Y-%m-%d %H:%M:%S}Z"
        )
        say(f"  database: {pg.describe(frame.dsn, frame.embedded)}")
        say(
            f"  machine: {psutil.cpu_count()} cores shared by PostgreSQL, one server process"
            f" and this load client (same Python process as the driver); load average"
            f" before start {os.getloadavg()[0]:.2f}"
        )
        say(
            f"  server: opensense serve, pool {cfg.pool_min}..{cfg.pool_max} connections, jobs"
            f" off; the bench raises OPENSENSE_INGEST_RATE_PER_MIN to {BENCH_RATE_PER_MIN:,}"
            " (the product limit is 60 per device and minute)"
        )
        say(
            f"  load: {plan.devices} devices with 32 temperature channels each (p0..p31); each"
            " request is one instant of one device: 1 channel, or 32 channels at once"
        )
        say()
        await run(frame, cfg, plan, bcrypt_rounds(args.quick))

    return runner.run("ingest", args.dsn, body)


if __name__ == "__main__":
    sys.exit(main())
