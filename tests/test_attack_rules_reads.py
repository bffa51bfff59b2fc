"""Attacks on the rule engine and the read API (issue 11, items 10 and 11), through
the real server and PostgreSQL.

Item 10: a window such as FREQ=SECONDLY (or any dtstart far in the past) made the
engine enumerate millions of occurrences from dtstart, caching them, for one
reading: HTTP, ingest and MQTT froze for 43 s. The tests count what dateutil
enumerates (a spy that aborts past a bound, so the unfixed code fails fast instead
of freezing the suite) and what one evaluator pass does under its budget.

Item 11: fn=p50|p95|last loaded the whole range into Python. The tests assert on
what the code does: the allocations of a 60-day read (tracemalloc, not timing),
the cap on range x channels, and the rate-limit units of a 32-channel read.
"""

from __future__ import annotations

import random
import tracemalloc
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
import pytest
from dateutil.rrule import rrule, rrulestr
from psycopg.types.json import Jsonb

from opensense import db
from opensense.alarms import engine, evaluator
from opensense.alarms.engine import Window
from opensense.api.jsonutil import rfc3339
from opensense.api.keys import POOL
from opensense.settings import Config
from opensense.storage import read, write
from opensense.storage.compaction import compact

from .fixtures.clock import FakeClock
from .fixtures.server import World, make_world, test_config

pytestmark = pytest.mark.db

READ_RATE = 40  # per account and minute in this module


@pytest.fixture
def config(clock: FakeClock) -> Config:
    return test_config(
        clock, alarms_enabled=False, read_rate_per_min=READ_RATE, ingest_rate_per_min=10_000
    )


# --- helpers ---------------------------------------------------------------------------


class TooManyOccurrences(AssertionError):
    pass


