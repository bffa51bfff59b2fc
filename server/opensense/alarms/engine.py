"""The rule engine: pure functions of (rule, state, reading or time). No I/O.

A rule's state moves  ok -> grace -> alarm -> clearing -> ok:
- out of range starts `grace`; still out after `grace_min` opens the alarm at
  the true time `since + grace` (an excursion shorter than grace is no alarm);
- back in range starts `clearing`; still in range after the clear delay (by
  default the same as grace: Dickson's symmetric delay, so "back to normal" never
  flaps) clears it at `clear_since + clear delay`; out again while clearing
  simply continues the same alarm (one event, not twenty).

Readings are fed in timestamp order, so buffered readings that arrive hours late
produce the transitions that really happened, with their real times. The caller
persists `RuleState` (as JSON) between calls and keeps checkpoints to rewind to.

Rule kinds are declared once, as data: `RULE_KINDS` (the contract) and
`rule_kinds.BEHAVIOURS` (what each does).
"""

from __future__ import annotations

import bisect
import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from dateutil.rrule import rrule, rrulestr

from opensense_contract.rules import (  # re-exported: the engine's callers read them here
    HIST_MAX_S as HIST_MAX_S,
)
from opensense_contract.rules import RULE_KINDS as RULE_KINDS
from opensense_contract.rules import SEVERITIES as SEVERITIES
from opensense_contract.rules import Param as Param
from opensense_contract.rules import RuleKind as RuleKind
from opensense_contract.rules import check_params as check_params

from . import rule_kinds

# --- rule kinds -------------------------------------------------------------------------
# What a kind is on the wire (name, params, defaults, whether a gateway runs it) is
# the contract's (server/opensense_contract/rules.py); what it does (its check, the
# history it keeps, whether time alone can breach it) is its entry in
# rule_kinds.BEHAVIOURS. Nothing below branches on a kind's name.


UTC_ZONE = ZoneInfo("UTC")


# --- time windows -----------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """An RFC 5545 recurrence in the site's time zone; while it lasts, `params`
    override the rule's (None: the rule is not evaluated at all)."""

    rrule: str
    duration_min: int
    params: dict[str, Any] | None = None
    dtstart: str = "2024-01-01T00:00:00"  # local wall time of the first occurrence


# What a fridge schedule needs, and no more: dateutil enumerates a recurrence from
# its dtstart, so FREQ=SECONDLY or a dtstart in 1970 costs millions of occurrences
# for one reading (issue 11: a 43 s freeze of the whole server). Only DAILY and
# WEEKLY, these parts, bounded values and a dtstart in a sane range are accepted.
WINDOW_FREQS = ("DAILY", "WEEKLY")
WINDOW_PARTS = ("FREQ", "INTERVAL", "BYDAY", "BYHOUR", "BYMINUTE", "WKST")
WINDOW_MAX_INTERVAL = {"DAILY": 366, "WEEKLY": 52}
WINDOW_MAX_PER_DAY = 24  # BYHOUR x BYMINUTE: at most 24 starts a day
WINDOW_DTSTART_YEARS = (2000, 2100)
WINDOW_RRULE_MAX_LEN = 200
_WEEKDAYS = ("MO", "TU", "WE", "TH", "FR", "SA", "SU")


def check_window(w: Mapping[str, Any]) -> str | None:
    if not isinstance(w, Mapping):
        return "a window is an object {rrule, duration_min, params}"
    if not isinstance(w.get("rrule"), str):
        return "a window needs rrule (RFC 5545, e.g. FREQ=DAILY;BYHOUR=2;BYMINUTE=0)"
    d = w.get("duration_min")
    if isinstance(d, bool) or not isinstance(d, int) or not 0 < d <= 7 * 24 * 60:
        return "duration_min must be an integer of minutes, 1..10080"
    dtstart = w.get("dtstart", Window.dtstart)
    if not isinstance(dtstart, str):
        return "dtstart must be a local wall time such as 2024-01-01T00:00:00"
    try:
        _recurrence(w["rrule"], dtstart)
    except (ValueError, TypeError, OverflowError) as exc:
        return f"rrule {w['rrule'][:WINDOW_RRULE_MAX_LEN]!r} refused: {exc}"
    if w.get("params") is not None and not isinstance(w.get("params"), Mapping):
        return "window params must be an object (the limits that apply inside it) or null"
    return None


