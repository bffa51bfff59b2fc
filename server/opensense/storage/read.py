"""Reading series back: raw points (merging raw rows and packed days) and buckets.

Ranges are half-open, [lo, hi). Aggregated buckets are those whose start lies in
[floor(lo), hi); mean/min/max/count come from the rollup tables, last/p50/p95 from
the raw points. A bucket with no data is omitted: a gap is a gap, never filled.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from psycopg import AsyncConnection

from . import packing
from .write import from_us, to_us

AGG_SECONDS = {"5m": 300, "1h": 3600, "1d": 86400}
AGGS = ("raw", *AGG_SECONDS)
FNS = ("mean", "min", "max", "count", "last", "p50", "p95")
ROLLUP_FNS = {"mean": "vsum / n", "min": "vmin", "max": "vmax", "count": "n"}
ROLLUP_TABLES = {"5m": "rollup_5m", "1h": "rollup_1h", "1d": "rollup_1d"}

Point = tuple[datetime, float]


def floor_bucket(ts: datetime, agg: str) -> datetime:
    width = AGG_SECONDS[agg] * 1_000_000
    us = to_us(ts)
    return from_us(us - us % width)


async def raw_points(
    conn: AsyncConnection[Any], num: int, lo: datetime, hi: datetime, limit: int
) -> list[tuple[int, float]]:
    """Up to `limit` points (µs, value) with lo <= ts < hi, ascending."""
    cur = await conn.execute(
        "SELECT ts, value FROM measurements WHERE channel_num = %s AND ts >= %s AND ts < %s"
        " ORDER BY ts LIMIT %s",
        (num, lo, hi, limit),
    )
    raw = [(to_us(ts), v) for ts, v in await cur.fetchall()]
    lo_us, hi_us = to_us(lo), to_us(hi)
    cutoff = raw[-1][0] if len(raw) == limit else hi_us - 1
    cur = await conn.execute(
        "SELECT blob FROM measurements_packed WHERE channel_num = %s AND day >= %s AND day <= %s"
        " ORDER BY day",
        (num, lo.date(), from_us(cutoff).date()),
    )
    packed: list[tuple[int, float]] = []
    async for (blob,) in cur:
        ts, values = packing.unpack(blob)
        packed.extend((t, v) for t, v in zip(ts, values, strict=True) if lo_us <= t <= cutoff)
        if len(packed) >= limit:
            break
    if not packed:
        return raw
    out = []
    for p in heapq.merge(raw, packed):
        out.append(p)
        if len(out) == limit:
            break
    return out


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
    if after is not None:
        start = max(start, after + timedelta(microseconds=1))
    if fn in ROLLUP_FNS:
        cur = await conn.execute(
            f"SELECT bucket, {ROLLUP_FNS[fn]} FROM {ROLLUP_TABLES[agg]}"
            " WHERE channel_num = %s AND bucket >= %s AND bucket < %s ORDER BY bucket LIMIT %s",
            (num, start, hi, limit + 1),
        )
        rows = [(b, float(v)) for b, v in await cur.fetchall()]
        return rows[:limit], len(rows) > limit
    return await _bucket_from_raw(conn, num, start, hi, agg, fn, limit)


async def _bucket_from_raw(
    conn: AsyncConnection[Any],
    num: int,
    start: datetime,
    hi: datetime,
    agg: str,
    fn: str,
    limit: int,
) -> tuple[list[Point], bool]:
    width = AGG_SECONDS[agg] * 1_000_000
    buckets: dict[int, list[float]] = {}
    order: list[int] = []
    page = 50_000
    cursor = start
    while True:
        pts = await raw_points(conn, num, cursor, hi, page)
        for t, v in pts:
            b = t - t % width
            if b not in buckets:
                buckets[b] = []
                order.append(b)
            buckets[b].append(v)
        # limit + 1 complete buckets are known once a later bucket has begun
        if len(pts) < page or len(order) > limit + 1:
            break
        cursor = from_us(pts[-1][0] + 1)
    complete = order if len(pts) < page else order[:-1]
    out = [(from_us(b), aggregate(buckets[b], fn)) for b in complete[: limit + 1]]
    return out[:limit], len(out) > limit
