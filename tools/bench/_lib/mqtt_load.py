"""The bench's side of the MQTT load: starting the publisher and subscriber processes
(`mqtt_worker`), opening and closing the measured window, pacing publishers with
credit, and collecting what they did."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from . import pg
from .cpu import CpuMeter, CpuUse
from .fleet import MqttFleet
from .mqtt_worker import ACK_DRAIN_S, payload
from .procs import STARTED, tail
from .report import fmt, percentile

WORKER = Path(__file__).with_name("mqtt_worker.py")
DB_DRAIN_S = 60.0  # after the window, how long the bench waits for the server to catch up


class Worker:
    """A publisher or subscriber process (mqtt_worker.py, or another `script` that
    speaks the same lines: READY, ERROR, RESULT)."""

    def __init__(self, kind: str, conf: dict[str, Any], log: Path, script: Path = WORKER) -> None:
        self.kind, self.conf, self.log, self.script = kind, conf, log, script
        self.proc: asyncio.subprocess.Process | None = None
        self._lines: asyncio.Queue[str | None] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        err = open(self.log, "ab")  # noqa: ASYNC230 - a local file, opened once
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                str(self.script),
                self.kind,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                start_new_session=True,  # Ctrl-C reaches the bench, which stops it
                limit=1 << 26,  # a RESULT line carries every latency
            )
        finally:
            err.close()
        STARTED.append(self.proc)
        self._reader = asyncio.create_task(self._read())
        self.send(json.dumps(self.conf))

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while True:
            raw = await self.proc.stdout.readline()
            if not raw:
                await self._lines.put(None)
                return
            await self._take(raw.decode().strip())

    async def _take(self, text: str) -> None:
        """A line from the worker, for `expect` (a subclass may take some itself)."""
        await self._lines.put(text)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def send(self, line: str) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")

    async def expect(self, word: str, within: float) -> str:
        assert self.proc is not None
        try:
            async with asyncio.timeout(within):
                while True:
                    text = await self._lines.get()
                    if text is None:
                        raise RuntimeError(
                            f"{self.kind} worker exited ({await self.proc.wait()}):"
                            f" {tail(self.log, 5)}"
                        )
                    if text.startswith("ERROR"):
                        raise RuntimeError(f"{self.kind} worker: {text[6:]}")
                    if text.startswith(word):
                        return text[len(word) :].strip()
        except TimeoutError:
            raise RuntimeError(f"{self.kind} worker: no {word} within {within:.0f} s") from None

    async def result(self, within: float) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(await self.expect("RESULT", within))
        assert self.proc is not None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await self.proc.wait()
        return out

    async def stop(self) -> None:
        proc = self.proc
        if self._reader is not None:
            self._reader.cancel()
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            async with asyncio.timeout(5):
                await proc.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


def split(items: list[Any], n: int) -> list[list[Any]]:
    n = max(1, min(n, len(items)))
    return [items[i::n] for i in range(n)]


@dataclass
class Load:
    """What the publishers of one phase did."""

    k: int
    payload_bytes: int
    duration: float
    in_window: int = 0  # PUBACKs inside the window
    acked: int = 0  # PUBACKs in all (warm-up, window, after the window)
    unacked: int = 0  # still without PUBACK ACK_DRAIN_S after the window
    out_of_ts: int = 0
    lat_ms: list[float] = field(default_factory=list)
    sent: dict[str, int] = field(default_factory=dict)  # client id -> messages published
    cpu: CpuUse | None = None

    @property
    def acked_s(self) -> float:
        return self.in_window / self.duration

    def ms(self, p: float) -> float:
        return percentile(self.lat_ms, p)


Snapshot = tuple[float, int]  # (perf_counter, committed rows)


async def pace(
    pubs: list[Worker], shares: list[int], progress: Callable[[], Awaitable[int]], t1: float
) -> int:
    """Credit for a broker that acknowledges before the server has the message
    (Mosquitto): the publishers may send only as far as keeps about one second of
    the server's rate (at least 200 messages) published but not yet committed. The
    server always has work queued, and what is left when the window closes is short.
    `progress`: messages committed since the warm-up began. Returns the credit granted."""
    granted = 0
    seen: list[tuple[float, int]] = []  # (time, committed) of the last second or so
    while True:
        committed = await progress()
        now = time.monotonic()
        if now >= t1:
            return granted
        seen = [p for p in seen if now - p[0] <= 1.5]
        seen.append((now, committed))
        span = now - seen[0][0]
        rate = (committed - seen[0][1]) / span if span >= 0.5 else 0.0
        grant = committed + int(max(200.0, rate)) - granted
        if grant > 0:
            total = sum(shares)
            for w, share in zip(pubs, shares, strict=True):
                w.send(f"CREDIT {math.ceil(grant * share / total)}")
            granted += grant
        await asyncio.sleep(0.1)


async def drive(
    pubs: list[Worker],
    k: int,
    warm: float,
    duration: float,
    meter: CpuMeter,
    roles: dict[str, list[int]],
    sub: Worker | None = None,
    count: Callable[[], Awaitable[int]] | None = None,
    progress: Callable[[], Awaitable[int]] | None = None,
    settle: Callable[[], Awaitable[None]] | None = None,
) -> tuple[Load, Snapshot | None, Snapshot | None]:
    """Start the publishers (and the subscriber), wait for READY, open the window after
    the warm-up (`warm` seconds) and close it `duration` seconds later. With `count` (committed rows), a
    snapshot is taken at both ends of the window; with `progress` (committed
    messages) the publishers are paced (see pace). Returns the publishers' figures
    and the two snapshots. `settle` runs between READY and GO."""
    workers = [*([sub] if sub else []), *pubs]
    for w in workers:
        await w.start()
    for w in workers:
        await w.expect("READY", 90)
    if settle is not None:
        await settle()
    t0 = time.monotonic() + warm
    t1 = t0 + duration
    for w in workers:
        w.send(f"GO {t0} {t1}")
    pacer = None
    if progress is not None:
        shares = [len(w.conf["clients"]) for w in pubs]
        pacer = asyncio.create_task(pace(pubs, shares, progress, t1))

    async def snapshot() -> Snapshot | None:
        if count is None:
            return None
        t = time.perf_counter()
        n = await count()
        return (t + time.perf_counter()) / 2, n

    try:
        await asyncio.sleep(max(0.0, t0 - time.monotonic()))
        roles = {**roles, "publishers": [w.pid for w in pubs]}
        if sub:
            roles["subscriber"] = [sub.pid]
        meter.start(roles)
        first = await snapshot()
        await asyncio.sleep(max(0.0, t1 - time.monotonic()))
        last = await snapshot()
        load = Load(k, len(payload(k, int(time.time()), 0)), duration, cpu=meter.stop())
        if pacer is not None:
            await pacer
    finally:
        if pacer is not None:
            pacer.cancel()
    for w in pubs:
        r = await w.result(ACK_DRAIN_S + 30)
        load.in_window += int(r["in_window"])
        load.acked += int(r["acked"])
        load.unacked += int(r["unacked"])
        load.out_of_ts += int(r["out_of_ts"])
        load.lat_ms.extend(float(x) for x in r["lat"])
        load.sent.update({str(c): int(n) for c, n in r["sent"].items()})
    return load, first, last


def payload_name(load: Load) -> str:
    return f"{load.k:>2} reading{'s' if load.k > 1 else ' '} ({fmt(load.payload_bytes)} B)"


class RssWatch:
    """The server's resident memory at the start of a phase and its peak during it."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.first = 0
        self.peak = 0
        self._task: asyncio.Task[None] | None = None

    def _rss(self) -> int:
        try:
            return int(psutil.Process(self.pid).memory_info().rss)
        except psutil.Error:
            return 0

    async def _watch(self) -> None:
        while True:
            self.peak = max(self.peak, self._rss())
            await asyncio.sleep(0.25)

    def start(self) -> None:
        self.first = self.peak = self._rss()
        self._task = asyncio.create_task(self._watch())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def line(self) -> str:
        return f"{self.first / 2**20:.0f} MB, peak {self.peak / 2**20:.0f} MB"


