"""Local alarm rules as pure functions of readings and time (no I/O).

The gateway holds a copy of its site's rules (synced) and evaluates `range` and
`absence` rules on what it receives. The server's rule engine stays the authority;
these only decide when to warn locally while the server cannot.

- range: a reading outside ok_min..ok_max starts an excursion at its timestamp; the
  alarm opens at the first reading at least grace_min after that start (so it fires
  within grace + one cadence). A reading back in range clears it. Reading time is
  the node's clock, so a backlog replayed fast behaves like the real minutes.
- absence: no reading received for `max_gap_s` (+ grace) by the gateway's clock.

The server decides which rule kinds a gateway runs (the sync document's
`rule_kinds`, today range and absence) and sends their params exactly as its own
engine takes them (server/opensense/alarms/engine.py RULE_KINDS). `local_params`
reads them strictly: a rule whose params the gateway cannot read is skipped with a
warning, never run with a made-up 0 (issue 11: absence rules never fired because
the gateway read `seconds` where the server sends `max_gap_s`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

from opensense_contract import rules as contract_rules

log = logging.getLogger("opensense-gateway")

# The kinds this gateway can evaluate; which of them it runs for a site is the
# server's `rule_kinds` in the sync document, their params the contract's.
LOCAL_KINDS: tuple[str, ...] = ("range", "absence")
assert set(LOCAL_KINDS) == set(contract_rules.GATEWAY_RULE_KINDS), "contract and gateway disagree"


@dataclass(frozen=True)
class Rule:
    id: str  # rul_… or "default:<type>" for the site vertical's default
    device: str | None  # None: applies to every device (a default)
    type: str
    label: str | None  # None: any label (a default)
    kind: str  # "range" | "absence"
    params: dict[str, Any]
    grace_min: int
    severity: str = "alarm"


@dataclass(frozen=True)
class State:
    bad_since: float | None = None  # first out-of-range reading of the excursion
    open_at: float | None = None  # when the alarm opened (None: no alarm)
    last_ts: float | None = None  # newest reading time evaluated
    last_value: float | None = None


@dataclass(frozen=True)
class Event:
    what: str  # "open" | "clear"
    at: float  # reading time (range) or clock time (absence)
    value: float | None


def local_params(kind: str, params: Any) -> dict[str, float] | None:
    """The params of a rule this gateway runs, as numbers; None (with the reason
    logged) when the gateway cannot run it as the server means it."""
    if kind not in LOCAL_KINDS:
        return None
    out = contract_rules.read_numbers(kind, params)
    if out is None:
        log.warning("a synced %s rule has params the gateway cannot read; not run locally", kind)
    return out


def _runnable(entry: dict[str, Any], runs: set[str]) -> dict[str, float] | None:
    """The params of a synced rule or default when this gateway runs its kind."""
    if entry.get("kind") not in runs:
        return None
    return local_params(entry["kind"], entry.get("params"))


def rules_from_sync(doc: dict[str, Any]) -> list[Rule]:
    """The rules of a sync document this gateway runs: only the kinds the server
    lists in `rule_kinds` (a server without the list: range and absence) that this
    gateway knows, each with strictly read params."""
    kinds = doc.get("rule_kinds")
    runs = set(LOCAL_KINDS) & (set(kinds) if isinstance(kinds, list) else set(LOCAL_KINDS))
    out: list[Rule] = []
    for r in doc.get("rules", []):
        if (params := _runnable(r, runs)) is not None:
            out.append(
                Rule(
                    r["id"],
                    r["device"],
                    r["type"],
                    r.get("label") or "",
                    r["kind"],
                    params,
                    int(r.get("grace_min") or 0),
                    r.get("severity") or "alarm",
                )
            )
    for d in doc.get("defaults", []):
        if (params := _runnable(d, runs)) is not None:
            out.append(
                Rule(
                    f"default:{d['type']}",
                    None,
                    d["type"],
                    None,
                    d["kind"],
                    params,
                    int(d.get("grace_min") or 0),
                )
            )
    return out


def rules_for(rules: list[Rule], device: str, type_: str, label: str) -> list[Rule]:
    """A channel's own rules; the site default for its kind only when it has none
    (a channel created during the outage is not known to the last sync)."""
    own = [r for r in rules if r.device == device and r.type == type_ and r.label == label]
    if own:
        return own
    return [r for r in rules if r.device is None and r.type == type_]


def in_range(rule: Rule, value: float) -> bool:
    lo, hi = rule.params.get("ok_min"), rule.params.get("ok_max")
    return (lo is None or value >= float(lo)) and (hi is None or value <= float(hi))


def step_range(rule: Rule, st: State, ts: float, value: float) -> tuple[State, Event | None]:
    """One reading through a range rule. Readings older than the newest already
    evaluated are ignored (a resend after a lost acknowledgement)."""
    if st.last_ts is not None and ts <= st.last_ts:
        return st, None
    st = replace(st, last_ts=ts, last_value=value)
    if in_range(rule, value):
        if st.open_at is not None:
            return State(None, None, ts, value), Event("clear", ts, value)
        return replace(st, bad_since=None), None
    bad_since = st.bad_since if st.bad_since is not None else ts
    st = replace(st, bad_since=bad_since)
    if st.open_at is None and ts - bad_since >= rule.grace_min * 60:
        return replace(st, open_at=ts), Event("open", ts, value)
    return st, None


def absence_seconds(rule: Rule) -> float:
    """The server's `max_gap_s` (engine.py RULE_KINDS); 0 (never fires) only for a
    rule built by hand without it — `local_params` keeps those out of a sync."""
    v = rule.params.get("max_gap_s")
    return float(v) if v is not None and contract_rules.is_number(v) else 0.0


def check_absence(
    rule: Rule, st: State, last_received: float | None, now: float
) -> tuple[State, Event | None]:
    """An absence rule at clock time `now`, given when the channel was last heard."""
    limit = absence_seconds(rule) + rule.grace_min * 60
    if last_received is None or limit <= 0:
        return st, None
    silent = now - last_received > limit
    if silent and st.open_at is None:
        return replace(st, open_at=now), Event("open", now, None)
    if not silent and st.open_at is not None:
        return replace(st, open_at=None), Event("clear", now, None)
    return st, None
