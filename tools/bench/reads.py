"""OpenSense read benchmark: a computed aggregate (fn=p95, agg=1d) over 13 months of
one channel at one reading a minute (~570,000 readings, all but the last 3 days
packed by compaction, as in production), before and after issue 11 item 11.

Two ways are timed against the same data in the same run:

- before: the former code path (every reading of the range loaded into Python
  through `read.raw_points`, 50,000 at a time, grouped and aggregated in Python;
  reproduced here as `before()`);
- after: `read.read_series` (raw days by PostgreSQL's percentile_cont, packed days
  one at a time in a worker thread).

For each: wall time of the read, the longest the event loop went without running
(a 5 ms ticker task: what ingest and MQTT on the same loop would have waited), and,
in a second run under tracemalloc, the peak of Python allocations. Ratios are to
the "before" figures of the same run.

    tools/bench/reads                # 13 months (~1 min on 2 cores, most of it building the data)
    tools/bench/reads --days 60      # a shorter range
    tools/bench/reads --quick        # 14 days (a smoke run, seconds)
    tools/bench/reads --dsn postgresql://postgres@127.0.0.1:5432/test   # a server to make a scratch db on
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from _lib import pg, runner
from _lib.report import ratio, say
from opensense import db
from opensense.storage import read, write
from opensense.storage.compaction import compact

NUM = 1_000_001  # a channel number of the bench's own (measurements has no foreign key)


async def before(conn: Any, lo: datetime, hi: datetime, agg: str, fn: str, limit: int) -> int:
    """The former `_bucket_from_raw`: all the range's points into Python."""
    width = read.AGG_SECONDS[agg] * 1_000_000
    buckets: dict[int, list[float]] = {}
    order: list[int] = []
    cursor = read.floor_bucket(lo, agg)
    while True:
        pts = await read.raw_points(conn, NUM, cursor, hi, 50_000)
        for t, v in pts:
            b = t - t % width
            if b not in buckets:
                buckets[b] = []
                order.append(b)
            buckets[b].append(v)
        if len(pts) < 50_000 or len(order) > limit + 1:
            break
        cursor = write.from_us(pts[-1][0] + 1)
    return len([read.aggregate(buckets[b], fn) for b in order[: limit + 1]])


async def after(conn: Any, lo: datetime, hi: datetime, agg: str, fn: str, limit: int) -> int:
    points, _ = await read.read_series(conn, NUM, lo, hi, agg, fn, limit)
    return len(points)


async def measure(
    way: Callable[..., Awaitable[int]], conn: Any, lo: datetime, hi: datetime, fn: str
) -> tuple[float, float, int]:
    """(seconds, longest loop stall in seconds, buckets)."""
    stall = [0.0]
    running = True

    async def ticker() -> None:
        while running:
            t = time.perf_counter()
            await asyncio.sleep(0.005)
            stall[0] = max(stall[0], time.perf_counter() - t - 0.005)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.01)
    t0 = time.perf_counter()
    n = await way(conn, lo, hi, "1d", fn, 5000)
    took = time.perf_counter() - t0
    running = False
    await task
    return took, stall[0], n


async def peak(way: Callable[..., Awaitable[int]], conn: Any, lo: datetime, hi: datetime) -> int:
    tracemalloc.start()
    try:
        await way(conn, lo, hi, "1d", "p95", 5000)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


async def run(frame: runner.Frame, days: int) -> None:
    with pg.scratch(frame.dsn, "opensense_bench_reads") as dsn:
        await compare(dsn, days)


async def compare(dsn: str, days: int) -> None:
    """Build the data, then time both ways over it."""
    pg.migrate(dsn)
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    hi = datetime(now.year, now.month, now.day, tzinfo=UTC)
    lo = hi - timedelta(days=days)
    n = days * 1440
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        t0 = time.perf_counter()
        months = {db.month_start((lo + timedelta(days=d)).date()) for d in range(days + 2)}
        await write.ensure_month_partitions(conn, months)
        await conn.execute(
            "INSERT INTO measurements (channel_num, ts, value) SELECT %s,"
            " %s + make_interval(mins => i), 3.5 + 1.5 * sin(i / 37.0)"
            " FROM generate_series(0, %s) AS i",
            (NUM, lo, n - 1),
        )
        await conn.execute(
            "INSERT INTO measurements (channel_num, ts, value) SELECT %s,"
            " %s + make_interval(mins => i), 4.0 FROM generate_series(0, 3 * 1440) AS i",
            (NUM, hi),
        )  # the last 3 days stay raw (compaction leaves them), as in production
        moved = await compact(conn, hi + timedelta(days=3), 3)
        say(f"data: {n} readings over {days} days, {moved} packed"
              f" ({time.perf_counter() - t0:.1f} s to build)")  # fmt: skip
        rows = {}
        for label, way in (("before", before), ("after", after)):
            took, stall, buckets = await measure(way, conn, lo, hi + timedelta(days=3), "p95")
            mem = await peak(way, conn, lo, hi + timedelta(days=3))
            rows[label] = (took, stall, mem, buckets)
        b = rows["before"]
        say(f"{'fn=p95 agg=1d':<16}{'time':>10}{'loop stall':>14}{'peak alloc':>14}{'buckets':>9}")
        for label, (took, stall, mem, buckets) in rows.items():
            say(
                f"{label:<16}{took:>9.2f}s{stall * 1000:>12.0f}ms{mem / 1e6:>12.1f}MB{buckets:>9}"
                f"   (x{ratio(took, b[0]):.2f} time, x{ratio(stall, max(b[1], 1e-9)):.3f} stall,"
                f" x{ratio(mem, b[2]):.3f} memory)"
            )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--days", type=int, help="range in days (default 13 months, --quick 14)")
    ap.add_argument("--quick", action="store_true", help="14 days")
    ap.add_argument("--dsn", help="PostgreSQL server (admin DSN) to make a scratch database on")
    args = ap.parse_args(argv)
    days = args.days or (14 if args.quick else 396)
    return runner.run("reads", args.dsn, lambda frame: run(frame, days))


if __name__ == "__main__":
    sys.exit(main())
