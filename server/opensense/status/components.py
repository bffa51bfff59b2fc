"""The status page's components, declared as data, and each one's state from a
tick's figures: a pure function (no I/O), so the rules are tested without a server.

States (as Atlassian Statuspage/Cachet, reduced): operational, degraded, outage,
unknown. A firing self-watching condition raises its component to at least the
condition's severity (P2: degraded, P0/P1: outage). Details are written here, from
counts only: the public page never carries a tenant's data (an error text of a
dispatch attempt may name a customer's webhook, so it is not shown).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .conditions import Figures, Firing
from .probes import PATHS

STATES = ("operational", "degraded", "outage", "unknown")
RANK = {"unknown": 0, "operational": 1, "degraded": 2, "outage": 3}


@dataclass(frozen=True)
class Component:
    id: str
    name: str
    doc: str
    # a component of a feature that is not built yet: shown only once that feature
    # calls register_feature(<feature>) (the page never claims what does not exist)
    feature: str | None = None


COMPONENTS: tuple[Component, ...] = (
    Component("ingest_http", "Ingest (HTTP)", "5xx share and p99 latency of /v1/ingest*"),
    Component("mqtt", "Ingest (MQTT)", "the broker side this deployment runs (health: mqtt)"),
    Component("database", "Database", "a query from the status monitor answers"),
    Component(
        "rule_engine",
        "Rule engine",
        "the alarm evaluation loop and its time sweep (health: rule_engine, rule_engine_sweep)",
    ),
    *(
        Component(
            f"dispatch_{p}",
            f"Alarm dispatch: {p}",
            f"delivery attempts in outbound_log ({p}); the sender loop (health: notifier,"
            " notifier_paths)",
        )
        for p in PATHS
    ),
    Component(
        "reports",
        "Report rendering",
        "report render times and failures (reports table)",
        feature="reports",
    ),
    Component("backups", "Backups", "the last good backup and restore test (backup_runs)"),
    Component("api", "API", "server process heartbeats (the processes that serve /v1)"),
    Component(
        "dashboard",
        "Dashboard",
        "server process heartbeats, health registry dashboard",
        feature="dashboard",
    ),
    Component("audit", "Audit trail", "chain verification (health: audit)"),
    Component("gateways", "Site gateways", "every site gateway's last contact (gateways)"),
)
BY_ID = {c.id: c for c in COMPONENTS}

# Features that exist in this build and have said so. A feature registers at the
# import of its package (`register_feature("reports")` in reports/__init__.py), which
# app.py imports in every process (docs/architecture.md); nothing else does.
_BUILT: set[str] = set()


def register_feature(name: str) -> None:
    """Switch on the status components of feature `name` (see Component.feature)."""
    if not any(c.feature == name for c in COMPONENTS):
        raise ValueError(f"no status component belongs to feature {name!r}")
    _BUILT.add(name)


def unregister_feature(name: str) -> None:
    """For tests: the feature is gone again."""
    _BUILT.discard(name)


def shown() -> tuple[Component, ...]:
    """The components of this build: always-on ones and those of registered features."""
    return tuple(c for c in COMPONENTS if c.feature is None or c.feature in _BUILT)


def _health(f: Figures, *names: str) -> tuple[str, str] | None:
    """From the health registry: outage when any of `names` reports a failure,
    operational when those that reported are ok, None when none reported."""
    hs = [h for n in names if (h := (f.get("health") or {}).get(n)) is not None]
    if not hs:
        return None
    return (
        ("operational", "reports ok")
        if all(h["ok"] for h in hs)
        else ("outage", "reports a failure")
    )


def _rule_engine(f: Figures) -> tuple[str, str]:
    # the evaluation of new readings and the time-driven sweep (grace, gaps, offline)
    return _health(f, "rule_engine", "rule_engine_sweep") or ("unknown", "no report yet")


def _ingest(f: Figures) -> tuple[str, str]:
    i = f.get("ingest") or {}
    n, e = i.get("requests_2m", 0), i.get("errors_5xx_2m", 0)
    h = _health(f, "ingest_http")
    if h and h[0] == "outage":
        return h
    if n and e:
        return "degraded", f"{e} of {n} answers in the last 2 minutes were 5xx"
    if i.get("requests_5m", 0) >= 20 and i.get("slow_share_5m", 0.0) > 0.01:
        return "degraded", "p99 latency above 2 s"
    p99 = i.get("p99_bound_5m_s")
    # LoRaWAN uplinks refused or unassigned are the customers' side (a payload
    # formatter, an unregistered DevEUI), not an outage: counted, never degrading
    lw = (f.get("lorawan") or {}).get("filed_24h") or {}
    tray = ", ".join(f"{lw[k]} {k}" for k in ("refused", "unassigned", "partial") if lw.get(k))
    return "operational", (
        f"{i.get('requests_5m', 0)} answers in 5 min"
        + (f", p99 ≤ {p99 * 1000:g} ms" if p99 is not None else "")
        + (f"; LoRaWAN uplinks in 24 h: {tray}" if tray else "")
    )


def _mqtt(f: Figures) -> tuple[str, str]:
    h = _health(f, "mqtt")  # from any process that runs the MQTT side
    if h:
        return h
    if f.get("mqtt_mode") == "off":
        return "unknown", "MQTT is off in this deployment"
    return "unknown", "no report yet"


def _database(f: Figures) -> tuple[str, str]:
    d = f.get("database") or {}
    if not d.get("ok"):
        return "outage", "the database does not answer"
    return "operational", f"answered in {d.get('latency_ms', 0):.1f} ms"


def _dispatch(path: str) -> Any:
    def state(f: Figures) -> tuple[str, str]:
        d = (f.get("dispatch") or {}).get(path)
        if d is None:
            return "unknown", "no outbound log on this server"
        h = _health(f, f"dispatch_{path}")
        if h and h[0] == "outage":
            return h
        if (_health(f, "notifier") or ("",))[0] == "outage":
            return "outage", "the alarm sender reports a failure"
        if (_health(f, "notifier_paths") or ("",))[0] == "outage":
            return "degraded", "the failing-path check reports a failure"
        if not d["attempts_5m"]:
            return "operational", "no deliveries in the last 5 minutes"
        if d["failed_5m"] == d["attempts_5m"]:
            return "outage", f"all {d['attempts_5m']} attempts in 5 minutes failed"
        if d["failed_5m"]:
            return (
                "degraded",
                f"{d['failed_5m']} of {d['attempts_5m']} attempts in 5 minutes failed",
            )
        return "operational", f"{d['attempts_5m']} deliveries in 5 minutes"

    return state


def _reports(f: Figures) -> tuple[str, str]:
    r = f.get("reports") or {}
    h = _health(f, "reports")
    if h and h[0] == "outage":
        return h
    s = r.get("slowest_monthly_s")
    if s is not None and s > 120:
        return "degraded", f"a monthly report took {s / 60:.1f} min"
    n, failed = r.get("rendered_24h") or 0, r.get("failed_24h") or 0
    if failed and failed >= n:
        return "degraded", f"{failed} of {n + failed} reports in 24 h failed"
    if n:
        med, top = r.get("render_median_24h_s"), r.get("render_max_24h_s")
        text = f"{n} report(s) rendered in 24 h"
        if med is not None and top is not None:
            text += f", median {med:.1f} s, slowest {top:.1f} s"
        return "operational", text + (f"; {failed} failed" if failed else "")
    if h:
        return h
    if r.get("last_ready_age_s") is not None:
        return "operational", "reports rendered recently"
    return "unknown", "no report rendered in 30 days"


def _backups(f: Figures) -> tuple[str, str]:
    b = f.get("backups") or {}
    if not b.get("available"):
        return "unknown", "no backup log on this server"
    if b.get("configured") is False:
        # no recipient to encrypt to: the backup job does not run, so there is nothing
        # to be late with; the page says so instead of calling the server degraded
        return "unknown", "not configured on this server"
    age = b.get("last_good_age_s")
    if b.get("last_restore_test_ok") is False:
        return "outage", "the last restore test failed"
    if age is None:
        return "unknown" if not b.get("max_age_s") else "degraded", "no good backup yet"
    if b.get("max_age_s") and age > b["max_age_s"]:
        return "degraded", f"the last good backup is {age / 3600:.1f} h old"
    if b.get("last_run_ok") is False:
        return "degraded", "the last backup run failed"
    return "operational", f"last good backup {age / 60:.0f} min ago"


def _api(f: Figures) -> tuple[str, str]:
    p = f.get("processes") or {}
    if not p.get("alive"):
        return "outage", "no server process answers"
    return "operational", f"{p['alive']} server process(es)"


def _dashboard(f: Figures) -> tuple[str, str]:
    # served by the same processes as the API, plus what the dashboard itself reports
    h = _health(f, "dashboard")
    if h and h[0] == "outage":
        return h
    return _api(f)


def _audit(f: Figures) -> tuple[str, str]:
    return _health(f, "audit") or ("unknown", "no verification reported yet")


def _gateways(f: Figures) -> tuple[str, str]:
    gws = f.get("gateways")
    if gws is None:
        return "unknown", "no gateway table on this server"
    if not gws:
        return "operational", "no gateways"
    counts = {s: 0 for s in STATES}
    for g in gws:
        counts[g["state"]] += 1
    known = len(gws) - counts["unknown"]
    text = f"{counts['operational']} of {len(gws)} reporting"
    if not known:
        return "unknown", text
    if counts["outage"] == known:
        return "outage", text
    if counts["outage"] or counts["degraded"]:
        return "degraded", text
    return "operational", text


RULES = {
    "ingest_http": _ingest,
    "mqtt": _mqtt,
    "database": _database,
    "rule_engine": _rule_engine,
    **{f"dispatch_{p}": _dispatch(p) for p in PATHS},
    "reports": _reports,
    "backups": _backups,
    "api": _api,
    "dashboard": _dashboard,
    "audit": _audit,
    "gateways": _gateways,
}
assert set(RULES) == set(BY_ID), set(RULES) ^ set(BY_ID)

SEVERITY = {"P0": "outage", "P1": "outage", "P2": "degraded"}


def states(f: Figures, firing: Sequence[Firing] = ()) -> dict[str, tuple[str, str]]:
    """component id -> (state, public detail), for the components shown()."""
    out = {c.id: RULES[c.id](f) for c in shown()}
    if not (f.get("database") or {}).get("ok", True):
        # without the database nothing else could be measured this tick
        out = {k: (v if k == "database" else ("unknown", "not measured")) for k, v in out.items()}
    for fire in firing:
        cid = fire.component if fire.component in out else fire.condition.component
        if cid not in out:
            continue
        want = SEVERITY[fire.condition.klass]
        if RANK[want] > RANK[out[cid][0]]:
            out[cid] = (want, fire.title)
    return out


def overall(component_states: dict[str, tuple[str, str]]) -> str:
    worst = max((s for s, _ in component_states.values()), key=lambda s: RANK[s], default="unknown")
    if worst == "outage":
        return (
            "major_outage"
            if component_states.get("ingest_http", ("",))[0] == "outage"
            else "partial_outage"
        )
    if worst == "degraded":
        return "degraded"
    return "operational" if worst == "operational" else "unknown"
