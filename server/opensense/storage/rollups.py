"""Rollups (min, max, sum, count per channel and 5-minute, 1-hour and 1-day bucket)
kept off the write path, the way TimescaleDB keeps its continuous aggregates.

Writers store raw readings only. The `rollups` job (`materialize`) writes the rollup
tables from the raw rows, for buckets that closed a few minutes ago; a read
(`buckets_sql`) combines the materialised buckets with buckets computed from the raw
rows at read time, so it answers what the old inline upserts answered, to the last
reading. The state (migration 0025) is one row:

* `materialized` (M): every bucket that ends at or before M is in the rollup tables,
  except the buckets a pending late range touches (below);
* `threshold` (T >= M): a reading stored with a time before T is late. Its writer
  logs the channel's range in `rollup_invalid` in the same transaction; reads
  compute the buckets it touches from the raw rows; the job recomputes them (from the
  raw rows: a recompute is idempotent, so a range logged twice costs time, never a
  wrong number) and deletes the range.

The job moves T first, in a transaction of its own, then waits until every
transaction that was writing when T moved has ended (it takes WRITER_LOCK, which
every writing statement takes shared and holds to its commit), then materialises
[M, T) from the raw rows with a snapshot that sees them all. A writing statement
reads T through `rollup_writer_threshold()` (migration 0025), a VOLATILE function
whose read takes its own snapshot after the lock is held: either the writer holds
the lock while the job waits (the job then sees its rows), or it took the lock after
the job moved T and reads the new T (and logs its rows before it, `LATE_CTE`). (A
transaction id cannot stand in for the lock: a snapshot lists only the running
transactions older than the newest finished one.)

Packed days (storage/compaction.py) are never recomputed: compaction packs only days
before M and first recomputes the day's pending ranges under its day lock, and a late
reading into a packed day is folded into the rollups by its writer
(storage/write.py), as all readings were before.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from psycopg import AsyncConnection, errors

log = logging.getLogger(__name__)

EPOCH = datetime(2000, 1, 1, tzinfo=UTC)  # date_bin's origin: UTC-aligned buckets
FIVE = timedelta(minutes=5)
# T trails the clock by 5 to 10 minutes: a reading that arrives within 5 minutes of
# its time is never late (a node sends once a minute; its buffer drains in seconds).
LAG = timedelta(minutes=5)
WIDTHS = {"5m": timedelta(minutes=5), "1h": timedelta(hours=1), "1d": timedelta(days=1)}
TABLES = {"5m": "rollup_5m", "1h": "rollup_1h", "1d": "rollup_1d"}
CHUNK = timedelta(days=1)  # [M, T) is materialised a day at most per transaction
WAIT_WRITERS_S = 30.0  # longer than any ingest transaction; else the next run goes on
ROLLUP_LOCK = (7262003, 1)  # one materialiser at a time (pg_try_advisory_lock)
WRITER_LOCK = (7262003, 2)  # rollup_writer_threshold() takes it shared (see above)
INVALID_BATCH = 2000

# The late part of the rows a writing statement inserted (`ins`), logged by that
# statement: per channel and UTC day (a range never spans a day that may be packed),
# the range of its rows before the threshold as `rollup_writer_threshold()` answers it
# (migration 0025: after the writers' lock is held). No statement of its own, no
# clock: a fresh reading costs one function call a statement.
LATE_CTE = """
, th AS (SELECT rollup_writer_threshold() AS t)
, late AS (
  INSERT INTO rollup_invalid (channel_num, lo, hi)
  SELECT ins.channel_num, min(ins.ts), max(ins.ts) FROM ins, th WHERE ins.ts < th.t
  GROUP BY ins.channel_num, date_bin('1 day', ins.ts, timestamptz '2000-01-01T00:00:00Z')
  ORDER BY 1, 2
)"""


def floor_to(ts: datetime, width: timedelta) -> datetime:
    return EPOCH + (ts - EPOCH) // width * width


def _w(agg: str) -> str:
    return {"5m": "'5 minutes'", "1h": "'1 hour'", "1d": "'1 day'"}[agg] + "::interval"


def buckets_sql(agg: str) -> str:
    """One statement (one snapshot) answering (channel_num, bucket, vmin, vmax, vsum,
    n) for the channels %(nums)s and the buckets that start in [%(lo)s, %(hi)s),
    ordered by channel and bucket, exactly as if every bucket were materialised:

    * clean buckets (ending by M, no pending late range) from the rollup table;
    * the others from the raw rows of their dirty 5-minute buckets (after M, or
      touched by a pending late range) plus the clean 5-minute rollups inside them.

    Every part is an index range: the head after M, or the span of the pending late
    ranges (none: nothing read), so a 13-month read costs its clean buckets and the
    last few hours, not 13 months of 5-minute rows.
    """
    w, table = _w(agg), TABLES[agg]
    m, wm, ia, iz = (f"(SELECT {c} FROM b)" for c in ("m", "wm", "ia", "iz"))
    in_inv_5m = (
        "EXISTS (SELECT 1 FROM inv WHERE inv.channel_num = {t}.channel_num"
        " AND inv.a <= {ts} AND inv.z >= date_bin('5 minutes', {ts}, %(epoch)s))"
    )
    in_range = (
        "date_bin({w}, {ts}, %(epoch)s) >= %(lo)s AND date_bin({w}, {ts}, %(epoch)s) < %(hi)s"
    )
    raw_cols = (
        f"SELECT x.channel_num, date_bin({w}, x.ts, %(epoch)s) AS bucket, min(x.value) AS vmin,"
        " max(x.value) AS vmax, sum(x.value) AS vsum, count(*) AS n FROM measurements x"
    )
    parts = f"""
  {raw_cols}
  WHERE x.channel_num = ANY(%(nums)s) AND x.ts >= %(lo)s AND x.ts >= {m}
    AND x.ts < %(hi)s::timestamptz + {w} AND {in_range.format(w=w, ts="x.ts")}
  GROUP BY 1, 2
  UNION ALL
  {raw_cols}
  WHERE x.channel_num = ANY(%(nums)s) AND x.ts >= %(lo)s AND x.ts >= {ia}
    AND x.ts < {m} AND x.ts < {iz} + '5 minutes'::interval
    AND {in_range.format(w=w, ts="x.ts")} AND {in_inv_5m.format(t="x", ts="x.ts")}
  GROUP BY 1, 2"""
    if agg != "5m":
        five = f"""
  SELECT r.channel_num, date_bin({w}, r.bucket, %(epoch)s), r.vmin, r.vmax, r.vsum, r.n
  FROM rollup_5m r
  WHERE r.channel_num = ANY(%(nums)s) AND r.bucket >= %(lo)s AND r.bucket < {m}
    AND {in_range.format(w=w, ts="r.bucket")}
    AND NOT {in_inv_5m.format(t="r", ts="r.bucket")}"""
        parts += f"""
  UNION ALL{five} AND r.bucket >= {wm}
  UNION ALL{five} AND r.bucket < {wm}
    AND r.bucket >= date_bin({w}, {ia}, %(epoch)s) AND r.bucket < {iz} + {w}
    AND EXISTS (SELECT 1 FROM inv WHERE inv.channel_num = r.channel_num
                AND inv.a < date_bin({w}, r.bucket, %(epoch)s) + {w}
                AND inv.z >= date_bin({w}, r.bucket, %(epoch)s))"""
    return f"""
