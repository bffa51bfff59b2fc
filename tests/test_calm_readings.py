"""Calm readings settled by the batch writer (issue 14; migration 0032;
storage/batcher.py CALM_CTE; docs/alarms.md, "Calm readings").

- every band a rule kind gives holds no value its `breach` refuses (floats, integers
  beyond 2**53, open bounds, NaN and booleans refused);
- the writer offers the look-up only channels it wrote last more than CALM_QUIET_S
  ago (a stream's it does not: a cost filter);
- a reading of an established channel, in its band, more than CALM_QUIET_S after the
  last judged one and before the next checkpoint is due, moves the channel's judged
  time without a mark for the engine (and wakes the dashboards); a node at a reading
  a minute is judged by the engine once every ten minutes;
- every other one is marked as before: out of the band, too soon after the last,
  past the checkpoint, a long run at once, after a waiting mark, late, after a rule
  or site change, with the state row locked elsewhere (the writer does not wait for
  it);
- a pass does not wait for a state row locked elsewhere: it marks the channel again
  and judges it once the row is free;
- over a day-like series (steady readings, an excursion into an alarm, its clearing,
  a late excursion) the events and the state are those the engine gives on every
  reading alone.
"""

from __future__ import annotations

import asyncio
import math
import random
from datetime import datetime, timedelta
from typing import Any

import psycopg
import pytest

from opensense.alarms import engine, evaluator, rule_kinds
from opensense.alarms.engine import RuleState
from opensense.api.keys import POOL, WRITER
from opensense.settings import Config
from opensense.storage import batcher

from .fixtures.clock import FakeClock
from .fixtures.server import World, post_temperature, test_config

# --- the band ------------------------------------------------------------------------


def _params(rng: random.Random) -> dict[str, Any]:
    def bound() -> Any:
        return rng.choice(
            [
                None,
                rng.uniform(-40, 40),
                rng.randint(-40, 40),
                2**53 + rng.randint(1, 9),
                -(2**53) - rng.randint(1, 9),
                10**400,
                math.inf,
                -math.inf,
                0.1 + 0.2,
            ]
        )

    return {"ok_min": bound(), "ok_max": bound()}


def test_a_band_holds_no_value_its_kind_would_refuse() -> None:
    rng = random.Random(14)
    rule = engine.Rule("r", "range", {}, 0)
    st = RuleState()
    checked = 0
    for _ in range(3000):
        params = _params(rng)
        band = rule_kinds.BEHAVIOURS["range"].band
        assert band is not None
        got = band(params)
        if got is None:
            continue
        low, high = got
        probes = [rng.uniform(-50, 50) for _ in range(20)]
        for x in (low, high):
            if math.isfinite(x):
                probes += [x, math.nextafter(x, math.inf), math.nextafter(x, -math.inf)]
        for v in probes:
            if low <= v <= high:
                checked += 1
                bad = rule_kinds.BEHAVIOURS["range"].breach(rule, params, st, T, v, _nolook)
                assert bad is False, (params, v)
            elif all(isinstance(b, float) for b in params.values()):
                # just outside a float bound: refused (the band is not narrower)
                bad = rule_kinds.BEHAVIOURS["range"].breach(rule, params, st, T, v, _nolook)
                assert bad is True, (params, v)
    assert checked > 1000


def test_a_band_is_refused_for_what_is_not_a_number() -> None:
    band = rule_kinds.BEHAVIOURS["range"].band
    assert band is not None
    assert band({"ok_min": math.nan, "ok_max": 5}) is None
    assert band({"ok_min": True, "ok_max": 5}) is None
    assert band({"ok_min": "1", "ok_max": 5}) is None
    assert band({}) == (-math.inf, math.inf)
    assert band({"ok_min": 2**53 + 1, "ok_max": 2**53 + 1}) == (
        math.nextafter(float(2**53), math.inf),
        float(2**53),
    )  # (empty: no float equals 2**53 + 1)


def test_only_kinds_judged_by_the_value_alone_give_a_band() -> None:
    assert {k for k, b in rule_kinds.BEHAVIOURS.items() if b.band is not None} == {"range"}
    rng_rule = engine.Rule("a", "range", {"ok_min": -2, "ok_max": 5}, 15)
    other = engine.Rule("b", "range", {"ok_min": 0, "ok_max": 8}, 15)
    assert evaluator.calm_band([rng_rule, other]) == (0.0, 5.0)
    assert evaluator.calm_band([]) == (-math.inf, math.inf)
    absence = engine.Rule("c", "absence", {"max_gap_s": 600}, 0)
    assert evaluator.calm_band([rng_rule, absence]) is None
    windowed = engine.Rule(
        "d", "range", {"ok_min": -2, "ok_max": 5}, 15,
        windows=(engine.Window("FREQ=DAILY;BYHOUR=6", 60, {"ok_max": 12.0}),),
    )  # fmt: skip
    assert evaluator.calm_band([windowed]) is None