def _ints(name: str, value: str, lo: int, hi: int) -> list[int]:
    try:
        out = [int(x) for x in value.split(",")]
    except ValueError:
        raise ValueError(f"{name} takes whole numbers {lo}..{hi}") from None
    if not out or any(not lo <= x <= hi for x in out) or len(set(out)) != len(out):
        raise ValueError(f"{name} takes distinct whole numbers {lo}..{hi}")
    return out


def _check_rrule_text(text: str) -> str:
    """The recurrence's frequency, or ValueError saying what is refused and why."""
    if len(text) > WINDOW_RRULE_MAX_LEN:
        raise ValueError(f"at most {WINDOW_RRULE_MAX_LEN} characters")
    parts: dict[str, str] = {}
    for item in text.strip().upper().split(";"):
        name, sep, value = item.partition("=")
        if not sep or not value:
            raise ValueError(f"{item!r} is not NAME=VALUE")
        if name not in WINDOW_PARTS:
            raise ValueError(f"{name} is not accepted in a window; use {', '.join(WINDOW_PARTS)}")
        if name in parts:
            raise ValueError(f"{name} given twice")
        parts[name] = value
    freq = parts.get("FREQ")
    if freq not in WINDOW_FREQS:
        raise ValueError("FREQ must be DAILY or WEEKLY (a window is a daily or weekly schedule)")
    if "INTERVAL" in parts:
        _ints("INTERVAL", parts["INTERVAL"], 1, WINDOW_MAX_INTERVAL[freq])
    hours = _ints("BYHOUR", parts["BYHOUR"], 0, 23) if "BYHOUR" in parts else [0]
    mins = _ints("BYMINUTE", parts["BYMINUTE"], 0, 59) if "BYMINUTE" in parts else [0]
    if len(hours) * len(mins) > WINDOW_MAX_PER_DAY:
        raise ValueError(f"at most {WINDOW_MAX_PER_DAY} starts a day (BYHOUR x BYMINUTE)")
    for name in ("BYDAY", "WKST"):
        days = parts.get(name, "MO").split(",")
        if any(x not in _WEEKDAYS for x in days) or len(set(days)) != len(days):
            raise ValueError(f"{name} takes distinct days {','.join(_WEEKDAYS)} (no ordinals)")
    if "WKST" in parts and "," in parts["WKST"]:
        raise ValueError("WKST is one day")
    return freq


@dataclass(frozen=True)
class _Recurrence:
    rule: rrule  # built without dateutil's occurrence cache
    start: datetime  # naive local wall time
    period: timedelta  # the recurrence repeats after a whole number of these


@functools.lru_cache(maxsize=1024)
def _recurrence(text: str, dtstart: str) -> _Recurrence:
    """Parse and check one window's recurrence (a small object; the cache holds no
    occurrences). ValueError says what is refused."""
    freq = _check_rrule_text(text)
    start = datetime.fromisoformat(dtstart).replace(tzinfo=None)
    lo, hi = WINDOW_DTSTART_YEARS
    if not lo <= start.year < hi:
        raise ValueError(f"dtstart must lie in the years {lo}..{hi - 1}")
    r = rrulestr(text, dtstart=start, cache=False)
    if not isinstance(r, rrule):
        raise ValueError("one RRULE, without RDATE/EXDATE sets")
    interval = int(getattr(r, "_interval", 1))
    period = timedelta(days=interval) if freq == "DAILY" else timedelta(weeks=interval)
    return _Recurrence(r, start, period)


