"""What each rule kind does, declared once as data (docs/alarms.md, "Adding a rule kind").

A kind has two halves. Its wire half — name, params, defaults, whether a gateway runs
it — is the contract's (`opensense_contract.rules.RULE_KINDS`), shared with the
gateway. Its behaviour is here, one `RuleBehaviour` per kind: the engine, the
evaluator and the API look a rule's kind up in `BEHAVIOURS` instead of branching on
its name, so a new kind is one entry in each table plus its docs
(tests/test_rule_kinds.py checks the two tables name the same kinds).

Pure: no I/O. The engine imports this module, not the other way round: a behaviour
sees a rule and its state through the two small protocols below, which the engine's
`Rule` and `RuleState` satisfy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from opensense_contract.rules import HIST_MAX_S


class Rule(Protocol):
    """What a behaviour reads of a rule (engine.Rule)."""

    @property
    def params(self) -> dict[str, Any]: ...


class RuleState(Protocol):
    """What a behaviour reads of a rule's state (engine.RuleState)."""

    @property
    def hist(self) -> list[tuple[datetime, float]]: ...


# another channel's value at a time (engine.Lookup)
Lookup = Callable[[str, datetime], float | None]

Params = Mapping[str, Any]
# Is this reading out of bounds? (params: the rule's, with an active window's over
# them; state.hist already holds this reading; lookup: another channel's value at a
# time.) None: cannot tell, the rule's state stays as it is.
Breach = Callable[["Rule", Params, "RuleState", datetime, float, "Lookup"], "bool | None"]
# Would `breach` say False of every reading whose values lie within [lowest, highest]
# (params: the rule's own)? True lets the engine pass a run of such readings at once
# (engine.calm_run); False or no `calm` at all: each reading is judged by `breach`.
Calm = Callable[[Params, float, float], bool]
# The values [low, high] (floats, ±inf for no bound) of which `breach` says False
# whatever the state, the time or the other channels (params: the rule's own), for a
# kind judged by the value alone; None: these params give no such band. The batch
# writer stores a reading in it without the engine while every rule of the channel is
# in ok (migration 0032; storage/batcher.py CALM_CTE), so the band must never hold a
# value `breach` would refuse: tests/test_calm_band.py holds each band to `breach`.
Band = Callable[[Params], "tuple[float, float] | None"]


def no_history(_params: Params) -> timedelta:
    return timedelta(0)


@dataclass(frozen=True)
class RuleBehaviour:
    name: str
    breach: Breach
    # How far back the state keeps readings for `breach` (from the rule's own params;
    # zero: none kept). Clamped to the contract's HIST_MAX_S: a rule stored with a
    # longer window (by hand, or an older release) is judged over a day rather than
    # growing its state without end.
    history: Callable[[Params], timedelta] = no_history
    # Time-driven: the longest silence allowed after a reading. Such a kind is judged
    # by time passing as well as by readings (the sweep's `tick` and `due_at`; a late
    # reading opens the gap at its true time). None: judged by readings only.
    gap: Callable[[Params], timedelta] | None = None
    # Needs another channel's values: the id of that channel (the API checks it is
    # in the account; the evaluator loads its readings for `lookup`). None: no other.
    other_channel: Callable[[Params], str] | None = None
    # Tells from a run's lowest and highest value alone that no reading of it breaches
    # (a kind whose breach reads only the reading's value): see `Calm`. None: a kind
    # that reads the history, the time or another channel.
    calm: Calm | None = None
    # The kind's band of values that cannot breach (`Band`). None: a kind whose
    # judgement reads more than the value (the history, the time, another channel),
    # whose readings are all the engine's.
    band: Band | None = None


def _range(
    _r: Rule, params: Params, _st: RuleState, _ts: datetime, value: float, _l: Lookup
) -> bool:
    lo, hi = params.get("ok_min"), params.get("ok_max")
    return (lo is not None and value < lo) or (hi is not None and value > hi)


