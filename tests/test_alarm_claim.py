"""The rule engine's claim on its wake-up marks (alarms/evaluator.py CLAIM_SQL) takes
at most its limit, oldest first, each mark once, while writers keep marking and
re-marking the same channels.

Found under the ingest bench's HTTP 32 load (issue 14, stop 38): written as `DELETE …
WHERE channel_num IN (SELECT … LIMIT n FOR UPDATE SKIP LOCKED)`, one claim took 2,048
marks at a limit of 128 and seconds of CPU, the writers waiting on the marks it held.
The subquery could run again within the statement (a row changed since the snapshot
is checked again with the plan, or a plan rescans its inner side) and lock a further
n each time. Which plan PostgreSQL picks depends on its statistics of the moment, so
no test here forces the old statement into it; this one holds the bound under
concurrent re-marking, and that the marks are chosen in a MATERIALIZED CTE, computed
once a statement."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from opensense.alarms.evaluator import CLAIM_SQL
from opensense.db import arrays

pytestmark = pytest.mark.db

MARKS = 400
LIMIT = 16
MARK_SQL = (
    "INSERT INTO alarm_dirty AS d (channel_num, since) SELECT n, %s FROM unnest(%s::int4[]) n"
    " ORDER BY n ON CONFLICT (channel_num) DO UPDATE SET since = excluded.since"
    " WHERE excluded.since < d.since"
)


def test_the_claim_chooses_its_marks_once_a_statement() -> None:
    head = CLAIM_SQL.split("DELETE")[0]
    assert "AS MATERIALIZED (" in head and "LIMIT %(limit)s FOR UPDATE SKIP LOCKED" in head


async def test_a_claim_takes_at_most_its_limit_while_writers_mark_again(new_database: Any) -> None:
    dsn = new_database()  # (its own: marks of channels that are no one's)
    t0 = datetime(2026, 12, 5, tzinfo=UTC)
    nums = list(range(1, MARKS + 1))
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(MARK_SQL, (t0, nums))
    stop = asyncio.Event()

    async def writer(k: int) -> int:
        """Marks every channel again with an ever earlier `since`: each a new row
        version of a mark (or a new mark where the engine took it)."""
        n = 0
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            while not stop.is_set():
                n += 1
                await conn.execute(MARK_SQL, (t0 - timedelta(seconds=2 * n + k), nums))
        return n

    writers = [asyncio.create_task(writer(k)) for k in (0, 1)]
    sizes: list[int] = []
    taken: list[int] = []
    try:
        async with await psycopg.AsyncConnection.connect(dsn) as conn:
            params = {"settled": 0.0, "gap": 0.0, "recent": arrays.int4s([]), "limit": LIMIT}
            for _ in range(60):
                async with conn.transaction():
                    cur = await conn.execute(CLAIM_SQL, params)
                    got = [int(r[0]) for r in await cur.fetchall()]
                    await asyncio.sleep(0.01)  # the pass, holding what it took
                sizes.append(len(got))
                taken += got
    finally:
        stop.set()
        rounds = await asyncio.gather(*writers)
    assert min(rounds) > 3, rounds  # the writers did mark again meanwhile
    assert max(sizes) <= LIMIT, sizes
    assert sum(sizes) > LIMIT * 10, sizes  # (and the claims did take marks)


async def test_the_claim_reads_the_oldest_marks_and_stops_at_its_limit(new_database: Any) -> None:
    """Migration 0034: along the index on `marked_at`, not a scan and sort of every
    mark, and the marks taken deleted by their `ctid` (under HTTP 32's load the claim
    was 12 % of PostgreSQL's time before; docs/ingest-cost.md, stop 39). Most marks
    are of channels judged a moment ago (`recent`), as under a steady stream."""
    dsn = new_database()
    t0 = datetime(2026, 12, 5, tzinfo=UTC)
    nums = list(range(1, 2049))
    params = {"settled": 0.0, "gap": 2.0, "recent": arrays.int4s(nums[:1900]), "limit": 128}
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(MARK_SQL, (t0, nums))
        cur = await conn.execute("EXPLAIN (ANALYZE, COSTS OFF) " + CLAIM_SQL, params)
        plan = "\n".join(str(r[0]) for r in await cur.fetchall())
    # the marks chosen along the index, not sorted, and deleted where they were
    # locked (by channel_num, the plan followed the statistics: with some, every mark
    # was compared with each of the 128 taken)
    assert "Index Scan using alarm_dirty_marked_at on alarm_dirty" in plan, plan
    assert "Sort" not in plan, plan
    assert "Tid Scan on alarm_dirty d" in plan, plan
