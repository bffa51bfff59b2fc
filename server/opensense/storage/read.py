"""Reading series back: raw points (merging raw rows and packed days) and buckets.

Ranges are half-open, [lo, hi). Aggregated buckets are those whose start lies in
[floor(lo), hi); mean/min/max/count come from the rollup tables, last/p50/p95 are
computed per bucket from the readings. A bucket with no data is omitted: a gap is
a gap, never filled. Rollup reads combine the materialised buckets with the raw
rows of the buckets not materialised yet (storage/rollups.py).

Nothing here holds a range in memory (issue 11: 13 months of p95 loaded 570,000
points into Python). Raw rows are aggregated by PostgreSQL (`percentile_cont`,
`DISTINCT ON` for last), one row per bucket. Packed days (storage/compaction.py)
are zlib blobs that SQL cannot read: they are decoded one day at a time, in a
worker thread (the event loop keeps serving ingest), and only that day's bucket
values are kept. How much range a computed read may span is capped by the API
(`OPENSENSE_READ_MAX_CHANNEL_DAYS`, storage/routes.py).
"""

from __future__ import annotations

import asyncio
import heapq
import math
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime, timedelta
from typing import Any

from psycopg import AsyncConnection

from . import packing, rollups
from .write import from_us, to_us

AGG_SECONDS = {"5m": 300, "1h": 3600, "1d": 86400}
AGGS = ("raw", *AGG_SECONDS)
FNS = ("mean", "min", "max", "count", "last", "p50", "p95")
ROLLUP_FNS = {"mean": "vsum / n", "min": "vmin", "max": "vmax", "count": "n"}
COMPUTED_FNS = ("last", "p50", "p95")  # from the readings: their cost grows with the range
QUANTILES = {"p50": 0.5, "p95": 0.95}
PACKED_BATCH = 8  # packed days fetched per query: memory is a few days' blobs at most

Point = tuple[datetime, float]
# Packed days are decoded here, not in the default executor: however many computed
# reads run at once, they take two threads and never hold up what else runs in
# threads (bcrypt token checks, MQTT client calls).
_DECODER = ThreadPoolExecutor(max_workers=2, thread_name_prefix="opensense-read")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def floor_bucket(ts: datetime, agg: str) -> datetime:
    width = AGG_SECONDS[agg] * 1_000_000
    us = to_us(ts)
    return from_us(us - us % width)


async def raw_points(
    conn: AsyncConnection[Any], num: int, lo: datetime, hi: datetime, limit: int
) -> list[tuple[int, float]]:
    """Up to `limit` points (µs, value) with lo <= ts < hi, ascending."""
    ts, values = await raw_columns(conn, num, lo, hi, limit)
    return list(zip(ts, values, strict=True))


async def raw_columns(
    conn: AsyncConnection[Any], num: int, lo: datetime, hi: datetime, limit: int
) -> tuple[list[int], list[float]]:
    """raw_points as two columns (µs, values): a packed day's readings are sliced
    from its decoded lists, no Python work per reading (a month's report reads
    ~860,000)."""
    cur = await conn.execute(
        "SELECT ts, value FROM measurements WHERE channel_num = %s AND ts >= %s AND ts < %s"
        " ORDER BY ts LIMIT %s",
        (num, lo, hi, limit),
    )
    rows = await cur.fetchall()
    raw_ts = [to_us(ts) for ts, _ in rows]
    raw_values = [v for _, v in rows]
    lo_us, hi_us = to_us(lo), to_us(hi)
    cutoff = raw_ts[-1] if len(raw_ts) == limit else hi_us - 1
    ts: list[int] = []
    values: list[float] = []
    async for _day, blob in _packed_blobs(conn, num, lo.date(), from_us(cutoff).date()):
        day_ts, day_values = packing.unpack(blob)
        a, b = bisect_left(day_ts, lo_us), bisect_right(day_ts, cutoff)  # ascending
        ts += day_ts[a:b]
        values += day_values[a:b]
        if len(ts) >= limit:
            break
    if not ts:
        return raw_ts, raw_values
    if raw_ts and raw_ts[0] <= ts[-1]:  # late raw rows among packed days: merge
        raw = zip(raw_ts, raw_values, strict=True)
        merged = sorted([*raw, *zip(ts, values, strict=True)])[:limit]  # as heapq.merge
        return [t for t, _ in merged], [v for _, v in merged]
    ts += raw_ts  # the raw rows are all later (the open days)
    values += raw_values
    if len(ts) > limit:
        del ts[limit:], values[limit:]
    return ts, values


def aggregate(values: Sequence[float], fn: str) -> float:
    """One bucket's value. Percentiles interpolate linearly (as percentile_cont)."""
    if fn == "count":
        return float(len(values))
    if fn == "mean":
        return math.fsum(values) / len(values)
    if fn == "min":
        return min(values)
    if fn == "max":
        return max(values)
    if fn == "last":
        return values[-1]
    q = {"p50": 0.5, "p95": 0.95}[fn]
    s = sorted(values)
    pos = (len(s) - 1) * q
    i = math.floor(pos)
    if i + 1 >= len(s):
        return s[-1]
    return s[i] + (s[i + 1] - s[i]) * (pos - i)


