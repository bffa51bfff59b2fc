"""The batch writer's statement and the rule engine's wake-up (storage/write.py
DIRTY_SQL): a channel already dirty keeps its row unless a reading moves its `since`
earlier, and that row stays locked by the writer until its commit, as an update would
have locked it, so an evaluator's claim never takes a channel whose new readings it
cannot see yet."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from psycopg_pool import AsyncConnectionPool

from opensense.db import arrays
from opensense.storage.batcher import BatchWriter
from opensense.storage.write import Row, columns, insert_readings

from .fixtures.server import as_one_batch

pytestmark = pytest.mark.db

# the evaluator's claim (alarms/evaluator.py evaluate_dirty)
CLAIM_SQL = (
    "DELETE FROM alarm_dirty WHERE channel_num IN (SELECT channel_num FROM alarm_dirty"
    " ORDER BY marked_at LIMIT 128 FOR UPDATE SKIP LOCKED) RETURNING channel_num, since"
)
NUM = 7


@pytest.fixture
async def pool(new_database: Any) -> AsyncIterator[AsyncConnectionPool]:
    dsn = new_database()
    async with AsyncConnectionPool(
        dsn, min_size=2, max_size=4, open=False, kwargs={"autocommit": True}
    ) as p:
        yield p


# One base for the module: a base read from the clock at each call moved by a minute
# when a test ran across a minute's turn, and its assertions compared two instants
BASE = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(hours=1)


def at(minutes: float) -> datetime:
    return BASE + timedelta(minutes=minutes)


async def dirty_row(pool: AsyncConnectionPool) -> tuple[datetime, str, datetime] | None:
    """(since, ctid, marked_at) of NUM's alarm_dirty row."""
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT since, ctid::text, marked_at FROM alarm_dirty WHERE channel_num = %s", (NUM,)
        )
        row = await cur.fetchone()
    return None if row is None else (row[0], row[1], row[2])


async def test_since_moves_earlier_only_and_a_later_reading_leaves_the_row_as_it_is(pool):
    writer = BatchWriter(pool)
    writer.start()
    try:
        t = at(30)
        assert await writer.write([Row(NUM, t, 4.0)], "dev_x", t) == 1
        first = await dirty_row(pool)
        assert first is not None and first[0] == t

        # later readings: the row is not rewritten (same version, same marked_at)
        assert await writer.write([Row(NUM, at(31), 4.5), Row(NUM, at(32), 5.0)], "dev_x", t) == 2
        assert await dirty_row(pool) == first

        # a late reading moves since back to it
        assert await writer.write([Row(NUM, at(10), 3.0), Row(NUM, at(40), 3.5)], "dev_x", t) == 2
        moved = await dirty_row(pool)
        assert moved is not None and moved[0] == at(10) and moved[2] == first[2]

        # a resent reading is no new reading: it marks nothing
        async with pool.connection() as conn:
            await conn.execute(CLAIM_SQL)
        assert await writer.write([Row(NUM, at(5), 9.9), Row(NUM, at(10), 3.0)], "dev_x", t) == 1
        again = await dirty_row(pool)
        assert again is not None and again[0] == at(5)
        async with pool.connection() as conn:
            await conn.execute(CLAIM_SQL)
        assert await writer.write([Row(NUM, at(5), 9.9)], "dev_x", t) == 0
        assert await dirty_row(pool) is None
    finally:
        await writer.stop()


async def test_a_claim_skips_a_dirty_row_whose_writer_has_not_committed(pool):
    """The writer's reading is later than the row's since (no update), yet the row is
    locked until its commit: the evaluator's claim, which would read the channel's
    readings at once, must not take it before the reading is visible."""
    async with pool.connection() as conn:
        await insert_readings(conn, [Row(NUM, at(20), 1.0)], now=at(60), compact_after_days=3)
    before = await dirty_row(pool)
    assert before is not None and before[0] == at(20)
    async with pool.connection() as writing, writing.transaction():
        n = await insert_readings(
            writing, [Row(NUM, at(25), 2.0)], now=at(60), compact_after_days=3
        )
        assert n == 1
        async with pool.connection() as evaluator:
            claimed = await (await evaluator.execute(CLAIM_SQL)).fetchall()
        assert claimed == []  # locked by the writer: left for the next pass
    async with pool.connection() as evaluator:
        claimed = await (await evaluator.execute(CLAIM_SQL)).fetchall()
    assert claimed == [(NUM, at(20))]


