"""Rollups off the write path (storage/rollups.py): the job materialises closed
buckets from the raw rows; reads combine them with the raw rows of the rest; a late
reading re-opens its bucket until the job recomputes it; writers racing the job never
make a materialised bucket wrong."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from opensense.api.jsonutil import rfc3339
from opensense.storage import rollups
from opensense.storage.batcher import BatchWriter
from opensense.storage.write import Row, insert_readings

from .fixtures.clock import FakeClock
from .fixtures.server import World
from .test_storage import QUERIES, config, read_all, scalar, send  # noqa: F401

pytestmark = pytest.mark.db


async def table(dsn: str, name: str, num: int) -> dict[datetime, tuple[float, float, float, int]]:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            f"SELECT bucket, vmin, vmax, vsum, n FROM {name} WHERE channel_num = %s", (num,)
        )
        return {b: (lo, hi, s, n) for b, lo, hi, s, n in await cur.fetchall()}


async def materialize(dsn: str, now: datetime) -> str:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        return await rollups.materialize(conn, now)


async def test_a_late_reading_changes_its_materialised_bucket(client, world: World, clock, dsn):
    start = rollups.floor_to(clock.now, timedelta(hours=1)) - timedelta(hours=3)
    times = [start + timedelta(minutes=m) for m in range(0, 120)]
    cid = ""
    for i in range(0, len(times), 32):
        cid = (await send(client, world, times[i : i + 32], offset=i))["channels"][0]["channel_id"]
    num = await scalar(dsn, "SELECT num FROM channels WHERE id = %s", cid)
    frm, to = start - timedelta(hours=1), clock.now
    before = {i: await read_all(client, world, cid, frm, to, **q) for i, q in enumerate(QUERIES)}

    # the job materialises every bucket that closed 5 minutes ago: reads do not move
    await materialize(dsn, clock.now)
    five = await table(dsn, "rollup_5m", num)
    assert sum(n for *_, n in five.values()) == 120 and len(five) == 24
    assert sum(n for *_, n in (await table(dsn, "rollup_1h", num)).values()) == 120
    assert {
        i: await read_all(client, world, cid, frm, to, **q) for i, q in enumerate(QUERIES)
    } == before

    # a late reading into a materialised bucket: logged, read at once, recomputed by the job
    late = start + timedelta(minutes=7, seconds=30)
    body = {"device": "fridge01", "measurements": [
        {"type": "temperature", "label": "", "value": 42.0, "ts": rfc3339(late)}]}  # fmt: skip
    r = await client.post("/v1/ingest", json=body, headers=world.dev_auth("fridge01"))
    assert r.status == 200 and (await r.json())["accepted"] == 1
    assert await scalar(dsn, "SELECT count(*) FROM rollup_invalid WHERE channel_num = %s", num) == 1
    bucket = start + timedelta(minutes=5)
    assert (await table(dsn, "rollup_5m", num))[bucket][1] < 42.0  # the table: not yet
    maxes = await read_all(client, world, cid, frm, to, agg="5m", fn="max")
    assert [rfc3339(bucket), 42.0] in maxes  # the read: already
    counts = await read_all(client, world, cid, frm, to, agg="1d", fn="count")
    assert sum(v for _, v in counts) == 121
    reads = {i: await read_all(client, world, cid, frm, to, **q) for i, q in enumerate(QUERIES)}

    assert "1 late range(s) recomputed" in await materialize(dsn, clock.now)
    assert await scalar(dsn, "SELECT count(*) FROM rollup_invalid") == 0
    lo, hi, _s, n = (await table(dsn, "rollup_5m", num))[bucket]
    assert (hi, n) == (42.0, 6)
    hour = (await table(dsn, "rollup_1h", num))[rollups.floor_to(bucket, timedelta(hours=1))]
    assert (hour[1], hour[3]) == (42.0, 61)
    assert {
        i: await read_all(client, world, cid, frm, to, **q) for i, q in enumerate(QUERIES)
    } == reads


def expected(rows: list[tuple[int, datetime, float]], width: timedelta) -> dict[Any, Any]:
    out: dict[tuple[int, datetime], tuple[float, float, float, int]] = {}
    for num, ts, v in rows:
        k = (num, rollups.floor_to(ts, width))
        lo, hi, s, n = out.get(k, (v, v, 0.0, 0))
        out[k] = (min(lo, v), max(hi, v), s + v, n + 1)
    return out


async def test_writers_racing_the_job_never_make_a_bucket_wrong(new_database):
    """Batches and transactions of readings, some of them late, are written while the
    job moves the threshold and materialises again and again: every materialised
    bucket, and every read, equals the aggregate of the raw rows."""
    dsn = new_database()
    clock = FakeClock(datetime.now(UTC).replace(second=0, microsecond=0))
    rnd = random.Random(14)
    stored: list[tuple[int, datetime, float]] = []
    async with AsyncConnectionPool(dsn, min_size=4, max_size=8, open=False,
                                   kwargs={"autocommit": True}) as pool:  # fmt: skip
        writer = BatchWriter(pool)
        writer.start()
        seen: set[tuple[int, datetime]] = set()

        def reading(near_threshold: bool = False, channel: int = 0) -> Row:
            while True:
                # a fifth are hours late; the rest within the last quarter of an hour, or
                # around the threshold (5 to 10 minutes old)
                back = rnd.uniform(3600, 4 * 3600) if rnd.random() < 0.2 else rnd.uniform(0, 900)
                if near_threshold:
                    back = rnd.uniform(240, 660)
                ts = (clock.now - timedelta(seconds=back)).replace(microsecond=0)
                num = channel or rnd.randint(1, 12)
                if (num, ts) not in seen:
                    seen.add((num, ts))
                    v = rnd.randint(-400, 400) / 16  # exact in binary: sums are exact
                    stored.append((num, ts, v))
                    return Row(num, ts, v)

        async def batches() -> None:
            for _ in range(150):
                await asyncio.gather(*(
                    writer.write([reading() for _ in range(rnd.randint(1, 6))], "dev_x", clock.now)
                    for _ in range(4)
                ))  # fmt: skip

        async def transactions() -> None:
            # slow writers: their rows are in, and still not committed, while the job
            # moves the threshold past them (the job must wait for them)
            for i in range(60):  # a channel each: no other writer's late range heals it
                async with pool.connection() as conn, conn.transaction():
                    rows = [reading(near_threshold=True, channel=100 + i) for _ in range(5)]
                    await insert_readings(conn, rows, now=clock.now, compact_after_days=3)
                    await asyncio.sleep(0.03)

        async def job() -> None:
            for _ in range(40):
                clock.advance(minutes=5)  # the threshold moves every time
                await asyncio.sleep(0.02)
                async with pool.connection() as conn:
                    await rollups.materialize(conn, clock.now)

        await asyncio.gather(batches(), transactions(), job())
        await writer.stop()

        async with pool.connection() as conn:
            # reads, before the rest is materialised: the raw rows' aggregates
            for agg in rollups.WIDTHS:
                got = await rollups.read_buckets(
                    conn,
                    agg,
                    sorted({r[0] for r in stored}),
                    clock.now - timedelta(days=2),
                    clock.now,
                )
                assert {(c, b): tuple(v) for c, b, *v in got} == {
                    k: tuple(v) for k, v in expected(stored, rollups.WIDTHS[agg]).items()
                }, agg
            m_before = await (
                await conn.execute("SELECT materialized FROM rollup_state")
            ).fetchone()
            assert m_before is not None and m_before[0] > clock.now - timedelta(minutes=11)
            # then everything materialised (days included): the tables themselves
            await rollups.materialize(conn, clock.now + timedelta(days=1))
            assert await (await conn.execute("SELECT count(*) FROM rollup_invalid")).fetchone() == (
                0,
            )
            for agg, width in rollups.WIDTHS.items():
                cur = await conn.execute(
                    f"SELECT channel_num, bucket, vmin, vmax, vsum, n FROM {rollups.TABLES[agg]}"
                )
                assert {(c, b): tuple(v) for c, b, *v in await cur.fetchall()} == {
                    k: tuple(v) for k, v in expected(stored, width).items()
                }, agg
    assert len(stored) > 1500