@functools.lru_cache(maxsize=512)
def _starts_near(text: str, dtstart: str, duration_min: int, day: datetime) -> tuple[datetime, ...]:
    """The window's starts (naive local wall times) from `day` - duration - 1 day to
    `day` + 2 days. The recurrence is re-anchored a whole number of periods before
    that span (the same occurrences: DAILY/WEEKLY with INTERVAL repeat exactly), so
    dateutil enumerates only the span, never from a distant dtstart. At most
    (7 + 3 days + one period) x 24 starts; cached per local day, so a channel's
    readings cost a bisection each."""
    rec = _recurrence(text, dtstart)
    lo = day - timedelta(minutes=duration_min, days=1)
    hi = day + timedelta(days=2)
    start = rec.start
    if lo > start:
        start += rec.period * ((lo - start) // rec.period)
    r = rec.rule.replace(dtstart=start)
    return tuple(r.between(lo, hi, inc=True))


def active_window(windows: tuple[Window, ...], tz: ZoneInfo, t: datetime) -> Window | None:
    """The window covering instant `t`. Occurrences are local wall times (02:00 is
    02:00 in summer and in winter); the duration is real elapsed time.

    Every occurrence has the same duration, so if any covers `t`, the one with the
    latest real start at or before `t` does. Wall time and real time run in the same
    order except within a DST shift (at most 2 h): the starts within 3 h of `t` are
    checked one by one, and of the earlier ones only the latest and those up to 2 h
    before it."""
    local = t.astimezone(tz).replace(tzinfo=None)
    day = local.replace(hour=0, minute=0, second=0, microsecond=0)
    near, far = local + timedelta(hours=3), local - timedelta(hours=3)
    for w in windows:
        dur = timedelta(minutes=w.duration_min)
        starts = _starts_near(w.rrule, w.dtstart, w.duration_min, day)
        i = bisect.bisect_right(starts, near)
        stop: datetime | None = None
        while i > 0:
            i -= 1
            occ = starts[i]
            if stop is not None and occ < stop:
                break
            if occ < far and stop is None:
                stop = occ - timedelta(hours=2)
            begin = occ.replace(tzinfo=tz)
            if begin <= t < begin + dur:
                return w
            if occ < local - dur - timedelta(hours=3):
                break
    return None


# --- rules and state --------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    id: str
    kind: str
    params: dict[str, Any]
    grace_min: int = 0
    clear_min: int | None = None  # None: the same as grace (symmetric)
    severity: str = "alarm"
    windows: tuple[Window, ...] = ()
    renotify_min: int | None = None

    @property
    def grace(self) -> timedelta:
        return timedelta(minutes=self.grace_min)

    @property
    def clear(self) -> timedelta:
        return timedelta(minutes=self.grace_min if self.clear_min is None else self.clear_min)


@dataclass
class RuleState:
    status: str = "ok"  # ok | grace | alarm | clearing
    since: datetime | None = None  # start of the excursion (true time)
    clear_since: datetime | None = None
    value: float | None = None  # the value that started (or worst of) the excursion
    last_ts: datetime | None = None
    hist: list[tuple[datetime, float]] = field(default_factory=list)  # recent readings

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "since": _iso(self.since),
            "clear_since": _iso(self.clear_since),
            "value": self.value,
            "last_ts": _iso(self.last_ts),
            "hist": [[_iso(t), v] for t, v in self.hist],
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any] | None) -> RuleState:
        if not d:
            return cls()
        return cls(
            d.get("status", "ok"),
            _dt(d.get("since")),
            _dt(d.get("clear_since")),
            d.get("value"),
            _dt(d.get("last_ts")),
            [(_dt(t), float(v)) for t, v in d.get("hist", [])],  # type: ignore[misc]
        )


def _iso(t: datetime | None) -> str | None:
    return t.isoformat() if t is not None else None


def _dt(s: str | None) -> datetime | None:
    return datetime.fromisoformat(s) if s else None


