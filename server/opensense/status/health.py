"""The health registry: any component reports into it, the status page reads it.

    from opensense.status import health
    health.ok(app, "rule_engine")                      # a loop pass went well
    health.fail(app, "rule_engine", "evaluation failed: …")

Reports are kept in memory of this process; the status monitor publishes them with
the process heartbeat, so the snapshot merges every process: a component is failing
when its latest report in any live process is a failure, operational when every live
process that reported it says ok, and unknown when no live process reported it.
A report is a plain dict write: safe on any hot path.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web


@dataclass
class Report:
    ok: bool
    detail: str
    at: datetime

    def as_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "detail": self.detail, "at": self.at.isoformat()}


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class Health:
    clock: Callable[[], datetime] = _utcnow
    reports: dict[str, Report] = field(default_factory=dict)

    def ok(self, component: str, detail: str = "") -> None:
        self.reports[component] = Report(True, detail[:500], self.clock())

    def fail(self, component: str, detail: str) -> None:
        self.reports[component] = Report(False, detail[:500], self.clock())

    def as_json(self) -> dict[str, dict[str, Any]]:
        return {k: r.as_json() for k, r in self.reports.items()}


# The app key is made here and api/keys.py names it with the others: a caller needs
# only this module, and this module needs nothing of the app's.
KEY_NAME = "status_health"
HEALTH = web.AppKey(KEY_NAME, Health)


def registry(app: MutableMapping[Any, Any]) -> Health:
    health: Health = app[HEALTH]
    return health


def ok(app: MutableMapping[Any, Any], component: str, detail: str = "") -> None:
    registry(app).ok(component, detail)


def fail(app: MutableMapping[Any, Any], component: str, detail: str) -> None:
    registry(app).fail(component, detail)


def merge(processes: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Merge the health of every live process: per component, a failure anywhere wins
    (with its detail), else ok. Pure: the snapshot calls it with the heartbeat rows."""
    out: dict[str, dict[str, Any]] = {}
    for reports in processes:
        for name, r in reports.items():
            cur = out.get(name)
            if cur is None or (cur["ok"] and not r["ok"]):
                out[name] = dict(r)
    return out