# --- counting what the server committed ------------------------------------------------


COUNT_SQL = (
    "SELECT count(*) FROM measurements WHERE ts >= %s AND channel_num IN"
    " (SELECT num FROM channels WHERE account_id = %s)"
)


class RowCounter:
    """Rows of one account's channels from a timestamp on: one phase's readings."""

    def __init__(self, dsn: str, account: str, since: int) -> None:
        self.dsn, self.account = dsn, account
        self.since = datetime.fromtimestamp(since, UTC)
        self.conn: Any = None

    async def __call__(self) -> int:
        if self.conn is None:
            self.conn = await pg.connect(self.dsn)
        cur = await self.conn.execute(COUNT_SQL, (self.since, self.account))
        row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.close()


class Progress:
    """Messages committed in this phase, cheaper than counting every row: each
    message carries exactly one reading of its device's channel p0, so the p0 rows
    of the phase are the messages."""

    def __init__(self, count: RowCounter, fleet: MqttFleet) -> None:
        self.count, self.fleet = count, fleet
        self.nums: list[int] = []

    async def __call__(self) -> int:
        if self.count.conn is None:
            await self.count()
        conn = self.count.conn
        if not self.nums:
            cur = await conn.execute(
                "SELECT num FROM channels WHERE device_id = ANY(%s)"
                " AND kind = 'temperature' AND label = 'p0'",
                (self.fleet.ids,),
            )
            self.nums = [int(r[0]) for r in await cur.fetchall()]
        cur = await conn.execute(
            "SELECT count(*) FROM measurements WHERE channel_num = ANY(%s) AND ts >= %s",
            (self.nums, self.count.since),
        )
        row = await cur.fetchone()
        return int(row[0]) if row else 0


async def wait_rows(count: RowCounter, n: int) -> None:
    deadline = time.monotonic() + DB_DRAIN_S
    while await count() < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the database did not reach {n:,} rows in {DB_DRAIN_S:.0f} s")
        await asyncio.sleep(0.1)