@dataclass(frozen=True)
class Transition:
    """What happened to a rule, at its true time. `what`: grace (excursion began),
    ok (ended within grace), alarm (grace elapsed: an event opens), clearing,
    cleared (the event closes), realarm (out again while clearing), peak (a reading
    worse than any before it in an open alarm: the event's worst `value` moves).
    `value` of alarm, peak and cleared is the excursion's worst reading so far,
    counted from its first reading out of bounds (grace included)."""

    what: str
    rule_id: str
    at: datetime
    since: datetime | None
    value: float | None


# The other channel's value at a time, for comparison rules (None: unknown).
Lookup = Callable[[str, datetime], float | None]


def _no_lookup(_cid: str, _t: datetime) -> float | None:
    return None


def _hist_window(rule: Rule) -> timedelta:
    return rule_kinds.behaviour(rule.kind).history(rule.params)


def _gap(rule: Rule) -> Callable[[Mapping[str, Any]], timedelta] | None:
    """A time-driven kind's gap (None: judged by readings alone, or no such kind)."""
    b = rule_kinds.BEHAVIOURS.get(rule.kind)
    return b.gap if b is not None else None


def breach(
    rule: Rule,
    params: Mapping[str, Any],
    state: RuleState,
    ts: datetime,
    value: float,
    lookup: Lookup = _no_lookup,
) -> bool | None:
    """Is this reading out of bounds? None: cannot tell (keeps the current state).
    `state.hist` already holds this reading. The kind's behaviour decides
    (rule_kinds.BEHAVIOURS); ValueError for a kind without one."""
    return rule_kinds.behaviour(rule.kind).breach(rule, params, state, ts, value, lookup)


# A changed state is made whole here and in _judge and step (RuleState(...) with every
# field: what dataclasses.replace gives, without its look at the class's fields each
# call: three steps into grace, worse, and back to ok 20.0 -> 16.7 µs, measured beside
# this; docs/ingest-cost.md, stop 39). tests/test_alarm_engine.py and
# test_engine_calm.py hold the transitions.
def advance(rule: Rule, st: RuleState, t: datetime, out: list[Transition]) -> RuleState:
    """Let time pass to `t` with no new reading: grace elapses into an alarm."""
    since = st.since
    if st.status == "grace" and since is not None and t >= since + rule.grace:
        st = RuleState("alarm", since, st.clear_since, st.value, st.last_ts, st.hist)
        out.append(Transition("alarm", rule.id, since + rule.grace, since, st.value))
    if st.status == "clearing" and st.clear_since is not None and t >= st.clear_since + rule.clear:
        at = st.clear_since + rule.clear
        out.append(Transition("cleared", rule.id, at, st.since, st.value))
        st = RuleState("ok", None, None, None, st.last_ts, st.hist)
    return st


def _judge(
    rule: Rule, st: RuleState, ts: datetime, bad: bool, value: float | None, out: list[Transition]
) -> RuleState:
    if bad:
        if st.status == "ok":
            st = RuleState("grace", ts, st.clear_since, value, st.last_ts, st.hist)
            out.append(Transition("grace", rule.id, ts, ts, value))
        elif st.status == "clearing":
            st = RuleState("alarm", st.since, None, st.value, st.last_ts, st.hist)
            out.append(Transition("realarm", rule.id, ts, st.since, value))
    else:
        if st.status == "grace":
            out.append(Transition("ok", rule.id, ts, st.since, st.value))
            st = RuleState("ok", None, st.clear_since, None, st.last_ts, st.hist)
        elif st.status == "alarm":
            st = RuleState("clearing", st.since, ts, st.value, st.last_ts, st.hist)
            out.append(Transition("clearing", rule.id, ts, st.since, value))
    return advance(rule, st, ts, out)