def test_the_writer_stops_where_the_engine_takes_its_next_checkpoint() -> None:
    assert evaluator.CHECKPOINT_EVERY == timedelta(minutes=10)
    assert "a.last_ts < a.cp_last + interval '10 minutes'" in batcher.CALM_CTE
    assert batcher.CALM_QUIET_S == 5.0 and "5 seconds" in batcher.CALM_CTE
    # a stream's batch (no channel offered) runs the statement without the look-up
    assert "calm AS" in batcher.BATCH_SQL and "calm AS" in batcher.PLAIN_BATCH_SQL
    assert "calm AS" not in batcher.STREAM_BATCH_SQL + batcher.PLAIN_STREAM_BATCH_SQL


def test_the_writer_offers_the_calm_look_up_only_channels_written_now_and_then(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`_Streams`: a channel seen first, or written here last more than CALM_QUIET_S
    ago (wall time), is offered; a stream's is not, whatever its readings' times."""
    now = [100.0]
    s = batcher._Streams(clock=lambda: now[0])
    assert s.quiet_s == batcher.CALM_QUIET_S
    rows = [(1, T, 3.0), (1, T + timedelta(minutes=1), 3.0), (2, T, 3.0)]
    assert s.quiet(rows) == [1, 2]  # never written here
    now[0] += 0.08  # a stream: written again 80 ms later, its readings a minute apart
    assert s.quiet([(1, T + timedelta(minutes=2), 3.0)]) == []
    now[0] += batcher.CALM_QUIET_S  # 2 was written last 5.08 s ago, 1 5 s ago
    assert s.quiet([(1, T, 3.0), (2, T, 3.0)]) == [1, 2]
    now[0] += 1.0
    assert s.quiet([(2, T, 3.0)]) == []
    monkeypatch.setattr(batcher._Streams, "MAX", 1)
    now[0] += 0.01
    assert s.quiet([(1, T, 3.0)]) == [1]  # (two held: emptied first)


def _nolook(_cid: str, _t: datetime) -> float | None:
    return None


T = datetime(2026, 3, 1, 12, 0).astimezone()


# --- through the database ------------------------------------------------------------


@pytest.fixture
def config(clock: FakeClock) -> Config:
    # the evaluator runs when a test calls it, not in the background
    return test_config(clock, alarms_enabled=False, ingest_rate_per_min=10_000)


@pytest.fixture(autouse=True)
def _every_channel_offered(client: Any) -> None:
    """These tests post a node's readings milliseconds apart: the writer's stream
    filter (tested above) would withhold them from the calm look-up."""
    client.app[WRITER]._streams.quiet_s = 0.0


_post = post_temperature


async def _judge(client: Any, clock: FakeClock) -> None:
    while (await evaluator.evaluate_dirty(client.app[POOL], clock())).channels:
        pass


async def _one(dsn: str, sql: str, arg: Any) -> Any:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        row = await (await conn.execute(sql, (arg,))).fetchone()
    assert row is not None
    return row[0]


async def _num(dsn: str, channel_id: str) -> int:
    return int(await _one(dsn, "SELECT num FROM channels WHERE id = %s", channel_id))


async def _state(dsn: str, num: int) -> dict[str, Any]:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT status, last_ts, cp_last, calm_lo, calm_hi, calm_rev, meta_rev,"
            " (SELECT since FROM alarm_dirty d WHERE d.channel_num = a.channel_num)"
            " FROM alarm_state a WHERE channel_num = %s",
            (num,),
        )
        row = await cur.fetchone()
    assert row is not None
    keys = ("status", "last_ts", "cp_last", "lo", "hi", "calm_rev", "meta_rev", "dirty")
    return dict(zip(keys, row, strict=True))


async def _established(
    client: Any, world: World, clock: FakeClock, dsn: str, device: str = "fridge01"
) -> tuple[int, datetime]:
    """A channel with two readings judged: the engine has taken its first checkpoint
    and saved its band (the chilled-storage default rule: -2..+5 °C)."""
    t0 = clock() - timedelta(minutes=30)
    cid = await _post(client, world, device, 3.0, t0)
    await _judge(client, clock)
    await _post(client, world, device, 3.1, t0 + timedelta(minutes=1))
    await _judge(client, clock)
    num = await _num(dsn, cid)
    s = await _state(dsn, num)
    assert (s["status"], s["lo"], s["hi"], s["dirty"]) == ("ok", -2.0, 5.0, None)
    assert s["calm_rev"] == s["meta_rev"] and s["cp_last"] == t0
    assert s["last_ts"] == t0 + timedelta(minutes=1)
    return num, t0 + timedelta(minutes=1)


@pytest.mark.db
async def test_a_calm_reading_is_settled_by_the_writer_and_wakes_the_dashboards(
    client: Any, world: World, clock: FakeClock, dsn: str
) -> None:
    num, last = await _established(client, world, clock, dsn)
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as listen:
        await listen.execute("LISTEN opensense_live")
        t = last + timedelta(minutes=1)
        await _post(client, world, "fridge01", 4.9, t)
        s = await _state(dsn, num)
        assert (s["status"], s["last_ts"], s["dirty"]) == ("ok", t, None)
        got = []
        async with asyncio.timeout(5):
            async for n in listen.notifies():
                got.append(n.payload)
                break
        assert got and got[0].endswith(" " + (await _channel_id(dsn, num)))
    # and the engine finds nothing to judge
    assert (await evaluator.evaluate_dirty(client.app[POOL], clock())).channels == 0


@pytest.mark.db
async def test_a_node_at_a_reading_a_minute_is_judged_by_the_engine_every_ten_minutes(
    client: Any, world: World, clock: FakeClock, dsn: str
) -> None:
    """Only the reading after which the engine's checkpoint is due is marked: the pass
    takes it at the channel's judged time, so the next ten settle again (until the
    writer looked at the readings' end, the one before it was marked too: two passes)."""
    num, last = await _established(client, world, clock, dsn)  # checkpoint at last - 1 min
    marked = []
    for i in range(1, 26):
        await _post(client, world, "fridge01", 3.0, last + timedelta(minutes=i))
        if (await _state(dsn, num))["dirty"] is not None:
            marked.append(i)
        await _judge(client, clock)
    assert marked == [10, 20]
    s = await _state(dsn, num)
    assert s["cp_last"] == last + timedelta(minutes=19)
    assert s["last_ts"] == last + timedelta(minutes=25)


async def _channel_id(dsn: str, num: int) -> str:
    return str(await _one(dsn, "SELECT id FROM channels WHERE num = %s", num))


@pytest.mark.db
@pytest.mark.parametrize(
    "case",
    ["out_of_band", "too_soon", "checkpoint_due", "long_run", "mark_waiting", "late",
     "rule_changed", "site_changed"],
)  # fmt: skip
async def test_a_reading_the_writer_leaves_to_the_engine(
    client: Any, world: World, clock: FakeClock, dsn: str, case: str
) -> None:
    num, last = await _established(client, world, clock, dsn)
    t, value = last + timedelta(minutes=1), 4.0
    if case == "out_of_band":
        value = 5.5
    elif case == "too_soon":
        t = last + timedelta(seconds=5)
    elif case == "checkpoint_due":  # the last judged reading is 10 min after it
        cp = (await _state(dsn, num))["cp_last"]
        await _post(client, world, "fridge01", 4.0, cp + timedelta(minutes=10))
        assert (await _state(dsn, num))["last_ts"] == cp + timedelta(minutes=10)  # settled
        t = cp + timedelta(minutes=11)
    elif case == "long_run":  # a node's buffer after an outage: ends 20 min after it
        t = (await _state(dsn, num))["cp_last"] + timedelta(minutes=20)
    elif case == "mark_waiting":
        await _post(client, world, "fridge01", 9.0, last + timedelta(seconds=30))
    elif case == "late":
        t = last - timedelta(seconds=30)
    else:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            if case == "rule_changed":
                await conn.execute(
                    'UPDATE rules SET params = \'{"ok_min": -2, "ok_max": 3.5}\''
                    " WHERE channel_id = (SELECT id FROM channels WHERE num = %s)",
                    (num,),
                )
            else:  # the site's timezone: what a window is read in
                await conn.execute("UPDATE sites SET timezone = 'Asia/Tokyo'")
    before = (await _state(dsn, num))["last_ts"]
    await _post(client, world, "fridge01", value, t)
    s = await _state(dsn, num)
    assert s["dirty"] is not None, case  # marked for the engine
    assert s["last_ts"] == before  # and not settled
    await _judge(client, clock)
    s = await _state(dsn, num)
    assert s["dirty"] is None and s["last_ts"] >= t


@pytest.mark.db
async def test_the_writer_does_not_wait_for_a_state_row_locked_elsewhere(
    client: Any, world: World, clock: FakeClock, dsn: str
) -> None:
    num, last = await _established(client, world, clock, dsn)
    async with await psycopg.AsyncConnection.connect(dsn) as holder:
        await holder.execute("SELECT FROM alarm_state WHERE channel_num = %s FOR UPDATE", (num,))
        async with asyncio.timeout(10):  # (it would wait for `holder` to end otherwise)
            await _post(client, world, "fridge01", 4.0, last + timedelta(minutes=1))
        await holder.rollback()
    s = await _state(dsn, num)
    assert s["dirty"] == last + timedelta(minutes=1) and s["last_ts"] == last


@pytest.mark.db
async def test_a_pass_does_not_wait_for_a_state_row_locked_elsewhere(
    client: Any, world: World, clock: FakeClock, dsn: str
) -> None:
    num, last = await _established(client, world, clock, dsn)
    num2, last2 = await _established(client, world, clock, dsn, "fridge02")
    await _post(client, world, "fridge01", 9.0, last + timedelta(minutes=1))
    await _post(client, world, "fridge02", 9.0, last2 + timedelta(minutes=1))
    mark = (await _state(dsn, num))["dirty"]
    pool = client.app[POOL]
    async with await psycopg.AsyncConnection.connect(dsn) as holder:
        await holder.execute("SELECT FROM alarm_state WHERE channel_num = %s FOR UPDATE", (num,))
        async with asyncio.timeout(10):
            st = await evaluator.evaluate_dirty(pool, clock())
        assert st.channels == 1  # fridge02's, judged
        assert (await _state(dsn, num2))["status"] == "grace"
        s = await _state(dsn, num)
        assert (s["status"], s["dirty"]) == ("ok", mark)  # marked again, as it was
        async with asyncio.timeout(10):  # all of it locked: no progress, the loop rests
            assert (await evaluator.evaluate_dirty(pool, clock())).channels == 0
        await holder.rollback()
    await _judge(client, clock)
    s = await _state(dsn, num)
    assert (s["status"], s["dirty"]) == ("grace", None)


@pytest.mark.db
async def test_events_and_state_are_those_of_the_engine_on_every_reading(
    client: Any, world: World, clock: FakeClock, dsn: str
) -> None:
    """Readings a minute apart, posted and judged one after another as a node's come:
    steady ones (settled by the writer but every ten minutes), an excursion long enough
    for an alarm, back in range until it clears, steady again, then a late excursion
    into the past of the steady stretch, longer than the grace. The events are those
    `engine.feed` gives over every reading in time order, and so is the state."""
    num, last = await _established(client, world, clock, dsn)
    start = last + timedelta(minutes=1)
    base = start - timedelta(hours=3)  # (2.5 h of readings: all before the clock's now)
    series = []
    for i in range(150):
        if 100 <= i < 120:
            continue  # the node's buffer holds these: they come last (`late`)
        v = 3.0 + 0.01 * (i % 7)
        if 45 <= i < 65:
            # 20 min out: the alarm at 15. It begins on a reading the writer would
            # settle were it in range (the engine took its checkpoint at 40)
            v = 7.0 + 0.1 * (i % 3)
        series.append((base + timedelta(minutes=i), v))
    late = [(base + timedelta(minutes=i, seconds=30), 8.0) for i in range(100, 120)]
    # the channel's own readings come first: the ones before `start` moved back too
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("DELETE FROM measurements WHERE channel_num = %s", (num,))
        await conn.execute("DELETE FROM alarm_checkpoints WHERE channel_num = %s", (num,))
        await conn.execute(
            "UPDATE alarm_state SET rules = '{}', events = '{}', last_ts = NULL, cp_first = NULL,"
            " cp_last = NULL, status = 'ok', calm_rev = NULL WHERE channel_num = %s",
            (num,),
        )
    settled = 0
    for t, v in series:
        await _post(client, world, "fridge01", v, t)
        settled += (await _state(dsn, num))["dirty"] is None
        await _judge(client, clock)
    for t, v in late:
        await _post(client, world, "fridge01", v, t)
        await _judge(client, clock)
    assert settled > 60  # most of the steady readings were the writer's

    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        meta = (await evaluator._meta(conn, [num]))[num]
        cur = await conn.execute(
            "SELECT started_at, alarm_at, cleared_at, state FROM events"
            " WHERE channel_id = %s ORDER BY started_at",
            (meta.channel_id,),
        )
        events = await cur.fetchall()
    (rule,) = meta.rules
    every = sorted(series + late)
    st, trs = engine.feed(rule, RuleState(), every, meta.tz)
    want = []
    for tr in trs:
        if tr.what == "alarm":
            want.append([tr.since, tr.at, None, "open"])
        elif tr.what == "cleared":
            want[-1][2:] = [tr.at, "cleared"]
    got = [[s, a, c, "open" if state != "cleared" else "cleared"] for s, a, c, state in events]
    assert got == want and len(want) == 2
    s = await _state(dsn, num)
    assert s["status"] == engine.channel_status([rule], {rule.id: st})
    assert s["last_ts"] == series[-1][0]
