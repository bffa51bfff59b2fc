"""Which dump a run makes, which files rotation deletes, when the weekly copy goes to
the second location. Pure functions of file names and an injected `now`.

File name: opensense-<YYYYmmddTHHMMSSZ>-<kind>.dump.age, kind hourly|daily|weekly.
- every run makes one dump; the first of a UTC day is `daily`, the others `hourly`;
- hourly dumps are kept `keep_hourly` days, daily dumps `keep_daily` days;
- the second location gets a `weekly` copy when its newest is 7 days old or more,
  kept `keep_weekly` days;
- the newest dump of each kind is never deleted, whatever its age (a stopped
  scheduler must not end with no backup at all).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

NAME = re.compile(r"^opensense-(\d{8}T\d{6}Z)-(hourly|daily|weekly)\.dump\.age$")


@dataclass(frozen=True, order=True)
class Dump:
    at: datetime
    kind: str
    name: str


def name_for(at: datetime, kind: str) -> str:
    return f"opensense-{at.astimezone(UTC):%Y%m%dT%H%M%SZ}-{kind}.dump.age"


def parse(name: str) -> Dump | None:
    m = NAME.match(name)
    if not m:
        return None
    at = datetime.strptime(m.group(1), "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    return Dump(at, m.group(2), name)


def parse_all(names: list[str]) -> list[Dump]:
    return sorted(d for d in map(parse, names) if d is not None)


def kind_for_run(existing: list[Dump], now: datetime) -> str:
    today = now.astimezone(UTC).date()
    if any(d.kind == "daily" and d.at.date() == today for d in existing):
        return "hourly"
    return "daily"


def weekly_due(offsite: list[Dump], now: datetime) -> bool:
    weeklies = [d for d in offsite if d.kind == "weekly"]
    return not weeklies or now - max(weeklies).at >= timedelta(days=7)


def to_delete(dumps: list[Dump], now: datetime, keep: dict[str, int]) -> list[Dump]:
    """Dumps past their kind's retention, except the newest of each kind."""
    out = []
    for kind, days in keep.items():
        mine = sorted(d for d in dumps if d.kind == kind)
        for d in mine[:-1]:
            if now - d.at > timedelta(days=days):
                out.append(d)
    return sorted(out)
