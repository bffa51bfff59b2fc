"""The group-commit writer's linger (storage/batcher.py, OPENSENSE_WRITE_LINGER_MS): at
a steady trickle the requests of a moment share one statement, every request still
gets its own answer after the commit (nothing lost, no duplicates); a lone client
waiting for each answer, and a writer without a linger, do not wait."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from opensense.storage.batcher import BatchWriter
from opensense.storage.write import Row

pytestmark = pytest.mark.db


async def rows_of(dsn: str, nums: list[int]) -> list[tuple[int, datetime]]:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT channel_num, ts FROM measurements WHERE channel_num = ANY(%s)"
            " ORDER BY channel_num, ts",
            (nums,),
        )
        return [(int(n), ts) for n, ts in await cur.fetchall()]


def pool_of(dsn: str) -> AsyncConnectionPool:
    return AsyncConnectionPool(dsn, min_size=2, max_size=4, open=False, kwargs={"autocommit": True})


async def trickle(writer: BatchWriter, rows: list[Row], every_s: float) -> list[int]:
    """One request per row, each sent `every_s` after the one before, none waiting
    for another's answer (a fleet's nodes); their answers."""

    async def one(i: int, row: Row) -> int:
        await asyncio.sleep(i * every_s)
        return await writer.write([row], f"dev_{row.channel_num}", datetime.now(UTC))

    return list(await asyncio.gather(*(one(i, r) for i, r in enumerate(rows))))


async def test_a_trickle_shares_statements_and_every_request_gets_its_answer(new_database):
    dsn = new_database()
    t0 = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)
    rows = [Row(9000 + i % 7, t0 + timedelta(seconds=i), float(i)) for i in range(40)]
    async with pool_of(dsn) as pool:
        writer = BatchWriter(pool, linger_ms=200)
        writer.start()
        try:
            assert await trickle(writer, rows, 0.01) == [1] * 40
            first = writer.batches
            # the same readings again: each request is told they were duplicates
            assert await trickle(writer, rows, 0.01) == [0] * 40
        finally:
            await writer.stop()
    # 40 requests 10 ms apart over 0.4 s: a statement per request without the linger,
    # a few with it
    assert first <= 10, f"{first} statements for 40 requests"
    assert writer.lingered > 0
    assert writer.requests == 80
    assert await rows_of(dsn, sorted({r.channel_num for r in rows})) == sorted(
        (r.channel_num, r.ts) for r in rows
    )


async def test_a_client_waiting_for_each_answer_does_not_pay_the_linger(new_database):
    dsn = new_database()
    t0 = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)
    async with pool_of(dsn) as pool:
        writer = BatchWriter(pool, linger_ms=300)
        writer.start()
        try:
            started = time.monotonic()
            for i in range(25):
                got = await writer.write(
                    [Row(9100, t0 + timedelta(seconds=i), 1.0)], "dev_x", datetime.now(UTC)
                )
                assert got == 1
            elapsed = time.monotonic() - started
        finally:
            await writer.stop()
    # lingering gathers nothing for it: after the first try, one try a second at most
    # (lingering every time would be 24 lingers, 7 s)
    assert writer.lingered <= 2 + elapsed, (writer.lingered, elapsed)
    assert writer.batches == 25
    assert len(await rows_of(dsn, [9100])) == 25


async def test_no_linger_no_waiting(new_database):
    dsn = new_database()
    t0 = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)
    rows = [Row(9200 + i % 3, t0 + timedelta(seconds=i), 2.0) for i in range(30)]
    async with pool_of(dsn) as pool:
        writer = BatchWriter(pool)
        writer.start()
        try:
            assert await trickle(writer, rows, 0.005) == [1] * 30
        finally:
            await writer.stop()
    assert writer.lingered == 0
    assert len(await rows_of(dsn, [9200, 9201, 9202])) == 30


async def test_stopping_while_lingering_fails_the_waiting_requests(new_database):
    dsn = new_database()
    t0 = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)
    rows = [Row(9300, t0 + timedelta(seconds=i), 1.0) for i in range(6)]
    async with pool_of(dsn) as pool:
        writer = BatchWriter(pool, linger_ms=3000)
        writer.start()
        # the first goes alone (nothing came before it: no linger), the others wait in one
        assert await writer.write(rows[:1], "dev_x", datetime.now(UTC)) == 1
        sent = asyncio.gather(trickle(writer, rows[1:], 0.01), return_exceptions=True)
        await asyncio.sleep(0.5)
        assert writer.batches == 1 and writer.lingered == 0 and not sent.done()
        await writer.stop()
        (rest,) = await sent
    assert isinstance(rest, RuntimeError) and "server stopping" in str(rest)
    # not stored, so not acknowledged: their senders send them again
    assert len(await rows_of(dsn, [9300])) == 1


async def test_requests_sharing_a_statement_each_count_their_own_new_readings(new_database):
    """One statement for three requests that overlap each other and readings stored
    before: the first request to carry a reading owns it, a reading stored before is
    new to none, and the table holds each reading once."""
    dsn = new_database()
    t0 = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)
    a = [Row(9100, t0 + timedelta(seconds=i), 1.0) for i in range(3)]  # stored first
    b = [Row(9101, t0 + timedelta(seconds=i), 2.0) for i in range(2)]
    c = [Row(9102, t0, 3.0)]
    async with pool_of(dsn) as pool:
        writer = BatchWriter(pool, writers=1)
        writer.start()
        try:
            assert await writer.write(a, "dev_a", datetime.now(UTC)) == 3
            before = writer.batches
            answers = await asyncio.gather(
                writer.write([a[0], b[0], b[1]], "dev_1", datetime.now(UTC)),
                writer.write([b[1], c[0]], "dev_2", datetime.now(UTC)),
                writer.write([a[1], a[2], a[1]], "dev_3", datetime.now(UTC)),
            )
        finally:
            await writer.stop()
    assert writer.batches == before + 1  # (the three shared one statement)
    assert answers == [2, 1, 0]
    assert await rows_of(dsn, [9100, 9101, 9102]) == sorted(
        (r.channel_num, r.ts) for r in a + b + c
    )
