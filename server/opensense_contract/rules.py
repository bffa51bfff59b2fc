"""Rule kinds and their parameters, declared once as data (docs/alarms.md).

What a rule kind *is* on the wire lives here: its name, its parameters with their
defaults and bounds, and whether a site gateway evaluates it locally. The server's
engine adds each kind's behaviour (`server/opensense/alarms/engine.py`); the gateway
reads the params of the kinds it runs with `read_params`, so the two cannot drift
(issue 11: the gateway read `seconds` where the server sends `max_gap_s`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# delta and derivative rules keep the readings of their window in the state: a
# window of years would make every step copy an ever longer list (and every saved
# state and checkpoint carry it), so a window is at most a day.
HIST_MAX_S = 86400

SEVERITIES = ("warning", "alarm")  # ascending


@dataclass(frozen=True)
class Param:
    name: str
    doc: str
    required: bool = False
    positive: bool = False
    maximum: float | None = None
    # "number", "channel_id" or one of `choices`
    type: str = "number"
    choices: tuple[str, ...] = ()
    default: float | str | None = None


@dataclass(frozen=True)
class RuleKind:
    name: str
    doc: str
    params: tuple[Param, ...]
    # at least one of these must be given (range: a lower or an upper limit)
    one_of: tuple[str, ...] = ()
    # a site gateway evaluates this kind on what it receives (docs/gateway.md)
    gateway: bool = False

    def param(self, name: str) -> Param | None:
        for p in self.params:
            if p.name == name:
                return p
        return None


RULE_KINDS: dict[str, RuleKind] = {
    k.name: k
    for k in (
        RuleKind(
            "range",
            "value outside ok_min..ok_max (either may be omitted)",
            (Param("ok_min", "lowest value in range"), Param("ok_max", "highest value in range")),
            one_of=("ok_min", "ok_max"),
            gateway=True,
        ),
        RuleKind(
            "delta",
            "the value changed by more than max_delta within interval_s (max - min of the window)",
            (
                Param("max_delta", "largest allowed change", required=True, positive=True),
                Param(
                    "interval_s",
                    "window in seconds (default 600, at most a day)",
                    positive=True,
                    maximum=HIST_MAX_S,
                    default=600,
                ),
            ),
        ),
        RuleKind(
            "derivative",
            "rate of change per hour, measured over window_s (default 3600), outside min_rate..max_rate",
            (
                Param("min_rate", "lowest allowed change per hour (e.g. -2)"),
                Param("max_rate", "highest allowed change per hour (e.g. 2)"),
                Param(
                    "window_s",
                    "window in seconds (default 3600, at most a day)",
                    positive=True,
                    maximum=HIST_MAX_S,
                    default=3600,
                ),
            ),
            one_of=("min_rate", "max_rate"),
        ),
        RuleKind(
            "absence",
            "no reading for more than max_gap_s seconds",
            (Param("max_gap_s", "longest allowed gap in seconds", required=True, positive=True),),
            gateway=True,
        ),
        RuleKind(
            "comparison",
            "value above (op gt) or below (op lt) another channel's latest value + offset",
            (
                Param(
                    "other_channel_id",
                    "the channel compared against",
                    required=True,
                    type="channel_id",
                ),
                Param(
                    "op", "gt (default) or lt", type="choice", choices=("gt", "lt"), default="gt"
                ),
                Param("offset", "added to the other channel's value (default 0)", default=0),
            ),
        ),
    )
}

# The kinds a site gateway runs, in declaration order.
GATEWAY_RULE_KINDS: tuple[str, ...] = tuple(k.name for k in RULE_KINDS.values() if k.gateway)


def is_number(v: Any) -> bool:
    """A finite int or float, not a bool."""
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def check_params(kind: str, params: Mapping[str, Any]) -> str | None:
    """Why `params` do not fit `kind`, or None."""
    rk = RULE_KINDS.get(kind)
    if rk is None:
        return f"unknown rule kind {kind!r}; known: {', '.join(RULE_KINDS)}"
    names = {p.name for p in rk.params}
    for k in params:
        if k not in names:
            return f"{kind} rules take {', '.join(sorted(names))}; not {k!r}"
    for p in rk.params:
        v = params.get(p.name)
        if v is None:
            if p.required:
                return f"{kind} rules need {p.name} ({p.doc})"
            continue
        if p.type == "channel_id":
            if not isinstance(v, str):
                return f"{p.name} must be a channel id"
        elif p.type == "choice":
            if v not in p.choices:
                return f"{p.name} must be {' or '.join(p.choices)}"
        elif isinstance(v, bool) or not isinstance(v, int | float):
            return f"{p.name} must be a number"
        elif p.positive and v <= 0:
            return f"{p.name} must be greater than 0"
        elif p.maximum is not None and v > p.maximum:
            return f"{p.name} must be at most {p.maximum:g}"
    if rk.one_of and all(params.get(k) is None for k in rk.one_of):
        return f"{kind} rules need at least one of {', '.join(rk.one_of)}"
    lo, hi = (
        params.get("ok_min", params.get("min_rate")),
        params.get("ok_max", params.get("max_rate")),
    )
    if isinstance(lo, int | float) and isinstance(hi, int | float) and lo > hi:
        return "the lower limit is above the upper limit"
    return None


def read_numbers(kind: str, params: Any) -> dict[str, float] | None:
    """The numeric params of a rule as the server sent them, strictly: None when a
    required one is missing or not a finite number, or the kind's `one_of` is unmet.
    Optional params that are absent take their declared default when it is a number."""
    rk = RULE_KINDS.get(kind)
    if rk is None or not isinstance(params, dict):
        return None
    out: dict[str, float] = {}
    for p in rk.params:
        if p.type != "number":
            continue
        v: Any = params.get(p.name)
        if is_number(v):
            out[p.name] = float(v)
        elif p.required:
            return None
        elif isinstance(p.default, int | float):
            out[p.name] = float(p.default)
    if rk.one_of and not any(k in out for k in rk.one_of):
        return None
    for p in rk.params:
        if p.positive and p.name in out and out[p.name] <= 0:
            return None
    return out
