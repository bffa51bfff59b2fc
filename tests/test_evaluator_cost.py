"""The rule engine made cheaper per reading (issue 14, "ingest cost";
tools/bench/evaluator) decides exactly as before:

- `engine.step` (no dataclasses.replace, one look-up of the kind's behaviour, the
  ok-and-in-range steps short-cut) against the former step, kept here verbatim, over
  random series for every rule kind, windows, gaps, late and repeated readings;
- the evaluator's jsonb reader (msgspec) against json.loads on what PostgreSQL gives out;
- the cache of a channel's built rules: a rule that is logged about is built and
  logged on every pass, as before; an edited rule is another entry; it is bounded;
- the state saved through binary arrays reads back as written, quotes, backslashes
  and all, in every checkpoint mode;
- an upgrade moves each channel's checkpoint array into rows of their own (migrations
  0029, 0030) in order, leaves the array, and a rewind then starts from them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import random
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
import pytest
from psycopg.types.json import Jsonb

from opensense import db
from opensense.alarms import engine, evaluator, tasks
from opensense.alarms.engine import Rule, RuleState, Transition, Window
from opensense.api.jsonutil import rfc3339
from opensense.api.keys import POOL
from opensense.settings import Config

from .fixtures.clock import FakeClock
from .fixtures.database import TEST_ROLES, owner_of
from .fixtures.server import World, test_config

T0 = datetime(2026, 3, 28, 20, 0, tzinfo=UTC)  # DST in Europe starts the next night
BERLIN = ZoneInfo("Europe/Berlin")


# --- the former step, as it was at 81fe07d ----------------------------------------------


def former_step(
    rule: Rule,
    st: RuleState,
    ts: datetime,
    value: float,
    tz: ZoneInfo = engine.UTC_ZONE,
    lookup: engine.Lookup = engine._no_lookup,
) -> tuple[RuleState, list[Transition]]:
    out: list[Transition] = []
    if st.last_ts is not None and ts <= st.last_ts:
        return st, out
    gap = engine.rule_kinds.behaviour(rule.kind).gap
    if gap is not None and st.last_ts is not None:
        gap_start = st.last_ts + gap(rule.params)
        if ts > gap_start:
            st = engine.advance(rule, st, gap_start, out)
            st = engine._judge(rule, st, gap_start, True, None, out)
            st = engine.advance(rule, st, ts, out)
    st = engine.advance(rule, st, ts, out)
    window = engine._hist_window(rule)
    hist = [(t, v) for t, v in st.hist if t >= ts - window] + [(ts, value)] if window else []
    st = replace(st, hist=hist, last_ts=ts)
    w = engine.active_window(rule.windows, tz, ts) if rule.windows else None
    if w is not None and w.params is None:
        return st, out
    params = {**rule.params, **(w.params or {})} if w is not None else rule.params
    bad = engine.breach(rule, params, st, ts, value, lookup)
    if bad is None:
        return st, out
    if bad and st.status in ("grace", "alarm", "clearing") and st.value is not None:
        worst = max(st.value, value) if engine._above(rule, params, value) else min(st.value, value)
        if worst != st.value and st.status in ("alarm", "clearing"):
            out.append(Transition("peak", rule.id, ts, st.since, worst))
        st = replace(st, value=worst)
    return engine._judge(rule, st, ts, bad, value, out), out


RULES = [
    Rule("rul_r", "range", {"ok_min": -2.0, "ok_max": 5.0}, grace_min=15),
    Rule("rul_r0", "range", {"ok_max": 5.0}, grace_min=0, clear_min=5),
    Rule("rul_rl", "range", {"ok_min": 2.0}, grace_min=3, clear_min=0),
    Rule(
        "rul_w",
        "range",
        {"ok_max": 5.0},
        grace_min=10,
        windows=(
            Window("FREQ=DAILY;BYHOUR=2;BYMINUTE=0", 45, {"ok_max": 12.0}),
            Window("FREQ=DAILY;BYHOUR=14;BYMINUTE=30", 30, None),
        ),
    ),
    Rule("rul_d", "delta", {"max_delta": 2.0, "interval_s": 600}, grace_min=5),
    Rule("rul_v", "derivative", {"max_rate": 6.0, "min_rate": -6.0, "window_s": 1800}, 5),
    Rule("rul_a", "absence", {"max_gap_s": 900}, grace_min=0),
    Rule("rul_c", "comparison", {"other_channel_id": "chn_o", "op": "gt", "offset": 1.0}, 5),
]


def _series(rng: random.Random, n: int) -> list[tuple[datetime, float]]:
    """Readings a minute or so apart with outages, late and repeated ones, excursions
    of every length, and values around every limit above."""
    out, t, base = [], T0, 3.0
    for _ in range(n):
        r = rng.random()
        if r < 0.03:
            t += timedelta(minutes=rng.randint(16, 400))  # an outage
        elif r < 0.06 and out:
            out.append((t - timedelta(minutes=rng.randint(0, 30)), base))  # late or repeated
            continue
        else:
            t += timedelta(seconds=rng.choice((30, 60, 60, 60, 90, 600)))
        if rng.random() < 0.08:
            base = rng.choice((3.0, 4.9, 5.0, 5.1, 8.0, 13.0, 1.0, -3.0, 3.5))
        out.append((t, round(base + rng.uniform(-0.4, 0.4), 2)))
    return out


def _lookup(cid: str, t: datetime) -> float | None:
    m = t.minute
    return None if m % 13 == 0 else 2.0 + (m % 5)


@pytest.mark.parametrize("rule", RULES, ids=[r.id for r in RULES])
def test_step_decides_as_the_former_step_over_random_series(rule: Rule) -> None:
    for seed in range(12):
        rng = random.Random(f"{rule.id}/{seed}")
        tz = rng.choice((BERLIN, engine.UTC_ZONE))
        a = b = RuleState()
        trs_a: list[Transition] = []
        trs_b: list[Transition] = []
        for ts, v in _series(rng, 400):
            a2, out_a = engine.step(rule, a, ts, v, tz, _lookup)
            b2, out_b = former_step(rule, b, ts, v, tz, _lookup)
            assert (a2.to_json(), out_a) == (b2.to_json(), out_b), (seed, ts, v)
            assert a2 == b2
            a, b = a2, b2
            trs_a += out_a
            trs_b += out_b
        assert trs_a == trs_b
    # the series reach every state (else the comparison proves little)
    seen = {t.what for t in trs_a}
    assert {"grace", "alarm"} <= seen or rule.kind == "comparison" and "grace" in seen


def test_step_leaves_the_state_passed_in_as_it_was() -> None:
    rule = RULES[0]
    st = RuleState()
    before = st.to_json()
    st2, _ = engine.step(rule, st, T0, 9.0)
    assert st.to_json() == before and st2 is not st and st2.status == "grace"
    st3, _ = engine.step(rule, st2, T0 + timedelta(minutes=1), 3.0)
    assert st2.status == "grace" and st3.status == "ok" and st3.last_ts == T0 + timedelta(minutes=1)


# --- the rules of a channel, cached ------------------------------------------------------


def _text(*rules: dict[str, Any]) -> str:
    return json.dumps(list(rules))


GOOD = {"id": "rul_g1", "kind": "range", "params": {"ok_max": 5.0}, "grace_min": 15,
        "clear_min": None, "severity": "alarm", "windows": None, "renotify_min": None}  # fmt: skip


def test_a_clean_rule_is_built_once_an_edited_one_again() -> None:
    evaluator._RULES_CACHE.clear()
    first = evaluator._rules(_text(GOOD))
    again = evaluator._rules(_text(GOOD))
    assert first == again == [evaluator.rule_from_json(GOOD)]
    assert again[0] is first[0] and again is not first  # built once; a list of its own
    edited = evaluator._rules(_text({**GOOD, "params": {"ok_max": 7.0}}))
    assert edited[0].params == {"ok_max": 7.0} and first[0].params == {"ok_max": 5.0}
    assert evaluator._rules("[]") == []


def test_channels_sharing_a_rule_body_get_their_own_ids_and_one_built_body() -> None:
    evaluator._RULES_CACHE.clear()
    evaluator._BODY_CACHE.clear()
    one = evaluator._rules(_text({**GOOD, "id": "rul_one"}))
    two = evaluator._rules(_text({**GOOD, "id": "rul_two"}))
    assert [r.id for r in one] == ["rul_one"] and [r.id for r in two] == ["rul_two"]
    assert two[0] == dataclasses.replace(one[0], id="rul_two")
    assert two[0].params is one[0].params  # checked and built once, for both


def test_a_rule_that_is_logged_about_is_logged_on_every_pass(
    caplog: pytest.LogCaptureFixture,
) -> None:
    evaluator._RULES_CACHE.clear()
    bad = {**GOOD, "id": "rul_bad", "params": {"ok_max": "hot"}}
    window = {**GOOD, "id": "rul_win", "windows": [{"rrule": "FREQ=SECONDLY", "duration_min": 5}]}
    caplog.set_level(logging.WARNING, logger=evaluator.log.name)
    for n in (1, 2, 3):
        rules = evaluator._rules(_text(GOOD, bad, window))
        assert [r.id for r in rules] == ["rul_g1", "rul_win"] and rules[1].windows == ()
        assert caplog.text.count("rule rul_bad cannot be judged") == n
        assert caplog.text.count("rule rul_win: window ignored") == n
    assert _text(GOOD, bad, window) not in evaluator._RULES_CACHE


def test_the_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    evaluator._RULES_CACHE.clear()
    monkeypatch.setattr(evaluator, "RULES_CACHE_MAX", 5)
    for i in range(23):
        rules = evaluator._rules(_text({**GOOD, "id": f"rul_{i}"}))
        assert [r.id for r in rules] == [f"rul_{i}"]
        assert 1 <= len(evaluator._RULES_CACHE) <= 5


# --- jsonb read by msgspec ---------------------------------------------------------------

JSONB_VALUES = [
    {"status": "alarm", "since": "2026-03-28T20:00:00+00:00", "value": 8.25,
     "hist": [["2026-03-28T20:00:00+01:00", -3.5e-7], ["2026-03-28T20:01:00+01:00", 1e300]]},
    {"a": 12345678901234567890123, "b": -0.0, "c": 1.5e-300, "d": [True, False, None]},
    {"q": 'quote " backslash \\ tab \t nl \n', "u": "Kühlraum ❄ 冷蔵", "e": ""},
    [],
    {},
    [[], [[{"x": 1}]]],
    "a string",
    0.1,
]  # fmt: skip


@pytest.mark.db
async def test_the_evaluators_jsonb_reader_gives_what_json_loads_gives(dsn: str) -> None:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        for v in JSONB_VALUES:
            plain = await (await conn.execute("SELECT %s::jsonb::text", (Jsonb(v),))).fetchone()
            fast = await (
                await evaluator._cursor(conn).execute("SELECT %s::jsonb", (Jsonb(v),))
            ).fetchone()
            assert plain is not None and fast is not None
            expect = json.loads(plain[0])
            assert fast[0] == expect and json.dumps(fast[0]) == json.dumps(expect), v
            # float and int kept apart as json.loads keeps them
            assert repr(fast[0]) == repr(expect)


# --- the state saved through binary arrays -----------------------------------------------


@pytest.fixture
def config(clock: FakeClock) -> Config:
    return test_config(clock, alarms_enabled=False, ingest_rate_per_min=10_000)


async def _channel(client: Any, world: World, clock: FakeClock, dsn: str, device: str) -> int:
    """A channel of `device` with a reading judged (its alarm_state row made)."""
    t = clock() - timedelta(minutes=5)
    r = await client.post(
        "/v1/ingest",
        json={"device": device,
              "measurements": [{"type": "temperature", "value": 3.0, "ts": rfc3339(t)}]},
        headers=world.dev_auth(device),
    )  # fmt: skip
    assert r.status == 200, await r.text()
    while (await evaluator.evaluate_dirty(client.app[POOL], clock())).channels:
        pass
    cid = (await r.json())["channels"][0]["channel_id"]
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        row = await (
            await conn.execute("SELECT num FROM channels WHERE id = %s", (cid,))
        ).fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.db
async def test_saved_state_reads_back_as_written_in_every_checkpoint_mode(
    client: Any, world: World, clock: FakeClock, dsn: str
) -> None:
    nums = [await _channel(client, world, clock, dsn, d) for d in ("fridge01", "fridge02")]
    num = nums[0]
    now = clock()
    t1, t2 = now - timedelta(hours=30), now  # t2: after the judged reading (greatest())
    rules = {'rul_"x\\': {"status": "grace", "hist": [[t1.isoformat(), 1e-7]], "value": 9.5}}
    events = {"rul_a": 'evt_"quoted"\\', "rul_b": "Kühl ❄"}
    cp1 = [t1.isoformat(), rules, events]
    cp2 = [t2.isoformat(), {"r": {"status": "ok"}}, {}]

    async def saved() -> tuple[Any, ...]:
        async with await psycopg.AsyncConnection.connect(dsn) as c:
            row = await (
                await c.execute(
                    "SELECT rules::text, events::text, coalesce((SELECT jsonb_agg(c.cp ORDER BY"
                    " c.id) FROM alarm_checkpoints c WHERE c.channel_num = s.channel_num),"
                    " '[]')::text, last_ts, due_at, status FROM alarm_state s"
                    " WHERE channel_num = %s",
                    (num,),
                )
            ).fetchone()
        assert row is not None
        return (json.loads(row[0]), json.loads(row[1]), json.loads(row[2]), *row[3:])

    def one(mode: str, cps: Any, cutoff: datetime | None, status: str = "alarm") -> evaluator.Save:
        return evaluator.Save(num, Jsonb(rules), Jsonb(events), mode, cps, cutoff, t2, None, status)

    async with client.app[POOL].connection() as conn:
        await evaluator.save(conn, [one("set", Jsonb([cp1]), None)], now)
        assert await saved() == (rules, events, [cp1], t2, None, "alarm")
        await evaluator.save(conn, [one("append", Jsonb([cp2]), None)], now)
        assert (await saved())[2] == [cp1, cp2]
        await evaluator.save(conn, [one("merge", Jsonb([cp2]), now - timedelta(hours=25))], now)
        assert (await saved())[2] == [cp2, cp2]
        # every array of a kind all None, and a second channel in the same statement
        other = evaluator.Save(nums[1], Jsonb({}), Jsonb({}), "keep", None, None, None, None, "ok")
        await evaluator.save(conn, [one("keep", None, None, "ok"), other], now)
        assert await saved() == (rules, events, [cp2, cp2], t2, None, "ok")


@pytest.mark.db
async def test_an_upgrade_copies_each_channels_checkpoint_array_into_rows_in_order(
    client: Any, world: World, clock: FakeClock, dsn: str
) -> None:
    """Migrations 0029 and 0030 on a database whose states hold their checkpoints in
    the array (as every release before them wrote): each checkpoint becomes a row,
    the same JSON in the same order, cp_first and cp_last are the array's ends, the
    arrays stay as they were (the previous release still reads them), and a rewind
    after the upgrade starts from a copied checkpoint."""
    num, other = [await _channel(client, world, clock, dsn, d) for d in ("fridge01", "fridge02")]
    t = clock() - timedelta(hours=2)
    owner = owner_of(dsn)  # (the DDL below is the owner role's, as migrations are)
    async with await psycopg.AsyncConnection.connect(owner, autocommit=True) as conn:
        rid = (
            await (
                await conn.execute(
                    "SELECT r.id FROM rules r JOIN channels c ON c.id = r.channel_id"
                    " WHERE c.num = %s",
                    (num,),
                )
            ).fetchone()
        )[0]
        # a state in grace since t (a reading of 9 °C), checkpoints every 10 minutes
        grace = {rid: {"status": "grace", "since": t.isoformat(), "value": 9.0, "hist": []}}
        cps = [
            [(t + timedelta(minutes=10 * i)).isoformat(),
             {rid: {**grace[rid], "last_ts": (t + timedelta(minutes=10 * i)).isoformat()}},
             {"note": 'quote " backslash \\ Kühl ❄'}]
            for i in range(3)
        ]  # fmt: skip
        # the schema as before 0029, the arrays as the releases before it wrote them
        await conn.execute("DROP TABLE alarm_checkpoints")
        await conn.execute("ALTER TABLE alarm_state DROP COLUMN cp_first, DROP COLUMN cp_last")
        await conn.execute("DELETE FROM schema_migrations WHERE version IN (29, 30)")
        await conn.execute(
            "UPDATE alarm_state SET checkpoints = %s, rules = %s, last_ts = %s"
            " WHERE channel_num = %s",
            (Jsonb(cps), Jsonb(cps[-1][1]), t + timedelta(minutes=25), num),
        )
        array_before = await (
            await conn.execute("SELECT checkpoints FROM alarm_state WHERE channel_num = %s", (num,))
        ).fetchone()
        await asyncio.to_thread(db.migrate, owner, None, TEST_ROLES.app)
        rows = await (
            await conn.execute(
                "SELECT channel_num, at, cp FROM alarm_checkpoints ORDER BY channel_num, id"
            )
        ).fetchall()
        assert rows == [(num, datetime.fromisoformat(c[0]), c) for c in cps]
        state = await (
            await conn.execute(
                "SELECT checkpoints, cp_first, cp_last FROM alarm_state WHERE channel_num = %s",
                (num,),
            )
        ).fetchone()
        assert state == (
            array_before[0],
            datetime.fromisoformat(cps[0][0]),
            datetime.fromisoformat(cps[-1][0]),
        )
        assert await (
            await conn.execute(
                "SELECT checkpoints, cp_first, cp_last FROM alarm_state WHERE channel_num = %s",
                (other,),
            )
        ).fetchone() == ([], None, None)
        # a late reading 1 minute after the second checkpoint, in range: the rewind
        # starts from that copied checkpoint (grace since t) and the reading ends it
        late = t + timedelta(minutes=11)
        await conn.execute(
            "INSERT INTO measurements (channel_num, ts, value) VALUES (%s, %s, 3.0)", (num, late)
        )
        await conn.execute(
            "INSERT INTO alarm_dirty (channel_num, since) VALUES (%s, %s)", (num, late)
        )
    st = await evaluator.evaluate_dirty(client.app[POOL], clock())
    assert st.rewinds == 1 and st.channels == 1
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        rules, kept = await (
            await conn.execute(
                "SELECT s.rules, (SELECT jsonb_agg(c.cp ORDER BY c.id) FROM alarm_checkpoints c"
                " WHERE c.channel_num = s.channel_num) FROM alarm_state s WHERE channel_num = %s",
                (num,),
            )
        ).fetchone()
    # judged on from there: the in-range reading ended the grace the checkpoint held
    assert rules[rid]["status"] == "ok" and rules[rid]["since"] is None
    assert kept == cps[:2]  # those before the late reading


# --- the pace of the background evaluator --------------------------------------------------


async def _dirty(dsn: str) -> set[int]:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute("SELECT channel_num FROM alarm_dirty")
        return {n for (n,) in await cur.fetchall()}


@pytest.mark.db
async def test_a_pass_judges_only_channels_marked_long_enough_ago(
    client: Any, world: World, clock: FakeClock, dsn: str
) -> None:
    """`settled_s` (the background evaluator passes tasks.COMMITS_GATHER_S): a
    channel marked dirty less than that ago stays dirty for a later pass; one marked
    earlier is judged. Without it (tests, tools) every dirty channel is judged."""
    old, new = [await _channel(client, world, clock, dsn, d) for d in ("fridge01", "fridge02")]
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(
            "INSERT INTO alarm_dirty (channel_num, since, marked_at) VALUES"
            " (%s, %s, clock_timestamp() - interval '5 seconds'), (%s, %s, clock_timestamp())",
            (old, clock() - timedelta(minutes=5), new, clock() - timedelta(minutes=5)),
        )
    pool = client.app[POOL]
    st = await evaluator.evaluate_dirty(pool, clock(), settled_s=2.0)
    assert st.channels == 1 and await _dirty(dsn) == {new}
    assert (await evaluator.evaluate_dirty(pool, clock(), settled_s=2.0)).channels == 0
    assert (await evaluator.evaluate_dirty(pool, clock())).channels == 1
    assert await _dirty(dsn) == set()


@pytest.mark.db
async def test_a_channel_judged_within_the_gather_time_waits_one_judged_before_does_not(
    client: Any, world: World, clock: FakeClock, dsn: str
) -> None:
    """`recent` (the background evaluator's, OPENSENSE_ALARM_GATHER_MS): a channel
    this process judged less than `gap_s` ago is left dirty until then, or until its
    mark is that old; any other channel is judged at once (an alarm too: under the
    old rule every mark waited the whole gather, then up to twice that). A steady
    stream is so judged about once a gather time, as before."""
    a, b = [await _channel(client, world, clock, dsn, d) for d in ("fridge01", "fridge02")]
    t = [1000.0]
    recent = evaluator.Recent(30.0, clock=lambda: t[0])
    pool = client.app[POOL]

    async def mark(*nums: int, ago_s: float = 0.0) -> None:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            for n in nums:
                await conn.execute(
                    "INSERT INTO alarm_dirty (channel_num, since, marked_at)"
                    " VALUES (%s, %s, clock_timestamp() - make_interval(secs => %s))",
                    (n, clock() - timedelta(minutes=5), ago_s),
                )

    recent.judged([a])  # as if a pass had just judged it
    assert recent.next_due() == 30.0
    await mark(a, b)
    assert (await evaluator.evaluate_dirty(pool, clock(), recent=recent)).channels == 1
    assert await _dirty(dsn) == {a}  # b at once, a left for later
    assert sorted(recent.nums()) == sorted([a, b]) and recent.next_due() == 30.0
    t[0] += 10
    assert (await evaluator.evaluate_dirty(pool, clock(), recent=recent)).channels == 0
    assert recent.next_due() == 20.0  # when the loop is to look again
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("UPDATE alarm_dirty SET marked_at = marked_at - interval '40 s'")
    assert (await evaluator.evaluate_dirty(pool, clock(), recent=recent)).channels == 1
    assert await _dirty(dsn) == set()  # a's mark is older than the gather time: judged
    await mark(a, b)
    assert (await evaluator.evaluate_dirty(pool, clock(), recent=recent)).channels == 0
    t[0] += 30.5  # b judged 40.5 s ago, a 30.5 s ago: both may be judged again
    assert recent.nums() == [] and recent.next_due() is None
    assert (await evaluator.evaluate_dirty(pool, clock(), recent=recent)).channels == 2
    assert await _dirty(dsn) == set()


@pytest.mark.db
async def test_a_run_that_asks_for_the_next_one_gets_it_without_a_wake_up(dsn: str) -> None:
    """The evaluator's run returns when a channel it left for later may be judged
    (`Recent.next_due`); the loop runs again then, not at its sweep (`every`, here
    60 s) or a commit's NOTIFY."""
    runs: list[float] = []

    async def work(woken: bool) -> float | None:
        runs.append(time.monotonic())
        return 0.3 if len(runs) == 1 else None

    loop = asyncio.create_task(tasks._listen_loop(dsn, "opensense_test_due", 60, work, 0.0))
    try:
        for _ in range(100):
            if len(runs) >= 2:
                break
            await asyncio.sleep(0.05)
        assert len(runs) == 2 and 0.25 <= runs[1] - runs[0] < 3
    finally:
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop


@pytest.mark.db
async def test_a_wake_up_during_the_gather_brings_another_run(dsn: str) -> None:
    """The listen loop clears its wake-up before the gather, not after it: a mark
    committed while it waits (which the run may not judge yet: it is not settled) wakes
    the loop again at once, rather than waiting for the sweep (`every`, here 60 s)."""
    runs: list[bool] = []
    gather = 0.3

    async def work(woken: bool) -> None:
        runs.append(woken)

    loop = asyncio.create_task(tasks._listen_loop(dsn, "opensense_test_gather", 60, work, gather))
    try:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            for _ in range(100):  # the loop's first run (whatever was missed) is made
                if runs:
                    break
                await asyncio.sleep(0.02)
            await conn.execute("NOTIFY opensense_test_gather")
            await asyncio.sleep(gather / 3)  # the loop is in its gather now
            await conn.execute("NOTIFY opensense_test_gather")
            for _ in range(100):
                if len(runs) >= 3:
                    break
                await asyncio.sleep(0.05)
        assert runs == [True, True, True]  # the first, the woken one, and one more
    finally:
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop


@pytest.mark.db
async def test_a_channel_a_pass_could_not_finish_keeps_its_place(
    client: Any, world: World, clock: FakeClock, dsn: str
) -> None:
    """A channel a pass marks dirty again (out of budget here) keeps the time it was
    first marked: settled already, the next pass of the same loop takes it, rather
    than a gather later."""
    for d in ("fridge01", "fridge02"):
        await _channel(client, world, clock, dsn, d)
    for d in ("fridge01", "fridge02"):  # a new reading each, both dirty
        r = await client.post(
            "/v1/ingest",
            json={"device": d, "measurements": [
                {"type": "temperature", "value": 4.0, "ts": rfc3339(clock() - timedelta(minutes=1))}
            ]},
            headers=world.dev_auth(d),
        )  # fmt: skip
        assert r.status == 200, await r.text()
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("UPDATE alarm_dirty SET marked_at = marked_at - interval '5 seconds'")
    pool = client.app[POOL]
    st = await evaluator.evaluate_dirty(pool, clock(), budget_s=0, settled_s=2.0)
    assert (st.channels, st.deferred) == (1, 1) and len(await _dirty(dsn)) == 1
    st = await evaluator.evaluate_dirty(pool, clock(), budget_s=0, settled_s=2.0)
    assert (st.channels, st.deferred) == (1, 0) and await _dirty(dsn) == set()