async def test_a_writer_waits_for_a_claim_in_progress_and_marks_the_channel_again(pool):
    """An evaluator has claimed (deleted, not committed) the channel's row; a later
    reading's writer waits for that pass and, once it commits, makes the channel dirty
    again from its reading: the pass could not have seen it."""
    writer = BatchWriter(pool)
    writer.start()
    try:
        assert await writer.write([Row(NUM, at(20), 1.0)], "dev_x", at(60)) == 1
        async with pool.connection() as evaluator:
            async with evaluator.transaction():
                claimed = await (await evaluator.execute(CLAIM_SQL)).fetchall()
                assert claimed == [(NUM, at(20))]
                write = asyncio.create_task(writer.write([Row(NUM, at(26), 2.0)], "dev_x", at(60)))
                done, _ = await asyncio.wait({write}, timeout=0.5)
                assert not done  # waiting for the claim's transaction
            assert await write == 1
        after = await dirty_row(pool)
        assert after is not None and after[0] == at(26)
    finally:
        await writer.stop()


async def _stored(pool: AsyncConnectionPool, num: int) -> list[tuple[datetime, float]]:
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT ts, value FROM measurements WHERE channel_num = %s ORDER BY ts", (num,)
        )
        return [(ts, v) for ts, v in await cur.fetchall()]


async def test_a_batch_with_a_resent_reading_is_written_again_with_on_conflict(pool):
    """A batch's first statement has no ON CONFLICT: a reading stored already makes the
    primary key refuse it whole, and the batch runs again as BATCH_SQL. Every request
    gets its own count, each reading is stored once, and the wake-up of the new ones
    is kept (nothing of the failed statement)."""
    writer = BatchWriter(pool)
    writer.start()
    try:
        t0, t1, t2 = at(10), at(11), at(12)
        assert await writer.write([Row(NUM, t0, 4.0), Row(NUM + 1, t0, 5.0)], "dev_x", t0) == 2
        assert writer.resent == 0  # all new: one statement
        async with pool.connection() as conn:
            await conn.execute("DELETE FROM alarm_dirty")
        # one batch of three requests (queued together): a resend among new readings
        got = await asyncio.gather(
            writer.write([Row(NUM, t1, 4.5)], "dev_x", t1),
            writer.write([Row(NUM, t0, 9.9), Row(NUM + 1, t1, 5.5)], "dev_y", t1),
            writer.write([Row(NUM + 1, t2, 6.0)], "dev_z", t2),
        )
        assert got == [1, 1, 1]
        assert writer.resent >= 1
        assert await _stored(pool, NUM) == [(t0, 4.0), (t1, 4.5)]  # the first 4.0 kept
        assert await _stored(pool, NUM + 1) == [(t0, 5.0), (t1, 5.5), (t2, 6.0)]
        async with pool.connection() as conn:
            cur = await conn.execute("SELECT channel_num, since FROM alarm_dirty ORDER BY 1")
            assert await cur.fetchall() == [(NUM, t1), (NUM + 1, t1)]
    finally:
        await writer.stop()


async def test_two_writers_with_the_same_reading_store_it_once(pool):
    """The same new reading in two batches written at once (two writers): the second
    insert waits for the first's commit, is refused by the primary key and runs again
    with ON CONFLICT: stored once, one request told it was new and one a duplicate."""
    t = at(20)
    for round_ in range(5):
        a, b = BatchWriter(pool, writers=1), BatchWriter(pool, writers=1)
        a.start()
        b.start()
        try:
            ts = t + timedelta(seconds=round_)
            got = await asyncio.gather(
                a.write([Row(NUM, ts, 4.0)], "dev_x", ts), b.write([Row(NUM, ts, 4.0)], "dev_x", ts)
            )
        finally:
            await a.stop()
            await b.stop()
        assert sorted(got) == [0, 1]
    assert [ts for ts, _ in await _stored(pool, NUM)] == [
        t + timedelta(seconds=i) for i in range(5)
    ]


async def test_with_the_database_away_a_batch_fails_whole_at_once(pool):
    """A batch that fails because the database is away is not retried request by
    request (each would wait for the pool's timeout in turn): every request gets the
    error of the one attempt."""
    from psycopg_pool import PoolClosed

    await pool.close()
    writer = BatchWriter(pool, writers=1)
    t = at(40)
    done = await as_one_batch(
        writer, [writer.write([Row(NUM, t, 4.0)], "dev_x", t) for _ in range(3)]
    )
    assert all(isinstance(d, PoolClosed) for d in done), done
    assert writer.attempts == 1