@pytest.fixture
def occurrences(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Counts every occurrence dateutil enumerates; past 50,000 (what the unfixed engine
    reaches within its first reading) it aborts the evaluation instead of freezing."""
    count = [0]
    orig = rrule._iter

    def counting(self: rrule) -> Iterator[datetime]:
        for occ in orig(self):
            count[0] += 1
            if count[0] > 50_000:
                raise TooManyOccurrences(f"dateutil enumerated over {count[0]} occurrences")
            yield occ

    monkeypatch.setattr(rrule, "_iter", counting)
    _clear_caches()
    yield count
    _clear_caches()


def _clear_caches() -> None:
    for name in ("_starts_near", "_recurrence"):
        f = getattr(engine, name, None)
        if hasattr(f, "cache_clear"):
            f.cache_clear()


async def ingest(client: Any, world: World, values: list[float], start: datetime) -> str:
    ms = [
        {"type": "temperature", "value": v, "ts": rfc3339(start + timedelta(minutes=i))}
        for i, v in enumerate(values)
    ]
    cid = ""
    for i in range(0, len(ms), 30):
        r = await client.post(
            "/v1/ingest",
            json={"device": "fridge01", "measurements": ms[i : i + 30]},
            headers=world.dev_auth("fridge01"),
        )
        assert r.status == 200, await r.text()
        cid = (await r.json())["channels"][0]["channel_id"]
    return cid


async def add_rule(client: Any, world: World, cid: str, **body: Any) -> Any:
    return await client.post(
        f"/v1/channels/{cid}/rules",
        json={"kind": "range", "params": {"ok_max": 5.0}, "grace_min": 0, **body},
        headers=world.auth,
    )


async def evaluate_all(app: Any, now: datetime, budget_s: float | None = None) -> int:
    """Run passes until nothing is dirty; how many it took."""
    passes = 0
    kw = {} if budget_s is None else {"budget_s": budget_s}
    while (await evaluator.evaluate_dirty(app[POOL], now, **kw)).channels:
        passes += 1
        assert passes < 500, "the evaluator makes no progress"
    return passes


async def rule_events(dsn: str, rule_id: str) -> list[tuple[datetime, datetime]]:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT started_at, alarm_at FROM events WHERE rule_id = %s ORDER BY started_at",
            (rule_id,),
        )
        return list(await cur.fetchall())


# --- item 10: windows ------------------------------------------------------------------

REFUSED_WINDOWS = [
    {"rrule": "FREQ=SECONDLY;INTERVAL=10", "duration_min": 5},
    {"rrule": "FREQ=MINUTELY", "duration_min": 5},
    {"rrule": "FREQ=HOURLY", "duration_min": 5},
    {"rrule": "FREQ=DAILY;BYHOUR=2", "duration_min": 45, "dtstart": "1970-01-01T00:00:00"},
    {"rrule": "FREQ=DAILY;BYHOUR=2", "duration_min": 45, "dtstart": "9999-01-01T00:00:00"},
    {"rrule": "FREQ=DAILY;BYSECOND=" + ",".join(map(str, range(60))), "duration_min": 5},
    {"rrule": "FREQ=DAILY;BYMINUTE=" + ",".join(map(str, range(60))), "duration_min": 5},
    {"rrule": "FREQ=DAILY;COUNT=100000000", "duration_min": 5},
    {"rrule": "FREQ=DAILY;INTERVAL=100000", "duration_min": 5},
    {"rrule": "FREQ=WEEKLY;BYDAY=1MO", "duration_min": 5},
    {"rrule": "FREQ=DAILY;BYSETPOS=1", "duration_min": 5},
    {"rrule": "RRULE:FREQ=DAILY\nRDATE:20240101T000000", "duration_min": 5},
    {"rrule": "FREQ=DAILY;" * 200, "duration_min": 5},
]


async def test_windows_that_cost_unbounded_work_are_refused_at_save(client, world: World, clock):
    cid = await ingest(client, world, [3.0], clock() - timedelta(minutes=1))
    for w in REFUSED_WINDOWS:
        r = await add_rule(client, world, cid, windows=[w])
        body = await r.json()
        assert r.status == 422, (w, body)
        assert body["error"]["code"] == "invalid_rule" and "refused" in body["error"]["message"]
        assert set(body["error"]) == {"code", "message", "request_id"}
    # nothing of the refused rules was stored: only the channel's preset rule
    r = await client.get(f"/v1/channels/{cid}", headers=world.auth)
    assert len((await r.json())["rules"]) == 1
    # what a fridge schedule needs still saves
    for w in (
        {"rrule": "FREQ=DAILY;BYHOUR=2,8,14,20;BYMINUTE=0", "duration_min": 45},
        {"rrule": "FREQ=WEEKLY;INTERVAL=2;BYDAY=MO,TH;BYHOUR=6;BYMINUTE=30", "duration_min": 60},
        {"rrule": "freq=daily;byhour=3", "duration_min": 30, "dtstart": "2025-06-01T00:00:00"},
    ):
        r = await add_rule(client, world, cid, windows=[{**w, "params": {"ok_max": 12.0}}])
        assert r.status == 201, await r.text()


async def test_a_window_stored_behind_the_apis_back_freezes_nothing(
    client, world: World, clock, dsn, occurrences, caplog
):
    """A rule whose window the API would refuse today (SECONDLY from 1970, switching
    the rule off) is in the database, put there by hand or an older release. The
    evaluator judges the rule without it: the warm fridge alarms, nothing enumerates
    the window, and the log says why."""
    t0 = clock() - timedelta(minutes=30)
    cid = await ingest(client, world, [3.0], t0 - timedelta(minutes=1))
    r = await add_rule(client, world, cid)
    assert r.status == 201
    rule_id = (await r.json())["id"]
    bad = [{"rrule": "FREQ=SECONDLY;INTERVAL=10", "duration_min": 5, "params": None,
            "dtstart": "1970-01-01T00:00:00"}]  # fmt: skip
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("UPDATE rules SET windows = %s WHERE id = %s", (Jsonb(bad), rule_id))
    await ingest(client, world, [9.0] * 30, t0)
    await evaluate_all(client.app, clock())
    assert len(await rule_events(dsn, rule_id)) == 1
    assert occurrences[0] < 1000  # (other tests' channels with valid windows may be dirty)
    assert f"rule {rule_id}: window ignored" in caplog.text


def test_occurrences_are_found_near_the_reading_not_from_dtstart(occurrences):
    """A valid window anchored in 2000, judged in 2099: a few occurrences, not 36,500
    days of them (and nothing cached beyond one small tuple per window and day)."""
    berlin = ZoneInfo("Europe/Berlin")
    w = Window("FREQ=DAILY;BYHOUR=0,2,4,6,8,10,12,14,16,18,20,22", 45, None, "2000-01-01T00:00:00")
    # 03:10 CEST, the night DST starts: the 02:00 start (a wall time that does not
    # exist that night) began at 01:00 UTC, as it did before
    t = datetime(2099, 3, 29, 1, 10, tzinfo=UTC)
    assert engine.active_window((w,), berlin, t) == w
    assert engine.active_window((w,), berlin, t + timedelta(minutes=40)) is None
    for i in range(1440):  # a day of minute readings
        engine.active_window((w,), berlin, t + timedelta(minutes=i))
    assert occurrences[0] < 1000


def _reference(w: Window, tz: ZoneInfo, t: datetime) -> bool:
    """The former engine's answer (enumerate from dtstart, check every start near t)."""
    r = rrulestr(w.rrule, dtstart=datetime.fromisoformat(w.dtstart))
    dur = timedelta(minutes=w.duration_min)
    lo = (t - dur - timedelta(hours=3)).astimezone(tz).replace(tzinfo=None)
    hi = (t + timedelta(hours=3)).astimezone(tz).replace(tzinfo=None)
    return any(
        o.replace(tzinfo=tz) <= t < o.replace(tzinfo=tz) + dur for o in r.between(lo, hi, True)
    )


def test_windows_answer_as_before_across_dst_transitions():
    """Against the enumerating reference, around the DST changes of three zones (one with
    a 30-minute shift), for short, long and week-long windows."""
    rng = random.Random(11)
    rules = [
        "FREQ=DAILY;BYHOUR=2;BYMINUTE=30",
        "FREQ=WEEKLY;BYDAY=SU;BYHOUR=1,2,3",
        "FREQ=DAILY;INTERVAL=3;BYHOUR=1,2;BYMINUTE=0,15,45",
        "FREQ=WEEKLY;INTERVAL=2;BYDAY=SU,MO;BYHOUR=2;BYMINUTE=10",
    ]
    shifts = [datetime(2026, 3, 29, 1, tzinfo=UTC), datetime(2026, 10, 25, 1, tzinfo=UTC),
              datetime(2026, 3, 8, 7, tzinfo=UTC), datetime(2026, 11, 1, 6, tzinfo=UTC),
              datetime(2026, 4, 4, 15, tzinfo=UTC)]  # fmt: skip
    for tzname in ("Europe/Berlin", "America/New_York", "Australia/Lord_Howe"):
        tz = ZoneInfo(tzname)
        for rr in rules:
            for dur in (1, 45, 90, 2000, 10080):
                w = Window(rr, dur, None, "2024-01-03T00:20:00")
                for _ in range(40):
                    t = rng.choice(shifts) + timedelta(minutes=rng.randint(-600, 600))
                    got = engine.active_window((w,), tz, t) is not None
                    assert got == _reference(w, tz, t), (tzname, rr, dur, t)


async def test_an_evaluator_pass_stops_at_its_budget_and_the_next_goes_on(
    client, world: World, clock, dsn, monkeypatch, caplog
):
    """With no budget at all, each pass feeds one slice and saves where it got to; the
    channel stays dirty, and the passes together open the same single alarm at its
    true time. A late batch that rewinds the channel goes on from where each cut pass
    stopped (a checkpoint at the cut), instead of replaying the same slice forever."""
    monkeypatch.setattr(evaluator, "SLICE_STEPS", 10)
    t0 = clock() - timedelta(hours=3)
    cid = await ingest(client, world, [3.0], t0 - timedelta(minutes=1))
    rule_id = (await (await add_rule(client, world, cid)).json())["id"]
    await ingest(client, world, [3.0] * 60 + [9.0] * 20 + [3.0] * 40, t0)
    pool = client.app[POOL]
    st = await evaluator.evaluate_dirty(pool, clock(), budget_s=0)
    assert st.deferred == 1 and 0 < st.readings < 121
    assert "over its 0 ms budget" in caplog.text
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        dirty = await (await conn.execute("SELECT count(*) FROM alarm_dirty")).fetchone()
        assert dirty == (1,)
    passes = await evaluate_all(client.app, clock(), budget_s=0)
    assert passes > 3
    evs = await rule_events(dsn, rule_id)
    assert evs == [(t0 + timedelta(minutes=60), t0 + timedelta(minutes=60))]

    # a late reading 90 minutes back: a rewind, cut into slices, still finishes
    await ingest(client, world, [9.0], t0 + timedelta(minutes=29, seconds=30))
    passes = await evaluate_all(client.app, clock(), budget_s=0)
    assert 1 < passes < 100
    assert len(await rule_events(dsn, rule_id)) == 2


# --- item 11: reads --------------------------------------------------------------------


async def channels(client: Any, world: World, n: int, at: datetime) -> list[str]:
    """n channels of fridge01 (one label each), one reading each."""
    ms = [{"type": "temperature", "label": f"p{i}", "value": 3.0, "ts": rfc3339(at)}
          for i in range(n)]  # fmt: skip
    r = await client.post(
        "/v1/ingest", json={"device": "fridge01", "measurements": ms},
        headers=world.dev_auth("fridge01"),
    )  # fmt: skip
    assert r.status == 200, await r.text()
    return [c["channel_id"] for c in (await r.json())["channels"]]


async def read_units(dsn: str, world: World) -> int:
    """The account's read rate-limit units counted so far (the clock stands still)."""
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT coalesce(sum(count), 0) FROM rate_counters WHERE key = %s",
            (f"read:{world.account}",),
        )
        return int((await cur.fetchone())[0])  # type: ignore[index]