def step(
    rule: Rule,
    st: RuleState,
    ts: datetime,
    value: float,
    tz: ZoneInfo = UTC_ZONE,
    lookup: Lookup = _no_lookup,
) -> tuple[RuleState, list[Transition]]:
    """Feed one reading (in timestamp order)."""
    out: list[Transition] = []
    last = st.last_ts
    if last is not None and ts <= last:
        return st, out  # already seen (the caller rewinds for truly late readings)
    # one look-up of the kind's behaviour a step (its gap, history and check)
    b = rule_kinds.behaviour(rule.kind)
    gap = b.gap
    if gap is not None and last is not None:
        gap_start = last + gap(rule.params)
        if ts > gap_start:  # the gap really happened: open (and judge) it at its true times
            st = advance(rule, st, gap_start, out)
            st = _judge(rule, st, gap_start, True, None, out)
            st = advance(rule, st, ts, out)
    if st.status != "ok":  # advance() changes nothing in ok
        st = advance(rule, st, ts, out)
    window = b.history(rule.params)
    hist = [(t, v) for t, v in st.hist if t >= ts - window] + [(ts, value)] if window else []
    # a new state (the one passed in stays as it was), as dataclasses.replace but cheaper
    st = RuleState(st.status, st.since, st.clear_since, st.value, ts, hist)
    w = active_window(rule.windows, tz, ts) if rule.windows else None
    if w is not None and w.params is None:
        return st, out  # the window switches the rule off: nothing is judged
    params = {**rule.params, **(w.params or {})} if w is not None else rule.params
    bad = b.breach(rule, params, st, ts, value, lookup)
    if bad is None:
        return st, out
    if bad and st.status in ("grace", "alarm", "clearing") and st.value is not None:
        worst = max(st.value, value) if _above(rule, params, value) else min(st.value, value)
        if worst != st.value and st.status in ("alarm", "clearing"):
            # the event is open already: its recorded worst value moves with the
            # excursion (issue 18 item 5), at the reading's true time
            out.append(Transition("peak", rule.id, ts, st.since, worst))
        st = RuleState(st.status, st.since, st.clear_since, worst, st.last_ts, st.hist)
    if not bad and st.status == "ok":
        return st, out  # in range and ok: _judge() and advance() change nothing
    return _judge(rule, st, ts, bad, value, out), out


def calm_run(
    rule: Rule, st: RuleState, readings: Sequence[tuple[datetime, float]]
) -> RuleState | None:
    """The state `step` leaves after `readings` (in timestamp order) when none of them
    can move the rule, found without judging them one by one; None when that cannot be
    told at once (then feed them to `step`).

    The common case of a rule engine under a steady stream: a rule in `ok` whose
    kind tells from the run's lowest and highest value that no reading breaches
    (RuleBehaviour.calm), with no time window (whose limits change with the time),
    no history kept and no gap inside the run. `step` would then only move the
    state's last reading time, reading by reading; here it moves once. The readings
    `step` would skip (at or before the state's last one) are skipped alike.
    tests/test_engine_calm.py holds the two to each other."""
    if st.status != "ok" or rule.windows:
        return None
    b = rule_kinds.behaviour(rule.kind)
    calm = b.calm
    if calm is None or b.history(rule.params):
        return None
    last = st.last_ts
    i, n = 0, len(readings)
    if last is not None:
        while i < n and readings[i][0] <= last:
            i += 1
    if i == n:
        return st  # nothing new: step() returns the state it was given
    run = readings[i:] if i else readings
    if b.gap is not None:
        gap = b.gap(rule.params)
        prev = last if last is not None else run[0][0]
        for ts, _ in run:  # the largest silence, the one before the run's first included
            if ts - prev > gap:
                return None
            prev = ts
    values = [v for _, v in run]
    if not calm(rule.params, min(values), max(values)):
        return None
    return RuleState("ok", st.since, st.clear_since, st.value, run[-1][0], [])