def _range_calm(params: Params, lowest: float, highest: float) -> bool:
    lo, hi = params.get("ok_min"), params.get("ok_max")
    return (lo is None or lo <= lowest) and (hi is None or highest <= hi)


def _inside(x: Any, up: bool) -> float | None:
    """A bound as the float nearest it on the band's inside: the first float at or
    above it (`up`) or the last at or below it, so that a float reading compares with
    it as with the bound itself (an integer beyond 2**53 is not a float exactly). None:
    not a number, or NaN."""
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    try:
        f = float(x)
    except OverflowError:
        return None
    if f != f:
        return None
    if up and f < x:
        f = math.nextafter(f, math.inf)
    elif not up and f > x:
        f = math.nextafter(f, -math.inf)
    return f


def _range_band(params: Params) -> tuple[float, float] | None:
    lo, hi = params.get("ok_min"), params.get("ok_max")
    low = -math.inf if lo is None else _inside(lo, up=True)
    high = math.inf if hi is None else _inside(hi, up=False)
    if low is None or high is None:
        return None
    return low, high


def _delta(
    _r: Rule, params: Params, st: RuleState, _ts: datetime, _value: float, _l: Lookup
) -> bool:
    vals = [v for _, v in st.hist]
    return max(vals) - min(vals) > float(params["max_delta"])


def _delta_history(params: Params) -> timedelta:
    return timedelta(seconds=min(HIST_MAX_S, float(params.get("interval_s", 600))))


def _derivative_history(params: Params) -> timedelta:
    return timedelta(seconds=min(HIST_MAX_S, float(params.get("window_s", 3600))))


def _derivative(
    rule: Rule, params: Params, st: RuleState, ts: datetime, value: float, _l: Lookup
) -> bool | None:
    if len(st.hist) < 2:
        return None
    t0, v0 = st.hist[0]
    span = (ts - t0).total_seconds()
    # the window as the history keeps it: the rule's own (a time window's params do
    # not change what the state holds)
    if span < _derivative_history(rule.params).total_seconds() / 2:
        return None  # too short a baseline to call a trend
    rate = (value - v0) / (span / 3600.0)
    lo, hi = params.get("min_rate"), params.get("max_rate")
    return (lo is not None and rate < lo) or (hi is not None and rate > hi)


def _absence(_r: Rule, _p: Params, _st: RuleState, _ts: datetime, _v: float, _l: Lookup) -> bool:
    return False  # a reading is the opposite of absence; gaps are judged by `gap`


def _never(_params: Params, _lowest: float, _highest: float) -> bool:
    return True  # no reading breaches an absence rule (its gaps are the engine's)


def _absence_gap(params: Params) -> timedelta:
    return timedelta(seconds=float(params["max_gap_s"]))


def _other(params: Params) -> str:
    return str(params["other_channel_id"])


def _comparison(
    _r: Rule, params: Params, _st: RuleState, ts: datetime, value: float, lookup: Lookup
) -> bool | None:
    other = lookup(_other(params), ts)
    if other is None:
        return None
    ref = other + float(params.get("offset", 0))
    return value < ref if params.get("op") == "lt" else value > ref


BEHAVIOURS: dict[str, RuleBehaviour] = {
    b.name: b
    for b in (
        RuleBehaviour("range", _range, calm=_range_calm, band=_range_band),
        RuleBehaviour("delta", _delta, history=_delta_history),
        RuleBehaviour("derivative", _derivative, history=_derivative_history),
        RuleBehaviour("absence", _absence, gap=_absence_gap, calm=_never),
        RuleBehaviour("comparison", _comparison, other_channel=_other),
    )
}


def behaviour(kind: str) -> RuleBehaviour:
    """The kind's behaviour; ValueError for a kind without one."""
    b = BEHAVIOURS.get(kind)
    if b is None:
        raise ValueError(f"unknown rule kind {kind}")
    return b