async def test_a_long_percentile_read_never_holds_the_range_in_memory(
    client, world: World, clock, dsn, config, monkeypatch
):
    """60 days of minute readings (86,400), 57 of them packed by compaction, one late
    raw reading in a packed day: p95 and last per day come from SQL for the raw days
    and from one packed day at a time for the rest. The read allocates a small fraction
    of what the range's points would take, never goes through the all-points path, and
    answers exactly what percentile_cont over all the readings answers."""
    now = clock()
    end = datetime(now.year, now.month, now.day, tzinfo=UTC)
    start = end - timedelta(days=60)
    (cid,) = await channels(client, world, 1, now - timedelta(days=70))
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        num = (
            await (await conn.execute("SELECT num FROM channels WHERE id = %s", (cid,))).fetchone()
        )[0]  # type: ignore[index]  # noqa: E501
        await conn.execute("DELETE FROM measurements WHERE channel_num = %s", (num,))
        months = {db.month_start((start + timedelta(days=d)).date()) for d in range(62)}
        await write.ensure_month_partitions(conn, months)
        await conn.execute(
            "INSERT INTO measurements (channel_num, ts, value) SELECT %s,"
            " %s + make_interval(mins => i), ((i * 37) %% 101) / 8.0"
            " FROM generate_series(0, 86399) AS i",
            (num, start),
        )
        late = start + timedelta(days=30, hours=12, seconds=30)
        # the expected answer, over every reading (the late one included)
        await conn.execute("INSERT INTO measurements VALUES (%s, %s, 99.0)", (num, late))
        expect = {}
        for fn, agg_sql in (
            ("p95", "percentile_cont(0.95) WITHIN GROUP (ORDER BY value)"),
            ("last", "(array_agg(value ORDER BY ts DESC))[1]"),
        ):
            cur = await conn.execute(
                f"SELECT date_trunc('day', ts AT TIME ZONE 'UTC'), {agg_sql} FROM measurements"
                " WHERE channel_num = %s GROUP BY 1 ORDER BY 1",
                (num,),
            )
            expect[fn] = [[rfc3339(d.replace(tzinfo=UTC)), v] for d, v in await cur.fetchall()]
        await conn.execute(
            "DELETE FROM measurements WHERE channel_num = %s AND ts = %s", (num, late)
        )
        moved = await compact(conn, now, config.compact_after_days)
        assert moved >= 57 * 1440
        # the late reading arrives after its day was packed: it stays raw until the next run
        await conn.execute("INSERT INTO measurements VALUES (%s, %s, 99.0)", (num, late))

    def no_all_points_path(*a: Any, **k: Any) -> Any:
        raise AssertionError("a computed read went through raw_points (the whole range)")

    monkeypatch.setattr(read, "raw_points", no_all_points_path)
    for fn in ("p95", "last"):
        params = {"from": rfc3339(start), "to": rfc3339(end), "agg": "1d", "fn": fn}
        tracemalloc.start()
        try:
            r = await client.get(
                f"/v1/channels/{cid}/measurements", params=params, headers=world.auth
            )
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert r.status == 200, await r.text()
        assert (await r.json())["data"] == expect[fn]
        # 86,400 points as (µs, value) tuples in a list take ~10 MB; a day's take ~0.2 MB
        assert peak < 3_000_000, f"fn={fn}: {peak} bytes allocated at the peak"
    # leave no raw reading in a packed day behind: other tests count what compaction moves
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for table in ("measurements", "measurements_packed"):
            await conn.execute(f"DELETE FROM {table} WHERE channel_num = %s", (num,))