async def test_the_packed_arrays_are_what_psycopg_sends_and_read_back_as_given(pool):
    """db/arrays.py packs the three columns itself: byte for byte psycopg's own binary
    arrays (other offsets, the int4 range's ends, negative and repeated values, a time
    before 2000, the empty array), and PostgreSQL reads them back as given."""
    from psycopg.adapt import PyFormat, Transformer

    est = timezone(timedelta(hours=-5))
    rows = [
        (-(2**31), BASE, -40.25),
        (2**31 - 1, BASE.astimezone(est), 0.0),
        (7, BASE, 1e-300),
        (7, datetime(1999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC), -0.0),
        (8, BASE + timedelta(microseconds=1), 4),  # an int value: the float it is
    ]
    async with pool.connection() as conn:
        tx = Transformer(conn)
        nums, times, values = (list(c) for c in zip(*rows, strict=True))
        wanted = (nums, times, [float(v) for v in values])  # (psycopg's dumper: one type)
        for got, want, cast in zip(
            columns(rows).values(), wanted, ("int4", "timestamptz", "float8"), strict=True
        ):
            assert got == tx.get_dumper(want, PyFormat.BINARY).dump(want)
            cur = await conn.execute(f"SELECT %b::{cast}[]", (got,))
            assert (await cur.fetchone()) == (want,)
        for empty in columns([]).values():
            cur = await conn.execute("SELECT cardinality(%b)", (empty,))
            assert (await cur.fetchone()) == (0,)
    with pytest.raises(OverflowError):
        arrays.int4s([2**31])
    with pytest.raises(TypeError):  # a naive time has no instant
        arrays.timestamptzs([datetime(2026, 1, 1)])  # noqa: DTZ001


async def test_the_packed_text_and_int8_arrays_of_the_authentication_statement(pool):
    """The authentication statement's arrays (ingest/authbatch.py): text (non-ASCII,
    empty, characters the text format would quote) and int8 with NULLs, byte for byte
    psycopg's, read back as given."""
    from psycopg.adapt import PyFormat, Transformer
    from psycopg.types.numeric import Int8

    words = ["k0abc", "", "é ü 温度", 'a "quoted", {braced} \\ word']
    revs = [None, 2**62, -5, 0]
    async with pool.connection() as conn:
        tx = Transformer(conn)
        as_int8 = [None if v is None else Int8(v) for v in revs]  # (psycopg: the smallest type)
        assert arrays.texts(words) == tx.get_dumper(words, PyFormat.BINARY).dump(words)
        assert arrays.int8s(revs) == tx.get_dumper(as_int8, PyFormat.BINARY).dump(as_int8)
        cur = await conn.execute(
            "SELECT %b::text[], %b::int8[], %b::int8[]",
            (arrays.texts(words), arrays.int8s(revs), arrays.int8s([None])),
        )
        assert (await cur.fetchone()) == (words, revs, [None])


async def test_the_packed_jsonb_and_nullable_time_arrays_of_the_rule_engines_save(pool):
    """The rule engine's save (alarms/evaluator.py `save`): jsonb arrays (quotes,
    backslashes, non-ASCII, NULLs, a lone NULL) and timestamptz arrays with NULLs (other
    offsets, a time before 2000), byte for byte psycopg's, read back as given."""
    from psycopg.adapt import PyFormat, Transformer
    from psycopg.types.json import Jsonb

    from opensense.alarms.evaluator import _json_text

    est = timezone(timedelta(hours=-5))
    docs = [{'rul_"x\\': {"hist": [["t", 1e-7]], "v": -0.0}}, None, {"k": "Kühl ❄"}, [], {}]
    times = [BASE.astimezone(est), None, datetime(1999, 12, 31, 23, 59, tzinfo=UTC), None]
    async with pool.connection() as conn:
        tx = Transformer(conn)
        wrapped = [None if d is None else Jsonb(d) for d in docs]
        packed = arrays.jsonbs([_json_text(j) for j in wrapped])
        assert packed == tx.get_dumper(wrapped, PyFormat.BINARY).dump(wrapped)
        assert arrays.opt_timestamptzs(times) == tx.get_dumper(times, PyFormat.BINARY).dump(times)
        assert arrays.opt_timestamptzs(times[:1]) == arrays.timestamptzs(times[:1])
        cur = await conn.execute(
            "SELECT %b::jsonb[], %b::timestamptz[], %b::jsonb[], %b::timestamptz[]",
            (
                packed,
                arrays.opt_timestamptzs(times),
                arrays.jsonbs([None]),
                arrays.opt_timestamptzs([None]),
            ),
        )
        assert (await cur.fetchone()) == (docs, times, [None], [None])
