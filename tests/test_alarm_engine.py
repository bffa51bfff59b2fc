"""The rule engine as pure functions: scenarios fed reading by reading with their
timestamps (no clock, no database)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from opensense.alarms import engine
from opensense.alarms.engine import Rule, RuleState, Window

T0 = datetime(2026, 3, 28, 20, 0, tzinfo=UTC)  # DST in Europe starts the next night
BERLIN = ZoneInfo("Europe/Berlin")
CHILLED = Rule("rul_a", "range", {"ok_min": -2.0, "ok_max": 5.0}, grace_min=15)


def feed(rule: Rule, series, st: RuleState | None = None, tz=BERLIN, lookup=None):
    st = st or RuleState()
    out = []
    for ts, v in series:
        st, trs = engine.step(rule, st, ts, v, tz, lookup or (lambda c, t: None))
        out.extend(trs)
    return st, out


def minutes(start: datetime, values, every: float = 1.0):
    return [(start + timedelta(minutes=i * every), v) for i, v in enumerate(values)]


def whats(trs, *keep):
    return [(t.what, t.at) for t in trs if not keep or t.what in keep]


def test_door_open_ten_minutes_is_no_alarm():
    series = minutes(T0, [3.5] * 10 + [7.0] * 10 + [4.0] * 30)
    st, trs = feed(CHILLED, series)
    assert whats(trs, "alarm", "cleared") == []
    assert [t.what for t in trs] == ["grace", "ok"] and st.status == "ok"


def test_compressor_failure_alarms_after_grace_at_its_true_time_and_clears_after_the_same_delay():
    warm = [4.0] * 5 + [5.0 + 0.2 * i for i in range(60)]  # rises past 5 °C at minute 6
    cool = [4.0] * 40
    st, trs = feed(CHILLED, minutes(T0, warm + cool))
    start = T0 + timedelta(minutes=6)
    assert whats(trs, "alarm") == [("alarm", start + timedelta(minutes=15))]
    back = T0 + timedelta(minutes=65)
    assert whats(trs, "cleared") == [("cleared", back + timedelta(minutes=15))]
    alarm = next(t for t in trs if t.what == "alarm")
    assert alarm.since == start
    assert st.status == "ok"


def test_flapping_around_the_limit_is_one_event():
    # out long enough to alarm, then 4.9 / 5.1 for two hours: never 15 min back in range
    series = minutes(T0, [6.0] * 20 + [4.9, 5.1] * 60 + [4.0] * 20)
    _, trs = feed(CHILLED, series)
    assert [t.what for t in trs if t.what in ("alarm", "cleared")] == ["alarm", "cleared"]
    # and flapping that never lasts grace is no alarm at all
    _, trs = feed(CHILLED, minutes(T0, [4.9, 5.1] * 60))
    assert whats(trs, "alarm") == []


def test_nightly_defrost_window_overrides_the_limits_across_dst():
    defrost = Window("FREQ=DAILY;BYHOUR=2;BYMINUTE=0", 45, {"ok_max": 12.0})
    rule = Rule("rul_d", "range", {"ok_max": 5.0}, grace_min=15, windows=(defrost,))
    for day in (datetime(2026, 3, 28), datetime(2026, 3, 29), datetime(2026, 10, 25)):
        start = day.replace(hour=2, tzinfo=BERLIN).astimezone(UTC)  # 02:00 local, either offset
        warm = minutes(start, [10.0] * 40 + [6.0] * 10 + [4.0] * 30)
        st, trs = feed(rule, minutes(start - timedelta(minutes=30), [3.0] * 30) + warm)
        assert whats(trs, "alarm") == [], day
    # the same warmth outside the window alarms
    start = datetime(2026, 3, 29, 4, 0, tzinfo=BERLIN)
    _, trs = feed(rule, minutes(start, [10.0] * 40))
    assert len(whats(trs, "alarm")) == 1


def test_window_without_params_switches_the_rule_off():
    w = Window("FREQ=WEEKLY;BYDAY=MO;BYHOUR=6", 60, None)
    rule = Rule("rul_w", "range", {"ok_max": 5.0}, grace_min=0, windows=(w,))
    monday_6 = datetime(2026, 3, 30, 6, 10, tzinfo=BERLIN)
    _, trs = feed(rule, [(monday_6, 20.0)])
    assert trs == []
    _, trs = feed(rule, [(monday_6 + timedelta(hours=2), 20.0)])
    assert [t.what for t in trs] == ["grace", "alarm"]


def test_late_readings_after_a_six_hour_outage_give_events_at_their_true_times():
    # the node buffered 6 h: the fridge warmed at 01:00, recovered at 03:00
    before = minutes(T0, [3.0] * 60)
    outage_start = T0 + timedelta(hours=1)
    buffered = minutes(outage_start, [3.0] * 60 + [9.0] * 120 + [3.0] * 180)
    st, _ = feed(CHILLED, before)
    st, trs = feed(CHILLED, buffered, st)  # all arrive at once, 6 h later
    warm = outage_start + timedelta(hours=1)
    assert whats(trs, "alarm") == [("alarm", warm + timedelta(minutes=15))]
    assert whats(trs, "cleared") == [("cleared", warm + timedelta(hours=2, minutes=15))]


def test_tick_opens_the_alarm_when_the_probe_goes_quiet_in_grace():
    st, trs = feed(CHILLED, minutes(T0, [3.0, 8.0]))
    assert st.status == "grace"
    assert engine.due_at(CHILLED, st) == T0 + timedelta(minutes=16)
    st2, trs = engine.tick(CHILLED, st, T0 + timedelta(minutes=10))
    assert trs == []
    st2, trs = engine.tick(CHILLED, st, T0 + timedelta(minutes=20))
    assert whats(trs) == [("alarm", T0 + timedelta(minutes=16))]
    # clearing is only confirmed by readings, never by silence
    st3, trs = feed(CHILLED, minutes(T0 + timedelta(minutes=21), [3.0]), st2)
    assert st3.status == "clearing"
    _, trs = engine.tick(CHILLED, st3, T0 + timedelta(hours=5))
    assert trs == []


def test_absence_gap_opens_and_closes_at_true_times():
    rule = Rule("rul_x", "absence", {"max_gap_s": 600}, grace_min=0)
    series = minutes(T0, [3.0] * 5) + minutes(T0 + timedelta(minutes=60), [3.0] * 5)
    _, trs = feed(rule, series)
    assert whats(trs, "alarm", "cleared") == [
        ("alarm", T0 + timedelta(minutes=14)),
        ("cleared", T0 + timedelta(minutes=60)),
    ]
    st, _ = feed(rule, minutes(T0, [3.0]))
    _, trs = engine.tick(rule, st, T0 + timedelta(minutes=30))
    assert whats(trs, "alarm") == [("alarm", T0 + timedelta(minutes=10))]


def test_delta_derivative_and_comparison():
    delta = Rule("rul_dl", "delta", {"max_delta": 3.0, "interval_s": 600})
    _, trs = feed(delta, minutes(T0, [3.0, 3.5, 4.0, 7.5]))
    assert whats(trs, "alarm") == [("alarm", T0 + timedelta(minutes=3))]

    deriv = Rule("rul_dv", "derivative", {"max_rate": 2.0})  # °C per hour
    slow = minutes(T0, [3.0 + i * 0.02 for i in range(90)])  # 1.2 °C/h
    _, trs = feed(deriv, slow)
    assert whats(trs, "alarm") == []
    fast = minutes(T0, [3.0 + i * 0.1 for i in range(90)])  # 6 °C/h
    _, trs = feed(deriv, fast)
    assert len(whats(trs, "alarm")) == 1

    comp = Rule("rul_c", "comparison", {"other_channel_id": "chn_room", "offset": -5.0})
    room = 20.0
    _, trs = feed(comp, minutes(T0, [10.0, 16.0]), lookup=lambda c, t: room)
    assert whats(trs, "alarm") == [("alarm", T0 + timedelta(minutes=1))]


def test_state_round_trips_through_json():
    st, _ = feed(CHILLED, minutes(T0, [3.0, 8.0, 9.0]))
    again = RuleState.from_json(st.to_json())
    assert again == st


def test_params_are_checked_from_the_declared_kinds():
    assert engine.check_params("range", {"ok_min": 1, "ok_max": 0}) is not None
    assert engine.check_params("range", {}) is not None
    assert engine.check_params("range", {"ok_max": 5}) is None
    assert engine.check_params("delta", {}) is not None
    assert engine.check_params("absence", {"max_gap_s": -1}) is not None
    assert engine.check_params("nope", {}) is not None
    assert engine.check_window({"rrule": "FREQ=NEVER", "duration_min": 5}) is not None
    assert engine.check_window({"rrule": "FREQ=DAILY;BYHOUR=2", "duration_min": 30}) is None


def test_channel_status_is_the_most_severe():
    a = Rule("a", "range", {"ok_max": 5.0})
    b = Rule("b", "range", {"ok_max": 8.0})
    states = {"a": RuleState(status="grace"), "b": RuleState(status="alarm")}
    assert engine.channel_status([a, b], states) == "alarm"
    assert engine.channel_status([a], states) == "grace"


def _peak(trs):
    """The event's worst value as the evaluator records it: the alarm's, then each peak."""
    value = None
    for t in trs:
        if t.what in ("alarm", "peak"):
            value = t.value
    return value


def test_the_events_worst_value_counts_readings_after_the_alarm_opened():
    # issue 18 item 5: grace 15 min, 8.0 then 8.5 at +14 and 9.7 at +21 is a 9.7 event
    rule = Rule("rul_p", "range", {"ok_min": -2.0, "ok_max": 5.0}, grace_min=15)
    series = [
        (T0, 8.0),
        (T0 + timedelta(minutes=14), 8.5),
        (T0 + timedelta(minutes=21), 9.7),
        (T0 + timedelta(minutes=25), 9.0),
    ]
    st, trs = feed(rule, series)
    assert whats(trs, "alarm") == [("alarm", T0 + timedelta(minutes=15))]
    assert [(t.what, t.at, t.value) for t in trs if t.what == "peak"] == [
        ("peak", T0 + timedelta(minutes=21), 9.7)
    ]
    assert _peak(trs) == 9.7 and st.value == 9.7
    # split over two calls (two requests, the state saved between them) alike
    st1, trs1 = feed(rule, series[:2])
    st1 = RuleState.from_json(st1.to_json())
    _, trs2 = feed(rule, series[2:], st1)
    assert _peak(trs1 + trs2) == 9.7
    # below the range: the worst is the lowest
    cold = [(t, -v) for t, v in series]
    _, trs = feed(rule, cold)
    assert _peak(trs) == -9.7
    # and the cleared transition carries the same worst value
    _, trs = feed(rule, series + minutes(T0 + timedelta(minutes=26), [4.0] * 20))
    assert [t.value for t in trs if t.what == "cleared"] == [9.7]