async def test_a_computed_read_past_the_cap_is_refused_before_anything_is_read(
    client, world: World, clock, dsn
):
    now = clock()
    ids = await channels(client, world, 8, now - timedelta(minutes=5))
    thirteen_months = {"from": rfc3339(now - timedelta(days=396)), "to": rfc3339(now)}
    q = {**thirteen_months, "agg": "1d", "fn": "p95"}
    r = await client.get("/v1/measurements", params=[*q.items(), *(("channel_id", c) for c in ids)],
                         headers=world.auth)  # fmt: skip
    body = await r.json()
    assert r.status == 422 and body["error"]["code"] == "invalid_range", body
    assert "400 channel-days" in body["error"]["message"]
    # the same range of one channel is within the cap, and costs a unit a month of it
    before = await read_units(dsn, world)
    r = await client.get(f"/v1/channels/{ids[0]}/measurements", params=q, headers=world.auth)
    assert r.status == 200, await r.text()
    assert await read_units(dsn, world) - before == 13  # 396 days / 31, rounded up
    # a longer one is not
    longer = {**q, "from": rfc3339(now - timedelta(days=420))}
    r = await client.get(f"/v1/channels/{ids[0]}/measurements", params=longer, headers=world.auth)
    assert r.status == 422 and (await r.json())["error"]["code"] == "invalid_range"
    # rollup aggregates are bounded by limit, not by the range
    mean = {**thirteen_months, "agg": "1d", "fn": "mean"}
    r = await client.get("/v1/measurements", params=[*mean.items(), *(("channel_id", c) for c in ids)],
                         headers=world.auth)  # fmt: skip
    assert r.status == 200, await r.text()