WITH inv AS MATERIALIZED (
  SELECT i.channel_num, date_bin('5 minutes', i.lo, %(epoch)s) AS a, i.hi AS z
  FROM rollup_invalid i
  WHERE i.channel_num = ANY(%(nums)s) AND i.hi >= %(lo)s AND i.lo < %(hi)s::timestamptz + {w}
), b AS MATERIALIZED (
  SELECT materialized AS m, date_bin({w}, materialized, %(epoch)s) AS wm,
         (SELECT min(a) FROM inv) AS ia, (SELECT max(z) FROM inv) AS iz
  FROM rollup_state
)
SELECT r.channel_num, r.bucket, r.vmin, r.vmax, r.vsum, r.n::int8
FROM {table} r
WHERE r.channel_num = ANY(%(nums)s) AND r.bucket >= %(lo)s AND r.bucket < %(hi)s
  AND r.bucket < {wm}
  AND NOT EXISTS (SELECT 1 FROM inv WHERE inv.channel_num = r.channel_num
                  AND inv.a < r.bucket + {w} AND inv.z >= r.bucket)
UNION ALL
SELECT channel_num, bucket, min(vmin), max(vmax), sum(vsum), sum(n)::int8
FROM ({parts}
) p
GROUP BY 1, 2
ORDER BY 1, 2"""


def buckets_params(nums: Sequence[int], lo: datetime, hi: datetime) -> dict[str, Any]:
    return {"nums": list(nums), "lo": lo, "hi": hi, "epoch": EPOCH}


async def read_buckets(
    conn: AsyncConnection[Any], agg: str, nums: Sequence[int], lo: datetime, hi: datetime
) -> list[tuple[int, datetime, float, float, float, int]]:
    """(channel_num, bucket, vmin, vmax, vsum, n) of buckets starting in [lo, hi)."""
    cur = await conn.execute(buckets_sql(agg), buckets_params(nums, lo, hi))
    return [
        (int(c), b, float(a), float(z), float(s), int(n))
        for c, b, a, z, s, n in await cur.fetchall()
    ]


# --- the job ---------------------------------------------------------------------

_REPLACE = """
ON CONFLICT (channel_num, bucket) DO UPDATE SET vmin = excluded.vmin,
  vmax = excluded.vmax, vsum = excluded.vsum, n = excluded.n"""

# [lo, hi) of every channel from the raw rows (a BRIN index on ts finds them)
RANGE_5M_SQL = (
    """
