"""Incident classes and their clocks (docs/product.md#incident-classes, "Response
timelines"), as data, and what is due when: pure functions of the incident and time.

Business time is Monday to Friday, 09:00 to 17:00 in OPENSENSE_STATUS_BUSINESS_TZ
(8 business hours make a business day); P0 and P1 clocks run on wall time.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, time, timedelta
from zoneinfo import ZoneInfo

DAY_START, DAY_END = time(9), time(17)
BUSINESS_DAY_H = 8.0


@dataclass(frozen=True)
class IncidentClass:
    name: str
    what: str
    ack_h: float
    update_h: float
    resolve_h: float | None  # None: best effort
    business: bool  # the clocks above count business hours
    postmortem: str  # when a public post-mortem is required

    def describe(self) -> str:
        unit = "business h" if self.business else "h"
        res = f"{self.resolve_h:g} {unit}" if self.resolve_h else "best effort"
        return (
            f"acknowledge within {self.ack_h:g} {unit}, update every {self.update_h:g} {unit},"
            f" resolve: {res}"
        )


CLASSES: dict[str, IncidentClass] = {
    "P0": IncidentClass(
        "P0",
        "customer data loss or exposure",
        0.5,
        1.0,
        None,
        False,
        "always, within 7 business days of resolution",
    ),
    "P1": IncidentClass(
        "P1",
        "ingest or alarm path down",
        0.5,
        1.0,
        8.0,
        False,
        "when it lasted more than 1 h, within 7 business days of resolution",
    ),
    "P2": IncidentClass(
        "P2",
        "degraded but functional",
        4.0,
        BUSINESS_DAY_H,
        5 * BUSINESS_DAY_H,
        True,
        "not required",
    ),
}
POSTMORTEM_BUSINESS_DAYS = 7
# while a step stays overdue, the operator is reminded again this often (wall time)
REMIND_EVERY = {"P0": timedelta(minutes=30), "P1": timedelta(minutes=30), "P2": timedelta(hours=4)}


def reminder_slot(klass: str, due_at: datetime, now: datetime) -> datetime | None:
    """The reminder this moment calls for, named by its time: the due time itself, then
    every REMIND_EVERY after it; None before the due time. One reminder per slot."""
    if now < due_at:
        return None
    every = REMIND_EVERY[klass]
    return due_at + every * ((now - due_at) // every)


def add_business_hours(start: datetime, hours: float, tz: ZoneInfo) -> datetime:
    """The moment `hours` of business time after `start`."""
    left = timedelta(hours=hours)
    t = start.astimezone(tz)
    while True:
        day = t.date()
        open_, close = (datetime.combine(day, x, tzinfo=tz) for x in (DAY_START, DAY_END))
        if t.weekday() >= 5 or t >= close:
            t = datetime.combine(day + timedelta(days=1), DAY_START, tzinfo=tz)
            continue
        if t < open_:
            t = open_
        room = close - t
        if left <= room:
            return (t + left).astimezone(start.tzinfo)
        left -= room
        t = datetime.combine(day + timedelta(days=1), DAY_START, tzinfo=tz)


def after(klass: IncidentClass, start: datetime, hours: float, tz: ZoneInfo) -> datetime:
    if klass.business:
        return add_business_hours(start, hours, tz)
    return start + timedelta(hours=hours)


@dataclass(frozen=True)
class Due:
    what: str  # acknowledgement, update, post-mortem
    at: datetime


def next_due(
    klass: str,
    opened_at: datetime,
    acknowledged_at: datetime | None,
    last_update_at: datetime | None,
    resolved_at: datetime | None,
    has_postmortem: bool,
    tz: ZoneInfo,
) -> Due | None:
    """What the operator owes next and by when. "still investigating" counts as an
    update: any posted update restarts the cadence."""
    k = CLASSES[klass]
    if resolved_at is not None:
        lasted = resolved_at - opened_at
        needed = klass == "P0" or (klass == "P1" and lasted > timedelta(hours=1))
        if needed and not has_postmortem:
            return Due(
                "post-mortem",
                add_business_hours(resolved_at, POSTMORTEM_BUSINESS_DAYS * BUSINESS_DAY_H, tz),
            )
        return None
    if acknowledged_at is None:
        return Due("acknowledgement", after(k, opened_at, k.ack_h, tz))
    last = max(acknowledged_at, last_update_at or acknowledged_at)
    return Due("update", after(k, last, k.update_h, tz))


def resolution_target(klass: str, opened_at: datetime, tz: ZoneInfo) -> datetime | None:
    k = CLASSES[klass]
    return after(k, opened_at, k.resolve_h, tz) if k.resolve_h else None
