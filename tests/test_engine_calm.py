"""engine.calm_run: a run of readings that moves no rule passed at once, with the
state `step` gives reading by reading (the evaluator's shortcut for a channel in range,
alarms/evaluator.py `_run`). Pure: no clock, no database."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from opensense.alarms import engine
from opensense.alarms.engine import Rule, RuleState, Window

T0 = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
RANGE = Rule("rul_r", "range", {"ok_min": -2.0, "ok_max": 5.0}, grace_min=15)
ABSENCE = Rule("rul_a", "absence", {"max_gap_s": 600}, grace_min=0)


def stepped(rule: Rule, state: RuleState, readings):
    out = []
    for ts, v in readings:
        state, trs = engine.step(rule, state, ts, v)
        out.extend(trs)
    return state, out


def run(values, start: datetime = T0, every_s: float = 60.0):
    return [(start + timedelta(seconds=i * every_s), v) for i, v in enumerate(values)]


def test_readings_in_range_move_only_the_last_time():
    readings = run([0.0, 4.9, 5.0, -2.0, 1.5])
    calm = engine.calm_run(RANGE, RuleState(), readings)
    assert calm is not None
    assert calm == stepped(RANGE, RuleState(), readings)[0]
    assert calm.last_ts == readings[-1][0] and calm.status == "ok"


def test_what_can_move_a_rule_is_left_to_step():
    assert engine.calm_run(RANGE, RuleState(), run([0.0, 5.01, 1.0])) is None
    assert engine.calm_run(RANGE, RuleState(), run([-2.01])) is None
    grace = RuleState("grace", since=T0, value=7.0, last_ts=T0)
    assert engine.calm_run(RANGE, grace, run([1.0], T0 + timedelta(minutes=1))) is None
    windowed = Rule("rul_w", "range", RANGE.params, windows=(Window("FREQ=DAILY", 60),))
    assert engine.calm_run(windowed, RuleState(), run([1.0])) is None
    delta = Rule("rul_d", "delta", {"max_delta": 3.0, "interval_s": 600})
    assert engine.calm_run(delta, RuleState(), run([1.0, 1.1])) is None
    # absence: a silence longer than its gap inside the run, or before its first reading
    assert engine.calm_run(ABSENCE, RuleState(), run([1.0, 1.0], every_s=601)) is None
    after = RuleState(last_ts=T0)
    assert engine.calm_run(ABSENCE, after, run([1.0], T0 + timedelta(seconds=601))) is None
    assert engine.calm_run(ABSENCE, after, run([1.0], T0 + timedelta(seconds=600))) is not None


def test_readings_seen_already_are_skipped_as_step_skips_them():
    state = RuleState(last_ts=T0 + timedelta(minutes=2))
    readings = run([9.0, 9.0, 9.0, 1.0, 2.0])  # the out-of-range ones are at or before last_ts
    calm = engine.calm_run(RANGE, state, readings)
    assert calm is not None and calm == stepped(RANGE, state, readings)[0]
    assert engine.calm_run(RANGE, state, readings[:3]) is state


limits = st.one_of(st.none(), st.floats(-30, 30, allow_nan=False).map(lambda x: round(x, 1)))
values = st.floats(-40, 40, allow_nan=False).map(lambda x: round(x, 1))
maybe_t = st.one_of(st.none(), st.integers(-3000, 3000).map(lambda s: T0 + timedelta(seconds=s)))


@st.composite
def cases(draw):
    kind = draw(st.sampled_from(["range", "absence"]))
    if kind == "range":
        rule = Rule("rul_x", "range", {"ok_min": draw(limits), "ok_max": draw(limits)}, 15)
    else:
        rule = Rule("rul_x", "absence", {"max_gap_s": draw(st.integers(30, 900))})
    status = draw(st.sampled_from(["ok", "ok", "ok", "grace", "alarm", "clearing"]))
    state = RuleState(
        status,
        since=draw(maybe_t),
        clear_since=draw(maybe_t),
        value=draw(st.one_of(st.none(), values)),
        last_ts=draw(maybe_t),
        hist=draw(st.lists(st.tuples(st.just(T0), values), max_size=2)),
    )
    gaps = draw(st.lists(st.integers(1, 1000), min_size=0, max_size=25))
    start = T0 + timedelta(seconds=draw(st.integers(-2000, 2000)))
    times, t = [], start
    for g in gaps:
        times.append(t)
        t += timedelta(seconds=g)
    readings = [(ts, draw(values)) for ts in times]
    return rule, state, readings


@settings(max_examples=600, deadline=None)
@given(cases())
def test_calm_run_gives_what_step_gives(case):
    rule, state, readings = case
    calm = engine.calm_run(rule, state, readings)
    if calm is None:
        return  # left to step (what the evaluator then does)
    want, transitions = stepped(rule, state, readings)
    assert transitions == []
    assert calm == want


# --- engine.feed: calm stretches inside a run that is not calm as a whole -------------------


def fed_counting_steps(monkeypatch, rule: Rule, state: RuleState, readings):
    """engine.feed's answer, and the readings it handed to `step` one by one."""
    calls = []
    real = engine.step

    def counted(rule, st, ts, v, *a):
        calls.append((ts, v))
        return real(rule, st, ts, v, *a)

    monkeypatch.setattr(engine, "step", counted)
    got = engine.feed(rule, state, readings)
    monkeypatch.undo()
    return got, calls