INSERT INTO rollup_5m AS r (channel_num, bucket, vmin, vmax, vsum, n)
SELECT channel_num, date_bin('5 minutes', ts, %(epoch)s), min(value), max(value), sum(value),
       count(*)::int4
FROM measurements WHERE ts >= %(lo)s AND ts < %(hi)s
GROUP BY 1, 2 ORDER BY 1, 2"""
    + _REPLACE
)


def _regroup_sql(agg: str, source: str, where: str) -> str:
    """`source` names the finer rollup `s`."""
    w = _w(agg)
    return (
        f"""
INSERT INTO {TABLES[agg]} AS r (channel_num, bucket, vmin, vmax, vsum, n)
SELECT s.channel_num, date_bin({w}, s.bucket, %(epoch)s), min(s.vmin), max(s.vmax), sum(s.vsum),
       sum(s.n)::int4
FROM {source} WHERE {where}
GROUP BY 1, 2 ORDER BY 1, 2"""
        + _REPLACE
    )


# whole 1-hour (1-day) buckets in [lo, hi) of every channel from the 5-minute
# (1-hour) rollups
RANGE_SQL = {
    "1h": _regroup_sql("1h", "rollup_5m s", "s.bucket >= %(lo)s AND s.bucket < %(hi)s"),
    "1d": _regroup_sql("1d", "rollup_1h s", "s.bucket >= %(lo)s AND s.bucket < %(hi)s"),
}

# the same for given (channel, lo, hi) ranges (disjoint per channel, bucket-aligned)
_GIVEN = (
    "unnest(%(nums)s::int4[], %(los)s::timestamptz[], %(his)s::timestamptz[]) AS g(num, lo, hi)"
)
GIVEN_5M_SQL = (
    f"""
INSERT INTO rollup_5m AS r (channel_num, bucket, vmin, vmax, vsum, n)
SELECT x.channel_num, date_bin('5 minutes', x.ts, %(epoch)s), min(x.value), max(x.value),
       sum(x.value), count(*)::int4