async def read_series(
    conn: AsyncConnection[Any],
    num: int,
    lo: datetime,
    hi: datetime,
    agg: str,
    fn: str,
    limit: int,
    after: datetime | None = None,
) -> tuple[list[Point], bool]:
    """(points, has_more) for one channel; `after` is the cursor (exclusive)."""
    if agg == "raw":
        start = lo if after is None else max(lo, after + timedelta(microseconds=1))
        pts = await raw_points(conn, num, start, hi, limit + 1)
        return [(from_us(t), v) for t, v in pts[:limit]], len(pts) > limit
    start = floor_bucket(lo, agg)
    if after is not None:  # the cursor is the last bucket answered: go on with the next
        start = max(start, floor_bucket(after, agg) + timedelta(seconds=AGG_SECONDS[agg]))
    if fn in ROLLUP_FNS:
        cur = await conn.execute(
            f"SELECT bucket, {ROLLUP_FNS[fn]} FROM ({rollups.buckets_sql(agg)}) b LIMIT %(n)s",
            {**rollups.buckets_params([num], start, hi), "n": limit + 1},
        )
        rows = [(b, float(v)) for b, v in await cur.fetchall()]
        return rows[:limit], len(rows) > limit
    return await _computed_buckets(conn, num, start, hi, agg, fn, limit)


async def _packed_blobs(conn: AsyncConnection[Any], num: int, first: date, last: date) -> Any:
    """(day, blob) of the channel's packed days first..last, ascending, fetched a few
    at a time (a long range never sits in memory as blobs)."""
    after = first - timedelta(days=1)
    while True:
        cur = await conn.execute(
            "SELECT day, blob FROM measurements_packed WHERE channel_num = %s"
            " AND day > %s AND day <= %s ORDER BY day LIMIT %s",
            (num, after, last, PACKED_BATCH),
        )
        rows = await cur.fetchall()
        for day, blob in rows:
            yield day, blob
        if len(rows) < PACKED_BATCH:
            return
        after = rows[-1][0]


def _bucket_sql(agg: str, fn: str) -> str:
    """Per-bucket `fn` over the raw rows of [start, hi), leaving out packed days (a
    packed day's late raw rows are merged with its blob instead)."""
    rows = (
        f"SELECT date_bin('{AGG_SECONDS[agg]} seconds', ts, %(epoch)s) AS b, ts, value"
        " FROM measurements WHERE channel_num = %(num)s AND ts >= %(start)s AND ts < %(hi)s"
        " AND (ts AT TIME ZONE 'UTC')::date <> ALL(%(packed)s::date[])"
    )
    if fn == "last":
        return f"SELECT DISTINCT ON (b) b, value FROM ({rows}) r ORDER BY b, ts DESC LIMIT %(n)s"
    return (
        "SELECT b, percentile_cont(%(q)s) WITHIN GROUP (ORDER BY value)"
        f" FROM ({rows}) r GROUP BY b ORDER BY b LIMIT %(n)s"
    )


def _day_buckets(
    blob: bytes, extra: list[tuple[int, float]], lo_us: int, hi_us: int, width: int, fn: str
) -> list[tuple[int, float]]:
    """One packed day (plus its raw rows not packed yet) as (bucket µs, value) pairs.
    Pure CPU: run in a worker thread."""
    ts, values = packing.unpack(blob)
    pts: Any = zip(ts, values, strict=True)
    if extra:
        pts = heapq.merge(pts, extra)
    out: list[tuple[int, float]] = []
    cur: int | None = None
    vals: list[float] = []
    for t, v in pts:
        if not lo_us <= t < hi_us:
            continue
        b = t - t % width
        if b != cur:
            if vals and cur is not None:
                out.append((cur, aggregate(vals, fn)))
            cur, vals = b, []
        vals.append(v)
    if vals and cur is not None:
        out.append((cur, aggregate(vals, fn)))
    return out


async def _computed_buckets(
    conn: AsyncConnection[Any],
    num: int,
    start: datetime,
    hi: datetime,
    agg: str,
    fn: str,
    limit: int,
) -> tuple[list[Point], bool]:
    """last/p50/p95 per bucket: raw days in SQL, packed days one at a time."""
    width = AGG_SECONDS[agg] * 1_000_000
    first, last = start.date(), (hi - timedelta(microseconds=1)).date()
    cur = await conn.execute(
        "SELECT day FROM measurements_packed WHERE channel_num = %s AND day >= %s AND day <= %s",
        (num, first, last),
    )
    packed_days = [d for (d,) in await cur.fetchall()]
    cur = await conn.execute(
        _bucket_sql(agg, fn),
        {"epoch": _EPOCH, "num": num, "start": start, "hi": hi, "packed": packed_days,
         "q": QUANTILES.get(fn, 0.5), "n": limit + 1},
    )  # fmt: skip
    from_sql = [(to_us(b), float(v)) for b, v in await cur.fetchall()]
    from_packed: list[tuple[int, float]] = []
    if packed_days:
        lo_us, hi_us = to_us(start), to_us(hi)
        async for day, blob in _packed_blobs(conn, num, first, last):
            day_us = to_us(datetime(day.year, day.month, day.day, tzinfo=UTC))
            if len(from_packed) > limit or (len(from_sql) > limit and day_us > from_sql[-1][0]):
                break  # limit + 1 buckets are known: this day cannot be among them
            cur = await conn.execute(
                "SELECT ts, value FROM measurements WHERE channel_num = %s AND ts >= %s"
                " AND ts < %s ORDER BY ts",
                (num, from_us(max(day_us, lo_us)), from_us(min(day_us + 86_400_000_000, hi_us))),
            )
            extra = [(to_us(t), float(v)) for t, v in await cur.fetchall()]
            from_packed += await asyncio.get_running_loop().run_in_executor(
                _DECODER, _day_buckets, blob, extra, lo_us, hi_us, width, fn
            )
    out = [(from_us(b), v) for b, v in heapq.merge(from_sql, from_packed)][: limit + 1]
    return out[:limit], len(out) > limit
