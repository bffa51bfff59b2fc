"""The HTTP ingest load: node-like devices posting `POST /v1/ingest`, in a closed
loop (each client waits for its answer) or an open loop (requests leave on a
schedule whatever the answers), with latencies and the server's answers counted."""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import aiohttp

from .cpu import CpuMeter, CpuUse
from .report import percentile

LABELS = tuple(f"p{i}" for i in range(32))
TS_STEP = timedelta(seconds=15)  # a device's consecutive requests are 15 s of its time apart
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=60)


def rfc3339(ts: datetime) -> str:
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


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
    drain_s: float | None = None  # after the load, until every reading was judged

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
    base: str,
    devs: list[Dev],
    k: int,
    conc: int,
    duration: float,
    meter: CpuMeter,
    judged: Callable[[], Awaitable[None]] | None = None,
) -> Stats:
    """`conc` clients post k-reading requests for `duration` s. With `judged` (it
    returns once the server has done all the work the readings brought: the rule
    engine has judged them), the CPU window stays open until then, so what the load
    caused is counted in its own window, not in the next one (another server's, with
    --baseline-rev: they share PostgreSQL); readings/s are over the load alone."""
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
        if judged is not None:
            await judged()
            stats.drain_s = time.perf_counter() - start - stats.elapsed
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