async def test_a_32_channel_read_counts_32_against_the_read_rate_limit(
    client, world: World, clock, dsn
):
    ids = await channels(client, world, 32, clock() - timedelta(minutes=5))
    q = [("agg", "raw"), *(("channel_id", c) for c in ids)]
    before = await read_units(dsn, world)
    r = await client.get("/v1/measurements", params=q, headers=world.auth)
    assert r.status == 200, await r.text()
    assert len((await r.json())["series"]) == 32
    assert await read_units(dsn, world) - before == 32
    # 40 a minute: what is left does not cover another 32 channels
    r = await client.get("/v1/measurements", params=q, headers=world.auth)
    body = await r.json()
    assert r.status == 429 and body["error"]["code"] == "rate_limited", body
    assert "Retry-After" in r.headers


async def test_a_delta_window_of_years_is_refused_and_a_stored_one_is_held_to_a_day(
    client, world: World, clock, dsn
):
    """A delta/derivative rule keeps its window's readings in its state: a window of ten
    years made every step copy an ever longer list and every saved state carry it."""
    t0 = clock() - timedelta(days=2)
    cid = await ingest(client, world, [3.0], t0 - timedelta(minutes=1))
    for kind, params in (("delta", {"max_delta": 50, "interval_s": 10 * 365 * 86400}),
                         ("derivative", {"max_rate": 50, "window_s": 86401})):  # fmt: skip
        r = await add_rule(client, world, cid, kind=kind, params=params)
        body = await r.json()
        assert r.status == 422 and body["error"]["code"] == "invalid_rule", body
        assert "at most 86400" in body["error"]["message"]
    r = await add_rule(client, world, cid, kind="delta", params={"max_delta": 50})
    rule_id = (await r.json())["id"]
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(
            "UPDATE rules SET params = %s WHERE id = %s",
            (Jsonb({"max_delta": 50, "interval_s": 10 * 365 * 86400}), rule_id),
        )
    # two days, one reading every 10 minutes (ingest takes minutes apart: 288 readings)
    ms = [{"type": "temperature", "value": 3.0, "ts": rfc3339(t0 + timedelta(minutes=10 * i))}
          for i in range(288)]  # fmt: skip
    for i in range(0, len(ms), 30):
        r = await client.post("/v1/ingest", json={"device": "fridge01", "measurements": ms[i : i + 30]},
                              headers=world.dev_auth("fridge01"))  # fmt: skip
        assert r.status == 200
    await evaluate_all(client.app, clock())
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT jsonb_array_length(s.rules -> %s -> 'hist') FROM alarm_state s"
            " JOIN channels c ON c.num = s.channel_num WHERE c.id = %s",
            (rule_id, cid),
        )
        assert (await cur.fetchone())[0] <= 24 * 6 + 1  # type: ignore[index]


async def test_a_rule_stored_with_unjudgeable_params_holds_back_no_other_channel(
    client, world: World, clock, dsn, config, caplog
):
    """Account A's rule has `ok_max: "hot"` (stored by hand). It used to raise inside the
    pass, rolling back the evaluation of every channel claimed with it, of every account,
    at every retry: account B's warm fridge never alarmed."""
    other = await make_world(dsn, config, ("fridge01",))
    t0 = clock() - timedelta(minutes=30)
    ids = {}
    for w in (world, other):
        cid = await ingest(client, w, [3.0], t0 - timedelta(minutes=1))
        ids[w.account] = (await (await add_rule(client, w, cid)).json())["id"]
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(
            "UPDATE rules SET params = %s WHERE id = %s",
            (Jsonb({"ok_max": "hot"}), ids[world.account]),
        )
    for w in (world, other):
        await ingest(client, w, [9.0] * 20, t0)
    await evaluate_all(client.app, clock())
    assert len(await rule_events(dsn, ids[other.account])) == 1
    assert await rule_events(dsn, ids[world.account]) == []
    assert f"rule {ids[world.account]} cannot be judged" in caplog.text