FROM {_GIVEN} JOIN measurements x ON x.channel_num = g.num AND x.ts >= g.lo AND x.ts < g.hi
GROUP BY 1, 2 ORDER BY 1, 2"""
    + _REPLACE
)
GIVEN_SQL = {
    "1h": _regroup_sql(
        "1h",
        f"{_GIVEN} JOIN rollup_5m s ON s.channel_num = g.num",
        "s.bucket >= g.lo AND s.bucket < g.hi",
    ),
    "1d": _regroup_sql(
        "1d",
        f"{_GIVEN} JOIN rollup_1h s ON s.channel_num = g.num",
        "s.bucket >= g.lo AND s.bucket < g.hi",
    ),
}


async def materialize(
    conn: AsyncConnection[Any], now: datetime, wait_s: float = WAIT_WRITERS_S
) -> str:
    """The `rollups` job: move T to (now - LAG) floored to 5 minutes, wait for the
    writers that may not have seen it, materialise [M, T), recompute pending late
    ranges. `conn` in autocommit mode. Safe to run at any time, from any process
    (one at a time: the others return at once)."""
    got = await (await conn.execute("SELECT pg_try_advisory_lock(%s, %s)", ROLLUP_LOCK)).fetchone()
    if not got or not got[0]:
        return "another process is materialising"
    try:
        return await _materialize(conn, now, wait_s)
    finally:
        await conn.execute("SELECT pg_advisory_unlock(%s, %s)", ROLLUP_LOCK)


async def _materialize(conn: AsyncConnection[Any], now: datetime, wait_s: float) -> str:
    target = floor_to(now, FIVE) - LAG
    cur = await conn.execute(
        "UPDATE rollup_state SET threshold = greatest(threshold, %s) RETURNING threshold, materialized",
        (target,),
    )
    row = await cur.fetchone()
    assert row is not None
    t, m = row
    if not await _wait_for_writers(conn, wait_s):
        return f"writers still open after {wait_s:.0f} s: materialised up to {m.isoformat()} (threshold {t.isoformat()})"
    chunks = 0
    while m < t:
        upto = min(t, m + CHUNK)
        probe = await conn.execute(
            "SELECT EXISTS (SELECT 1 FROM measurements WHERE ts >= %s AND ts < %s)", (m, t)
        )
        has = await probe.fetchone()
        if has is not None and not has[0]:
            upto = t  # nothing raw left to materialise: jump
        async with conn.transaction():
            p = {"lo": m, "hi": upto, "epoch": EPOCH}
            await conn.execute(RANGE_5M_SQL, p)
            for agg in ("1h", "1d"):
                lo, hi = floor_to(m, WIDTHS[agg]), floor_to(upto, WIDTHS[agg])
                if lo < hi:
                    await conn.execute(RANGE_SQL[agg], {"lo": lo, "hi": hi, "epoch": EPOCH})
            await conn.execute("UPDATE rollup_state SET materialized = %s", (upto,))
        m = upto
        chunks += 1
    late = await recompute_invalid(conn, m)
    return (
        f"materialised up to {m.isoformat()} ({chunks} chunk(s)); {late} late range(s) recomputed"
    )


async def _wait_for_writers(conn: AsyncConnection[Any], wait_s: float) -> bool:
    """Wait until every transaction holding WRITER_LOCK now has ended (False: not
    within `wait_s`)."""
    try:
        async with conn.transaction():
            await conn.execute(f"SET LOCAL lock_timeout = '{int(wait_s * 1000)}ms'")
            await conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", WRITER_LOCK)
    except errors.LockNotAvailable:
        return False
    return True


def merge_ranges(
    entries: Sequence[tuple[int, datetime, datetime]], width: timedelta, before: datetime
) -> dict[str, list[Any]]:
    """Late entries (channel, lo, hi) as disjoint bucket-aligned [lo, hi) ranges of
    `width` per channel, cut at `before` (buckets ending after it are not
    materialised: nothing to recompute there)."""
    by_num: dict[int, list[tuple[datetime, datetime]]] = defaultdict(list)
    for num, lo, hi in entries:
        a, z = floor_to(lo, width), floor_to(hi, width) + width
        z = min(z, floor_to(before, width))
        if a < z:
            by_num[num].append((a, z))
    out: dict[str, list[Any]] = {"nums": [], "los": [], "his": []}
    for num in sorted(by_num):
        spans = sorted(by_num[num])
        cur_a, cur_z = spans[0]
        for a, z in spans[1:] + [
            (datetime.max.replace(tzinfo=UTC), datetime.max.replace(tzinfo=UTC))
        ]:
            if a <= cur_z:
                cur_z = max(cur_z, z)
                continue
            out["nums"].append(num)
            out["los"].append(cur_a)
            out["his"].append(cur_z)
            cur_a, cur_z = a, z
    return out


async def recompute_ranges(
    conn: AsyncConnection[Any], entries: Sequence[tuple[int, datetime, datetime]], m: datetime
) -> None:
    """Recompute the materialised buckets (ending by `m`) that late entries touch:
    5-minute ones from the raw rows, then the 1-hour and 1-day ones around them.
    Inside the caller's transaction."""
    for agg, sql in (("5m", GIVEN_5M_SQL), ("1h", GIVEN_SQL["1h"]), ("1d", GIVEN_SQL["1d"])):
        given = merge_ranges(entries, WIDTHS[agg], m)
        if given["nums"]:
            await conn.execute(sql, {**given, "epoch": EPOCH})


async def recompute_invalid(conn: AsyncConnection[Any], m: datetime) -> int:
    """Recompute and delete the pending late ranges, a batch per transaction."""
    done = 0
    while True:
        async with conn.transaction():
            cur = await conn.execute(
                "SELECT id, channel_num, lo, hi FROM rollup_invalid ORDER BY id"
                " LIMIT %s FOR UPDATE SKIP LOCKED",
                (INVALID_BATCH,),
            )
            rows = await cur.fetchall()
            if not rows:
                return done
            await recompute_ranges(conn, [(n, lo, hi) for _, n, lo, hi in rows], m)
            await conn.execute(
                "DELETE FROM rollup_invalid WHERE id = ANY(%s)", ([r[0] for r in rows],)
            )
        done += len(rows)
        if len(rows) < INVALID_BATCH:
            return done