def feed(
    rule: Rule,
    st: RuleState,
    readings: Sequence[tuple[datetime, float]],
    tz: ZoneInfo = UTC_ZONE,
    lookup: Lookup = _no_lookup,
) -> tuple[RuleState, list[Transition]]:
    """`step` over `readings` (in timestamp order), one after another: the state and
    the transitions it gives. A stretch that a rule in `ok` passes unmoved (each
    reading calm by itself, and `calm_run` of the stretch not None) is passed at once;
    the readings around it are stepped. So is a stretch of readings in range while the
    rule is clearing, up to the reading that completes the clear delay. A steady stream
    with an excursion now and then (a pass of ~25 readings with one out of range) is
    then a few steps, not 25.
    tests/test_engine_calm.py holds the two to each other."""
    out: list[Transition] = []
    b = rule_kinds.behaviour(rule.kind)
    calm = b.calm
    n, i = len(readings), 0
    if calm is None or rule.windows or b.history(rule.params):
        for ts, v in readings:
            st, o = step(rule, st, ts, v, tz, lookup)
            if o:
                out.extend(o)
        return st, out
    params, gapless = rule.params, b.gap is None
    end = 0  # readings[i:end] are each calm by itself (found once, not per step)
    while i < n:
        status = st.status
        if status == "ok" or (status == "clearing" and gapless and st.clear_since is not None):
            if end <= i:
                end = i
                while end < n and calm(params, readings[end][1], readings[end][1]):
                    end += 1
            if end > i and status == "ok":
                c = calm_run(rule, st, readings[i:end])
                if c is not None:  # (None: a gap within the stretch; stepped instead)
                    st, i = c, end
                    continue
            elif end > i:
                # clearing, in range: until the clear delay has run, `step` only moves
                # the last reading's time (and keeps no history: no kind with history
                # gets here); the reading at or past it is stepped (it clears)
                assert st.clear_since is not None
                due, last, j = st.clear_since + rule.clear, st.last_ts, i
                while j < end and readings[j][0] < due:
                    j += 1
                if j > i:
                    ts = readings[j - 1][0]
                    if last is None or ts > last:  # (else all seen already: unchanged)
                        st = RuleState(status, st.since, st.clear_since, st.value, ts, [])
                    i = j
                    continue
        ts, v = readings[i]
        st, o = step(rule, st, ts, v, tz, lookup)
        if o:
            out.extend(o)
        i += 1
    return st, out


def _above(rule: Rule, params: Mapping[str, Any], value: float) -> bool:
    hi = params.get("ok_max")
    return hi is not None and value > hi


def tick(rule: Rule, st: RuleState, now: datetime) -> tuple[RuleState, list[Transition]]:
    """Time passes with no reading. Grace elapses into an alarm (a silent probe must not
    hold an alarm back); an absence rule notices its gap. Clearing needs a reading in
    range, so it is only ever confirmed by data."""
    out: list[Transition] = []
    gap = _gap(rule)
    if gap is not None and st.last_ts is not None and st.status == "ok":
        gap_start = st.last_ts + gap(rule.params)
        if now > gap_start:
            st = _judge(rule, st, gap_start, True, None, out)
    if st.status == "grace":
        st = advance(rule, st, now, out)
    return st, out


def due_at(rule: Rule, st: RuleState) -> datetime | None:
    """When `tick` would next change something (the sweep's schedule)."""
    if st.status == "grace" and st.since is not None:
        return st.since + rule.grace
    gap = _gap(rule)
    if gap is not None and st.status == "ok" and st.last_ts is not None:
        return st.last_ts + gap(rule.params)
    return None


def channel_status(rules: list[Rule], states: Mapping[str, RuleState]) -> str:
    """The most severe of a channel's rules: alarm > grace > ok (docs/product.md#alarms)."""
    status = "ok"
    for r in rules:
        s = states.get(r.id)
        if s is None:
            continue
        if s.status in ("alarm", "clearing"):
            return "alarm"
        if s.status == "grace":
            status = "grace"
    return status


def utc(t: datetime) -> datetime:
    return t.astimezone(UTC)
