"""Storage: rollups, compaction of closed days (reads answer the same), late readings
into packed days, pagination, partitions and retention."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from opensense import db
from opensense.api.jsonutil import rfc3339
from opensense.settings import Config
from opensense.storage.compaction import compact, enforce_retention

from .fixtures.server import World

pytestmark = pytest.mark.db


@pytest.fixture
def dsn(new_database: Any) -> str:
    """A database of each test's own (not the session's): compaction packs the closed
    days of every channel in the database, so another test's old readings there were
    counted too (seen in the suite: `moved` 3,600 for this module's 2,880)."""
    return str(new_database())


def day_start(days_ago: int, now: datetime) -> datetime:
    d = (now - timedelta(days=days_ago)).date()
    return datetime(d.year, d.month, d.day, tzinfo=UTC)


def fridge(i: int) -> float:
    return round((3.5 + 1.5 * math.sin(i / 37)) * 16) / 16


async def send(
    client: Any, world: World, times: list[datetime], label: str = "", offset: int = 0
) -> dict:
    body = {
        "device": "fridge01",
        "measurements": [
            {"type": "temperature", "label": label, "value": fridge(offset + i), "ts": rfc3339(t)}
            for i, t in enumerate(times)
        ],
    }
    r = await client.post("/v1/ingest", json=body, headers=world.dev_auth("fridge01"))
    assert r.status == 200, await r.text()
    return dict(await r.json())


async def fill(client: Any, world: World, start: datetime, minutes: int, step: int = 1) -> str:
    times = [start + timedelta(minutes=m) for m in range(0, minutes, step)]
    cid = ""
    for i in range(0, len(times), 32):
        ans = await send(client, world, times[i : i + 32], offset=i)
        cid = ans["channels"][0]["channel_id"]
    return cid


async def read_all(
    client: Any, world: World, cid: str, frm: datetime, to: datetime, **q: Any
) -> list:
    out: list = []
    cursor = None
    while True:
        params = {"from": rfc3339(frm), "to": rfc3339(to), **q}
        if cursor:
            params["cursor"] = cursor
        r = await client.get(f"/v1/channels/{cid}/measurements", params=params, headers=world.auth)
        assert r.status == 200, await r.text()
        page = await r.json()
        out += page["data"]
        if not page["has_more"]:
            return out
        cursor = page["next_cursor"]


async def scalar(dsn: str, q: str, *args: Any) -> Any:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        row = await (await conn.execute(q, args)).fetchone()
        return row[0] if row else None


@pytest.fixture
def config(clock: Any) -> Config:
    from .fixtures.server import test_config

    return test_config(
        clock, ingest_rate_per_min=100_000, read_rate_per_min=100_000, export_interval_s=0
    )


QUERIES = [
    {"agg": "raw"},
    {"agg": "raw", "limit": "777"},
    {"agg": "5m", "fn": "mean"},
    {"agg": "1h", "fn": "max"},
    {"agg": "1h", "fn": "min"},
    {"agg": "1d", "fn": "count"},
    {"agg": "1h", "fn": "p95"},
    {"agg": "5m", "fn": "p50", "limit": "50"},
    {"agg": "1h", "fn": "last"},
]


async def test_compaction_keeps_every_read_the_same_and_is_compact(
    client, world: World, clock, dsn, config
):
    start = day_start(6, clock.now) + timedelta(hours=20)
    cid = await fill(
        client, world, start, minutes=2 * 1440
    )  # spans three UTC days, 2 of them closed
    frm, to = start - timedelta(hours=1), clock.now
    before = {i: await read_all(client, world, cid, frm, to, **q) for i, q in enumerate(QUERIES)}
    assert len(before[0]) == 2880
    num = await scalar(dsn, "SELECT num FROM channels WHERE id = %s", cid)

    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        moved = await compact(conn, clock.now, config.compact_after_days)
    assert moved == 2880  # every day is older than 3 days
    assert await scalar(dsn, "SELECT count(*) FROM measurements WHERE channel_num = %s", num) == 0
    assert (
        await scalar(dsn, "SELECT sum(n) FROM measurements_packed WHERE channel_num = %s", num)
        == 2880
    )
    packed_bytes = await scalar(
        dsn,
        "SELECT sum(pg_column_size(p.*)) FROM measurements_packed p WHERE channel_num = %s",
        num,
    )
    assert packed_bytes / 2880 < 12

    after = {i: await read_all(client, world, cid, frm, to, **q) for i, q in enumerate(QUERIES)}
    assert after == before

    # a resent reading of a packed day is still a duplicate; a new one lands and is merged
    again = await send(client, world, [start + timedelta(minutes=5)], offset=5)
    assert (again["accepted"], again["deduplicated"]) == (0, 1)
    late = start + timedelta(minutes=5, seconds=30)
    new = await send(client, world, [late])
    assert (new["accepted"], new["deduplicated"]) == (1, 0)
    # before the next compaction the late raw row is read merged among its packed day
    raw = await read_all(client, world, cid, frm, to)
    assert len(raw) == 2881 and [rfc3339(late), fridge(0)] in raw
    assert [p[0] for p in raw] == sorted(p[0] for p in raw)
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        assert (
            await compact(conn, clock.now, config.compact_after_days) == 241
        )  # its day (20:00-24:00) re-packed
    assert await scalar(dsn, "SELECT count(*) FROM measurements WHERE channel_num = %s", num) == 0
    raw = await read_all(client, world, cid, frm, to)
    assert len(raw) == 2881 and [rfc3339(late), fridge(0)] in raw
    assert [p[0] for p in raw] == sorted(p[0] for p in raw)
    # rollups were kept current by the late reading too
    counts = await read_all(client, world, cid, frm, to, agg="1d", fn="count")
    assert sum(v for _, v in counts) == 2881


async def test_recent_days_are_not_compacted(client, world: World, clock, dsn, config):
    start = clock.now - timedelta(hours=30)
    cid = await fill(client, world, start, minutes=600, step=5)
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await compact(conn, clock.now, config.compact_after_days)
    num = await scalar(dsn, "SELECT num FROM channels WHERE id = %s", cid)
    assert await scalar(dsn, "SELECT count(*) FROM measurements WHERE channel_num = %s", num) == 120


async def test_pagination_visits_every_reading_once(client, world: World, clock):
    start = clock.now - timedelta(hours=3)
    cid = await fill(client, world, start, minutes=170)
    pages = await read_all(client, world, cid, start, clock.now, limit="7")
    assert len(pages) == 170 and len({p[0] for p in pages}) == 170


async def test_gaps_are_gaps(client, world: World, clock):
    start = (clock.now - timedelta(hours=5)).replace(minute=0)
    await send(client, world, [start, start + timedelta(minutes=1)])
    ans = await send(client, world, [start + timedelta(hours=3)])
    cid = ans["channels"][0]["channel_id"]
    data = await read_all(client, world, cid, start, clock.now, agg="1h", fn="mean")
    assert [d[0] for d in data] == [rfc3339(start), rfc3339(start + timedelta(hours=3))]


async def test_csv_export(client, world: World, clock):
    start = clock.now - timedelta(minutes=30)
    cid = await fill(client, world, start, minutes=3)
    r = await client.get(
        f"/v1/channels/{cid}/measurements",
        params={"from": rfc3339(start), "format": "csv"},
        headers=world.auth,
    )
    assert r.status == 200 and r.content_type == "text/csv"
    lines = (await r.text()).splitlines()
    assert lines[0] == "ts,value" and len(lines) == 4
    assert lines[1] == f"{rfc3339(start)},{fridge(0)!r}"


async def test_retention_drops_whole_old_partitions_only(dsn, new_database):
    fresh = new_database()
    now = datetime.now(UTC)
    async with await psycopg.AsyncConnection.connect(fresh, autocommit=True) as conn:
        await conn.execute(
            "INSERT INTO rollup_1d VALUES (1, %s, 1, 1, 1, 1)", (now - timedelta(days=400),)
        )
        later = now + timedelta(days=400)  # as if the server ran on for 13 more months
        dropped = await enforce_retention(conn, later, 13, 60)
        assert dropped and all(
            n.startswith(("measurements_y", "measurements_packed_y")) for n in dropped
        )
        oldest = db.add_months(db.month_start(later.date()), -13)
        for name in dropped:
            y, m = int(name[-7:-3]), int(name[-2:])
            assert db.add_months(datetime(y, m, 1).date(), 1) <= oldest
        # 1-day rollups are kept forever
        assert (await (await conn.execute("SELECT count(*) FROM rollup_1d")).fetchone())[0] == 1


def test_retention_below_the_product_minimums_is_refused():
    with pytest.raises(ValueError, match="OPENSENSE_RETENTION_RAW_MONTHS"):
        Config(retention_raw_months=12)
    with pytest.raises(ValueError, match="minimum"):
        Config.from_env({"OPENSENSE_RETENTION_REQUEST_LOG_DAYS": "7"})


async def test_a_fully_packed_month_gives_its_index_pages_back(new_database, clock):
    """After compaction empties a closed month's raw partition, its index is rebuilt."""
    from opensense.storage.compaction import shrink_closed_months
    from opensense.storage.write import insert_readings

    fresh = new_database()
    last_month = db.add_months(db.month_start(clock.now.date()), -2)  # closed whatever today is
    start = datetime(last_month.year, last_month.month, 1, tzinfo=UTC)
    name = db.partition_name("measurements", last_month)
    rows = [(n, start + timedelta(minutes=m), 4.0) for n in range(1, 41) for m in range(1440)]
    async with await psycopg.AsyncConnection.connect(fresh, autocommit=True) as conn:
        async with conn.transaction():
            await insert_readings(conn, rows, now=clock.now, compact_after_days=3)
        size = "SELECT pg_indexes_size(%s::regclass)"
        before = (await (await conn.execute(size, (name,))).fetchone())[0]
        horizon = db.month_start(clock.now.date())
        assert await shrink_closed_months(conn, horizon) == []  # not empty yet: left alone
        assert await compact(conn, clock.now, 3) == len(rows)
        after = (await (await conn.execute(size, (name,))).fetchone())[0]
    assert before > 1024 * 1024 and after < 64 * 1024
