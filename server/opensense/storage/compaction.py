"""Compaction of closed days, and retention by whole partitions.

A day D (UTC) is closed once D < today − compact_after_days and its rollups are
materialised (storage/rollups.py: compaction materialises first, and recomputes the
day's pending late ranges under the day's lock before packing it). Its raw rows move,
channel by channel, into one measurements_packed row holding the compressed arrays
(opensense.storage.packing). A late reading for a closed day lands raw again and
the next run merges it into the packed row. Reads merge both sources, so every
read answers the same before and after (tested).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from datetime import UTC, date, datetime, timedelta
from typing import Any

from psycopg import AsyncConnection, errors

from .. import db
from . import packing, rollups
from .write import DAY_LOCK_NS, packed_horizon, to_us

log = logging.getLogger(__name__)

CHANNELS_PER_TX = 200


async def compact(conn: AsyncConnection[Any], now: datetime, compact_after_days: int) -> int:
    """Pack every closed day that still has raw rows. Returns readings packed.

    `conn` must be in autocommit mode; each (day, channel chunk) is one transaction.
    """
    await rollups.materialize(conn, now)
    st = await (await conn.execute("SELECT materialized FROM rollup_state")).fetchone()
    assert st is not None
    horizon = min(packed_horizon(now, compact_after_days), st[0].astimezone(UTC).date())
    cur = await conn.execute(
        "SELECT DISTINCT (ts AT TIME ZONE 'UTC')::date AS d, channel_num FROM measurements"
        " WHERE ts < %s ORDER BY 1, 2",
        (datetime(horizon.year, horizon.month, horizon.day, tzinfo=UTC),),
    )
    todo: dict[date, list[int]] = defaultdict(list)
    for d, num in await cur.fetchall():
        todo[d].append(num)
    total = 0
    for d in sorted(todo):
        nums = todo[d]
        for i in range(0, len(nums), CHANNELS_PER_TX):
            total += await _compact_chunk(conn, d, nums[i : i + CHANNELS_PER_TX])
    if total:
        log.info("compaction packed %d readings", total)
        await shrink_closed_months(conn, horizon)
    return total


async def shrink_closed_months(conn: AsyncConnection[Any], horizon: date) -> list[str]:
    """Give back the index pages of raw partitions whose whole month is packed.

    VACUUM returns an emptied heap, but a B-tree keeps its pages until it is rebuilt;
    without this, a packed month would keep ~33 bytes a reading of empty index pages
    until retention drops it 13 months later. REINDEX CONCURRENTLY does not block
    writers (a late reading for that month may still arrive and is stored).
    """
    cur = await conn.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " JOIN pg_class p ON p.oid = i.inhparent"
        " WHERE p.relname = 'measurements' AND c.relkind = 'r'"
        " AND pg_indexes_size(c.oid) > 1024 * 1024"
    )
    shrunk = []
    for (name,) in await cur.fetchall():
        suffix = name[len("measurements_") :]
        month = date(int(suffix[1:5]), int(suffix[6:8]), 1)
        if db.add_months(month, 1) > horizon:
            continue  # the month still has open days
        empty = await (await conn.execute(f'SELECT NOT EXISTS (SELECT 1 FROM "{name}")')).fetchone()
        if empty and empty[0]:
            try:
                await conn.execute(f'VACUUM "{name}"')
                await conn.execute(f'REINDEX TABLE CONCURRENTLY "{name}"')
            except errors.InsufficientPrivilege:
                # the app role owns no table; before PostgreSQL 17 (MAINTAIN) only the
                # owner may REINDEX: the owner's function does (migration 0011)
                await conn.execute("SELECT opensense_reindex_partition(%s)", (name,))
            shrunk.append(name)
            log.info("compaction rebuilt the emptied index of %s", name)
    return shrunk


async def _compact_chunk(conn: AsyncConnection[Any], day: date, nums: list[int]) -> int:
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    end = start + timedelta(days=1)
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (DAY_LOCK_NS, day.toordinal()))
        # the day's pending late ranges: recomputed from the raw rows while they are raw
        cur = await conn.execute(
            "SELECT id, channel_num, lo, hi FROM rollup_invalid WHERE channel_num = ANY(%s)"
            " AND lo < %s AND hi >= %s ORDER BY id FOR UPDATE",
            (nums, end, start),
        )
        late = await cur.fetchall()
        if late:
            st = await (await conn.execute("SELECT materialized FROM rollup_state")).fetchone()
            assert st is not None
            await rollups.recompute_ranges(conn, [(n, lo, hi) for _, n, lo, hi in late], st[0])
            await conn.execute(
                "DELETE FROM rollup_invalid WHERE id = ANY(%s)", ([r[0] for r in late],)
            )
        cur = await conn.execute(
            "DELETE FROM measurements WHERE channel_num = ANY(%s) AND ts >= %s AND ts < %s"
            " RETURNING channel_num, ts, value",
            (nums, start, end),
        )
        fresh: dict[int, dict[int, float]] = defaultdict(dict)
        for num, ts, value in await cur.fetchall():
            fresh[num][to_us(ts)] = value
        cur = await conn.execute(
            "SELECT channel_num, blob FROM measurements_packed WHERE day = %s AND channel_num = ANY(%s)",
            (day, list(fresh)),
        )
        for num, blob in await cur.fetchall():
            ts_list, values = packing.unpack(blob)
            merged = fresh[num]
            for t, v in zip(ts_list, values, strict=True):
                merged.setdefault(t, v)  # packed and raw never overlap; keep the first
        moved = 0
        for num in sorted(fresh):
            points = sorted(fresh[num].items())
            blob = packing.pack([t for t, _ in points], [v for _, v in points])
            await conn.execute(
                "INSERT INTO measurements_packed (channel_num, day, n, blob) VALUES (%s, %s, %s, %s)"
                " ON CONFLICT (channel_num, day) DO UPDATE SET n = excluded.n, blob = excluded.blob",
                (num, day, len(points), blob),
            )
            moved += len(points)
    return moved


async def enforce_retention(
    conn: AsyncConnection[Any],
    now: datetime,
    raw_months: int,
    rollup_months: int,
) -> list[str]:
    """Drop whole monthly partitions past retention. Never finer than a month, and the
    settings refuse anything shorter than the product's minimums."""
    this_month = db.month_start(now.date())
    raw_before = db.add_months(this_month, -raw_months)
    rollup_before = db.add_months(this_month, -rollup_months)
    dropped: list[str] = []
    for table, before in (
        ("measurements", raw_before),
        ("measurements_packed", raw_before),
        ("rollup_5m", rollup_before),
        ("rollup_1h", rollup_before),
    ):
        dropped += await _drop_before(conn, table, before)
    return dropped


async def _drop_before(conn: AsyncConnection[Any], table: str, before: date) -> list[str]:
    cur = await conn.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = %s AND c.relkind IN ('r', 'p')",
        (table,),
    )
    dropped = []
    for (name,) in await cur.fetchall():
        suffix = name[len(table) + 1 :]
        if not (len(suffix) == 8 and suffix[0] == "y" and suffix[5] == "m"):
            continue
        month = date(int(suffix[1:5]), int(suffix[6:8]), 1)
        if db.add_months(month, 1) <= before:
            # the owner's function (migration 0011): the app role owns no partition
            await conn.execute("SELECT opensense_drop_partition(%s)", (name,))
            dropped.append(name)
            log.info("retention dropped partition %s", name)
    return dropped
