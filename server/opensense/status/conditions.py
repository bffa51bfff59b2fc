"""The self-watching conditions of docs/product.md#incident-classes, declared as data
in one place (docs/status.md lists every one; a test holds the docs to this table),
and their evaluation: a pure function of samples and time.

A sample is what the status monitor measured at one tick (`figures`, see
probes.py). A condition says, for one sample, which of its instances are bad (a
dispatch path has one per path) and, when the figure itself knows, for how long they
have been bad already (a dispatch path's last success, the newest heartbeat). It
fires once the bad state has lasted `sustain`: counted back over consecutive bad
samples (no gap longer than MAX_GAP) and from the figure's own age, whichever reaches
further back (Google SRE: alert on a sustained condition, not on one bad sample).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

Figures = dict[str, Any]
# instance key -> (detail, seconds already bad as of the sample, when the figure knows)
Bad = dict[str, tuple[str, float | None]]

MAX_GAP = timedelta(minutes=2)  # samples further apart do not make one run
STALE = timedelta(minutes=2)  # a newest sample older than this: nothing to say

INGEST_5XX_SHARE = 0.5  # of the answers in the last 2 minutes
INGEST_P99_S = 2.0
INGEST_P99_MIN_REQUESTS = 20  # in the 5-minute window; fewer: too few to call a p99
REPORT_MONTHLY_S = 120.0
HEARTBEAT_DOWN_S = 60.0  # no process heartbeat for this long: the API is down
ROLLUPS_BEHIND_S = 1800.0  # the rollups job materialises up to 5-10 minutes ago


@dataclass(frozen=True)
class Condition:
    name: str
    klass: str  # P0, P1, P2 (docs/product.md#incident-classes)
    component: str  # the status page component it concerns
    sustain: timedelta
    title: str  # incident title; {key} is the instance
    doc: str
    bad: Callable[[Figures], Bad]


def _ingest_5xx(f: Figures) -> Bad:
    i = f.get("ingest") or {}
    n, e = i.get("requests_2m", 0), i.get("errors_5xx_2m", 0)
    if n and e / n >= INGEST_5XX_SHARE:
        return {"": (f"{e} of {n} ingest answers in the last 2 minutes were 5xx", None)}
    return {}


def _rollups_behind(f: Figures) -> Bad:
    behind = (f.get("ingest") or {}).get("rollups_behind_s")
    if behind is not None and behind > ROLLUPS_BEHIND_S:
        return {"": (f"rollups materialised up to {behind / 60:.0f} minutes ago", None)}
    return {}


def _ingest_p99(f: Figures) -> Bad:
    i = f.get("ingest") or {}
    n, slow = i.get("requests_5m", 0), i.get("slow_share_5m", 0.0)
    if n >= INGEST_P99_MIN_REQUESTS and slow > 0.01:
        return {"": (f"{slow:.1%} of {n} ingest answers in 5 minutes took over 2 s", None)}
    return {}


def _dispatch(f: Figures) -> Bad:
    out: Bad = {}
    for path, d in (f.get("dispatch") or {}).items():
        if d is None or not d["attempts_5m"] or d["failed_5m"] < d["attempts_5m"]:
            continue
        age = d.get("failing_for_s")
        # the error text may name a customer's webhook or chat: it stays in the figures
        out[path] = (f"all {d['attempts_5m']} {path} attempts in the last 5 minutes failed", age)
    return out


def _dashboard(f: Figures) -> Bad:
    p = f.get("processes") or {}
    age = p.get("newest_age_s")
    if age is not None and age > HEARTBEAT_DOWN_S:
        return {"": (f"no server process has answered for {age / 60:.0f} min", age)}
    h = (f.get("health") or {}).get("dashboard")
    if h is not None and not h["ok"]:
        return {"": ("the dashboard reports a failure", None)}
    return {}


def _report_slow(f: Figures) -> Bad:
    r = f.get("reports") or {}
    s = r.get("slowest_monthly_s")
    if s is not None and s > REPORT_MONTHLY_S:
        # the report's id stays in the figures (operator view): incident text is public
        return {"": (f"a monthly report took {s / 60:.1f} min", None)}
    return {}


def _backup_old(f: Figures) -> Bad:
    b = f.get("backups") or {}
    if not b.get("available") or not b.get("max_age_s") or b.get("configured") is False:
        return {}  # not configured: the page says so; nothing is overdue
    age = b.get("last_good_age_s")
    if age is None:
        since = b.get("monitoring_for_s") or 0.0
        if since > b["max_age_s"]:
            return {"": (f"no good backup in the {since / 3600:.1f} h since monitoring began", 0)}
        return {}
    if age > b["max_age_s"]:
        return {"": (f"the last good backup is {age / 3600:.1f} h old", 0)}
    return {}


def _audit(f: Figures) -> Bad:
    h = (f.get("health") or {}).get("audit")
    if h is not None and not h["ok"]:
        # the detail (which row broke) is for the operator: /v1/status/internal
        return {"": ("the audit trail verification reports a failure", None)}
    return {}


CONDITIONS: tuple[Condition, ...] = (
    Condition(
        "ingest_5xx",
        "P1",
        "ingest_http",
        timedelta(minutes=5),
        "Ingest is answering 5xx",
        f"at least {INGEST_5XX_SHARE:.0%} of ingest answers over 2 minutes are 5xx, for more than 5 minutes",
        _ingest_5xx,
    ),
    Condition(
        "dispatch_failing",
        "P1",
        "dispatch_{key}",
        timedelta(minutes=5),
        "Alarm dispatch by {key} is failing",
        "every counted attempt of a dispatch path (telegram, email, webhook) in the last 5 "
        "minutes failed and it has had no success for more than 5 minutes (outbound_log); a "
        "recipient's own failures (status rejected) count only when they span "
        "OPENSENSE_DISPATCH_FAILING_MIN_ACCOUNTS accounts",
        _dispatch,
    ),
    Condition(
        # the name stays (incidents and watchdog scripts name it); it watches the
        # server processes that serve the API, and the dashboard once it is built
        "dashboard_down",
        "P1",
        "api",
        timedelta(minutes=15),
        "The API is down",
        "no server process has sent a heartbeat (or the dashboard reports a failure) "
        "for more than 15 minutes",
        _dashboard,
    ),
    Condition(
        "ingest_slow",
        "P2",
        "ingest_http",
        timedelta(0),
        "Ingest is slow",
        f"ingest p99 latency above {INGEST_P99_S:g} s over 5 minutes "
        f"(at least {INGEST_P99_MIN_REQUESTS} answers)",
        _ingest_p99,
    ),
    Condition(
        "rollups_behind",
        "P2",
        "database",
        timedelta(minutes=15),
        "Rollups are behind",
        f"the rollups job has not materialised the buckets older than {ROLLUPS_BEHIND_S / 60:.0f}"
        " minutes, for 15 minutes: charts, reports and digests stay right but compute more from"
        " raw readings (is any process running jobs, OPENSENSE_JOBS?)",
        _rollups_behind,
    ),
    Condition(
        "report_slow",
        "P2",
        "reports",
        timedelta(0),
        "Report rendering is slow",
        "a monthly report took (or has been waiting) more than 2 minutes in the last hour",
        _report_slow,
    ),
    Condition(
        "backup_old",
        "P2",
        "backups",
        timedelta(0),
        "The last good backup is too old",
        "no successful backup for longer than OPENSENSE_STATUS_BACKUP_MAX_AGE_H",
        _backup_old,
    ),
    Condition(
        "audit_integrity",
        "P0",
        "audit",
        timedelta(0),
        "Audit trail integrity check failed",
        "the audit component reports a failed verification into the health registry",
        _audit,
    ),
)
BY_NAME = {c.name: c for c in CONDITIONS}


@dataclass(frozen=True)
class Sample:
    at: datetime
    figures: Figures


@dataclass(frozen=True)
class Firing:
    condition: Condition
    key: str
    since: datetime
    detail: str

    @property
    def ident(self) -> str:
        """What keeps one open incident per condition instance."""
        return self.condition.name + (f":{self.key}" if self.key else "")

    @property
    def component(self) -> str:
        return self.condition.component.format(key=self.key)

    @property
    def title(self) -> str:
        return self.condition.title.format(key=self.key)


def bad_since(cond: Condition, key: str, samples: Sequence[Sample]) -> tuple[datetime, str] | None:
    """Start of the bad run of (cond, key) that reaches the newest sample, and the
    newest detail; None when the newest sample is not bad."""
    newest = samples[-1]
    hit = cond.bad(newest.figures).get(key)
    if hit is None:
        return None
    detail = hit[0]
    since = newest.at
    prev_at = newest.at
    for s in reversed(samples):
        got = cond.bad(s.figures).get(key)
        if got is None or prev_at - s.at > MAX_GAP:
            break
        since = s.at
        if got[1] is not None:
            since = min(since, s.at - timedelta(seconds=got[1]))
        prev_at = s.at
    return since, detail


def evaluate(
    samples: Sequence[Sample], now: datetime, conditions: Sequence[Condition] = CONDITIONS
) -> list[Firing]:
    """Every condition instance bad for at least its `sustain` as of `now`."""
    ordered = sorted((s for s in samples if s.at <= now), key=lambda s: s.at)
    if not ordered or now - ordered[-1].at > STALE:
        return []
    out = []
    for cond in conditions:
        for key in cond.bad(ordered[-1].figures):
            got = bad_since(cond, key, ordered)
            if got is not None and now - got[0] >= cond.sustain:
                out.append(Firing(cond, key, got[0], got[1]))
    return out