def test_feed_steps_only_around_the_excursion(monkeypatch):
    """A run in range but for one reading: the rule in ok passes the stretches before
    and after at once, and only the readings that can move it are stepped."""
    readings = run([1.0] * 10 + [9.0, 1.0] + [2.0] * 10)
    got, calls = fed_counting_steps(monkeypatch, RANGE, RuleState(), readings)
    assert got == stepped(RANGE, RuleState(), readings)
    assert [t.what for t in got[1]] == ["grace", "ok"]
    assert [v for _, v in calls] == [9.0, 1.0]  # the excursion and the reading that ends it


def test_feed_passes_a_clearing_rule_to_the_reading_that_clears_it(monkeypatch):
    """A rule clearing (grace 15 min): readings in range pass at once until the clear
    delay has run; the reading that completes it is stepped (the alarm clears), and the
    rule, in ok, passes the rest at once; a reading out of range is stepped (realarm)."""
    clearing = RuleState("clearing", since=T0 - timedelta(hours=1), clear_since=T0, value=9.0)
    readings = run([1.0] * 20 + [9.0] + [1.0] * 5, T0 + timedelta(minutes=1))
    got, calls = fed_counting_steps(monkeypatch, RANGE, clearing, readings)
    assert got == stepped(RANGE, clearing, readings)
    assert [(t.what, t.at) for t in got[1]] == [
        ("cleared", T0 + timedelta(minutes=15)),
        ("grace", readings[20][0]),
        ("ok", readings[21][0]),
    ]
    # stepped: the reading at 15 min (clears), the excursion and the one after it
    assert [ts for ts, _ in calls] == [readings[14][0], readings[20][0], readings[21][0]]
    realarm = engine.feed(RANGE, clearing, run([1.0, 9.0, 1.0], T0 + timedelta(minutes=1)))
    assert realarm == stepped(RANGE, clearing, run([1.0, 9.0, 1.0], T0 + timedelta(minutes=1)))
    assert [t.what for t in realarm[1]] == ["realarm", "clearing"]
    # readings at or before the rule's last one are skipped, as step skips them
    seen = RuleState(
        "clearing", since=T0, clear_since=T0, value=9.0, last_ts=T0 + timedelta(hours=1)
    )
    assert engine.feed(RANGE, seen, readings[:5]) == (seen, [])


near = st.one_of(  # mostly in range, now and then out of it
    st.floats(-2, 5, allow_nan=False), st.floats(-40, 40, allow_nan=False)
).map(lambda x: round(x, 1))


@st.composite
def mixed_cases(draw):
    kind = draw(st.sampled_from(["range", "range", "absence", "delta"]))
    grace = draw(st.integers(0, 20))
    if kind == "range":
        params = {"ok_min": draw(st.sampled_from([None, -2.0])), "ok_max": 5.0}
        rule = Rule("rul_x", "range", params, grace, draw(st.sampled_from([None, 0, 5])))
    elif kind == "absence":
        rule = Rule("rul_x", "absence", {"max_gap_s": draw(st.integers(30, 900))}, grace)
    else:
        rule = Rule("rul_x", "delta", {"max_delta": 3.0, "interval_s": 300}, grace)
    state = RuleState(
        draw(st.sampled_from(["ok", "ok", "grace", "alarm", "clearing"])),
        since=draw(maybe_t),
        clear_since=draw(maybe_t),
        value=draw(st.one_of(st.none(), values)),
        last_ts=draw(maybe_t),
    )
    times, t = [], T0 + timedelta(seconds=draw(st.integers(-2000, 2000)))
    for g in draw(st.lists(st.integers(1, 700), max_size=40)):
        times.append(t)
        t += timedelta(seconds=g)
    return rule, state, [(ts, draw(near)) for ts in times]


@settings(max_examples=800, deadline=None)
@given(mixed_cases())
def test_feed_gives_what_step_gives(case):
    rule, state, readings = case
    assert engine.feed(rule, state, readings) == stepped(rule, state, readings)


def test_feed_steps_a_windowed_rule_reading_by_reading():
    windowed = Rule("rul_w", "range", RANGE.params, 15, windows=(Window("FREQ=DAILY", 60),))
    readings = run([1.0, 9.0, 9.0, 1.0] * 10, T0 - timedelta(minutes=30))
    assert engine.feed(windowed, RuleState(), readings) == stepped(windowed, RuleState(), readings)
