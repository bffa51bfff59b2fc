"""Writing readings: one statement stores the new rows (a resent reading changes
nothing) and marks their channels for the rule engine. Rollups are not kept here: the
`rollups` job materialises them from the raw rows (storage/rollups.py); a writer only
logs the range of its late rows, in the same transaction, and folds a late reading
into a day already packed into the rollups itself (the job never recomputes packed
days)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any, NamedTuple

from psycopg import AsyncConnection, AsyncCursor, errors

from .. import db
from ..db import arrays
from . import packing, rollups

# Namespace for pg_advisory_xact_lock(int, int): (namespace, day ordinal). Compaction
# takes a day exclusively; an ingest of a reading into a closed day takes it shared,
# so a late reading is never written raw while its day is being packed.
DAY_LOCK_NS = 7262002

_ROLLUP = """
, {name} AS (
  INSERT INTO {table} AS r (channel_num, bucket, vmin, vmax, vsum, n)
  SELECT channel_num, {bucket} AS b, min(value), max(value), sum(value), count(*)
  FROM ins GROUP BY channel_num, b ORDER BY channel_num, b
  ON CONFLICT (channel_num, bucket) DO UPDATE SET
    vmin = least(r.vmin, excluded.vmin), vmax = greatest(r.vmax, excluded.vmax),
    vsum = r.vsum + excluded.vsum, n = r.n + excluded.n
)"""

ROLLUPS_SQL = (
    _ROLLUP.format(
        name="r5",
        table="rollup_5m",
        bucket="date_bin('5 minutes', ts, timestamptz '2000-01-01T00:00:00Z')",
    )
    + _ROLLUP.format(name="r1h", table="rollup_1h", bucket="date_trunc('hour', ts, 'UTC')")
    + _ROLLUP.format(name="r1d", table="rollup_1d", bucket="date_trunc('day', ts, 'UTC')")
)

# the rule engine's wake-up (opensense.alarms): which channels got new readings, from
# when; committed with the readings, and its trigger NOTIFYs at commit. A channel
# already dirty from an earlier time keeps its row as it is: the WHERE skips the new
# row version (and its WAL) that `since = least(d.since, excluded.since)` wrote, with
# the same result. PostgreSQL locks a conflicting row whether the WHERE lets the
# update through or not, so an evaluator claiming it (FOR UPDATE SKIP LOCKED) still
# skips it until this commit, or this statement waits for the claim and inserts anew.
DIRTY_SQL = """
, dirty AS (
  INSERT INTO alarm_dirty AS d (channel_num, since)
  SELECT channel_num, min(ts) FROM ins GROUP BY channel_num ORDER BY channel_num
  ON CONFLICT (channel_num) DO UPDATE SET since = excluded.since
    WHERE excluded.since < d.since
)"""

# The head of the writing statements: the rows (three arrays, `columns`) go in
# unless stored already; `ins` holds the new ones, for the rollups and the answer.
# {order}: the batch writer sorts its rows before sending them; INSERT_SQL's caller
# does not, so that statement sorts them itself. {conflict}: ON_CONFLICT, or nothing
# for the batch writer's first try (storage/batcher.py PLAIN_BATCH_SQL), which lets
# the primary key refuse a row stored already and then runs the statement with it.
INSERT_CTE = """
WITH src AS (
  SELECT * FROM unnest(%(nums)b::int4[], %(ts)b::timestamptz[], %(vals)b::float8[])
    AS s(channel_num, ts, value)
), ins AS (
  INSERT INTO measurements (channel_num, ts, value)
  SELECT channel_num, ts, value FROM src{order}{conflict}
  RETURNING channel_num, ts, value
)"""
ON_CONFLICT = "\n  ON CONFLICT DO NOTHING"

# A late reading into a packed day: stored and folded into the rollups at once
FOLD_SQL = (
    INSERT_CTE.format(order=" ORDER BY channel_num, ts", conflict=ON_CONFLICT)
    + ROLLUPS_SQL
    + DIRTY_SQL
    + "\nSELECT count(*) FROM ins"
)
# Any other reading: stored raw (its rollups come from the job; a late one's range is
# logged by the same statement)
INSERT_SQL = (
    INSERT_CTE.format(order=" ORDER BY channel_num, ts", conflict=ON_CONFLICT)
    + DIRTY_SQL
    + rollups.LATE_CTE
    + "\nSELECT count(*) FROM ins"
)


class Row(NamedTuple):
    """One reading as stored: its channel's number, its time, its value (offset
    applied)."""

    channel_num: int
    ts: datetime
    value: float


# What the writers take: Rows, or plain (channel_num, ts, value) tuples (benches).
RowLike = tuple[int, datetime, float]


def columns(rows: Sequence[RowLike]) -> dict[str, Any]:
    """The rows as the three arrays the INSERT statements unnest. They travel in
    binary (`%(x)b`): PostgreSQL parsing text timestamps and psycopg formatting them
    cost more than the insert itself (measured: 18 vs 7 µs a row client side, 80 vs
    33 µs wall, 256 rows a statement); a binary array is of one type, so every value is
    a float. Packed by db/arrays.py (what psycopg would send, in under half its time)."""
    if not rows:
        return {"nums": arrays.int4s([]), "ts": arrays.timestamptzs([]), "vals": arrays.float8s([])}
    nums, ts, vals = zip(*rows, strict=True)
    return {
        "nums": arrays.int4s(nums),
        "ts": arrays.timestamptzs(ts),
        "vals": arrays.float8s(vals),  # (struct packs an int as the float it is)
    }


def to_us(ts: datetime) -> int:
    delta = ts - EPOCH
    return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_us(us: int) -> datetime:
    return EPOCH + timedelta(microseconds=us)


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def packed_horizon(now: datetime, compact_after_days: int) -> date:
    """Days before this one may be packed (they are closed)."""
    return now.date() - timedelta(days=compact_after_days)


async def insert_readings(
    conn: AsyncConnection[Any],
    rows: Sequence[RowLike],
    *,
    now: datetime,
    compact_after_days: int,
) -> int:
    """Store rows that are not stored yet; returns how many were new.

    Must run inside the caller's transaction. Rows that fall in a day already packed
    are checked against the packed blob first (under the day's shared lock).
    """
    if not rows:
        return 0
    horizon = packed_horizon(now, compact_after_days) + timedelta(days=1)  # margin
    old = [(num, ts, value) for num, ts, value in rows if ts.date() < horizon]
    packed_days: set[tuple[int, date]] = set()
    if old:
        rows, packed_days = await _drop_already_packed(conn, rows, old)
        if not rows:
            return 0
    fold = [r for r in rows if (r[0], r[1].astimezone(UTC).date()) in packed_days]
    folded = set(fold)
    raw = [r for r in rows if r not in folded] if fold else list(rows)
    n = 0
    for query, part in ((FOLD_SQL, fold), (INSERT_SQL, raw)):
        if part:
            cur = await execute_mending_partitions(conn, query, columns(part), part, savepoint=True)
            got = await cur.fetchone()
            n += int(got[0]) if got else 0
    return n


async def execute_mending_partitions(
    conn: AsyncConnection[Any],
    query: str,
    params: dict[str, Any],
    rows: Sequence[RowLike],
    *,
    savepoint: bool,
) -> AsyncCursor[Any]:
    """Run a statement that writes `rows`. The partitions job runs ahead of time; if it
    fell behind, a reading must still not be refused: create the months it needs and
    run it again. `savepoint` when `conn` is inside a transaction."""
    try:
        if savepoint:
            async with conn.transaction():
                return await conn.execute(query, params)
        return await conn.execute(query, params)
    except errors.CheckViolation as exc:
        if "no partition" not in str(exc):
            raise
    await ensure_month_partitions(conn, {db.month_start(ts.date()) for _, ts, _ in rows})
    return await conn.execute(query, params)


async def ensure_month_partitions(conn: AsyncConnection[Any], months: set[date]) -> None:
    # the owner's function (migration 0011): the app role owns no table to partition
    for table, _is_date in db.PARTITIONED:
        for lo in sorted(months):
            await conn.execute("SELECT opensense_create_partition(%s, %s)", (table, lo))


async def _drop_already_packed(
    conn: AsyncConnection[Any],
    rows: Sequence[RowLike],
    old: Sequence[RowLike],
) -> tuple[list[RowLike], set[tuple[int, date]]]:
    """The rows not in a packed day already, and the (channel, day)s that are packed."""
    days = sorted({ts.date() for _, ts, _ in old})
    for d in days:  # sorted: no lock-order deadlock with another ingest
        await conn.execute(
            "SELECT pg_advisory_xact_lock_shared(%s, %s)", (DAY_LOCK_NS, d.toordinal())
        )
    keys = sorted({(num, ts.date()) for num, ts, _ in old})
    cur = await conn.execute(
        "SELECT channel_num, day, blob FROM measurements_packed"
        " WHERE (channel_num, day) IN (SELECT * FROM unnest(%s::int4[], %s::date[]))",
        ([num for num, _ in keys], [day for _, day in keys]),
    )
    present: dict[int, set[int]] = defaultdict(set)
    packed_days: set[tuple[int, date]] = set()
    for num, day, blob in await cur.fetchall():
        ts, _ = packing.unpack(blob)
        present[num].update(ts)
        packed_days.add((num, day))
    if not present:
        return list(rows), packed_days
    kept = [(num, ts, v) for num, ts, v in rows if to_us(ts) not in present.get(num, ())]
    return kept, packed_days
