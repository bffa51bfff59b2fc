"""A site's period from PostgreSQL into the pure inputs of reports/data.py.

Readings come through the storage read path (`storage.read.raw_columns`: raw rows and
packed days merged, as two lists), a chunk at a time, into float arrays. Excursions are the alarm
events (events table) that reached the alarm state and overlap the period.
Thresholds are each channel's first enabled `range` rule, its history in the period
rebuilt from the audit trail's `rule.create`/`rule.update` rows (the rules table
holds only the current values; the audit trail is append-only).
"""

from __future__ import annotations

import calendar
from array import array
from datetime import UTC, date, datetime
from itertools import repeat
from operator import truediv
from typing import Any, NamedTuple

from psycopg import AsyncConnection
from psycopg.rows import dict_row

from ..alarms.history import limit_changes, made, steps
from ..errors import ApiError
from ..kinds import KINDS
from ..storage import read
from . import data as rd

CHUNK = 100_000  # readings per read: memory stays a chunk's two lists plus the arrays


def month_period(month: str) -> tuple[date, date]:
    """'2026-11' -> (2026-11-01, 2026-11-30)."""
    try:
        y, m = (int(p) for p in month.split("-"))
        return date(y, m, 1), date(y, m, calendar.monthrange(y, m)[1])
    except ValueError as exc:
        raise ValueError(f"month must be YYYY-MM, got {month!r}") from exc


def _epoch(ts: datetime | None) -> float | None:
    return ts.timestamp() if ts is not None else None


async def _readings(
    conn: AsyncConnection[Any], num: int, lo: datetime, hi: datetime
) -> tuple[array[float], array[float]]:
    ts, vals = array("d"), array("d")
    cursor = lo
    while True:
        ts_us, values = await read.raw_columns(conn, num, cursor, hi, CHUNK)
        ts.fromlist(list(map(truediv, ts_us, repeat(1e6))))  # C-level: no loop per reading
        vals.fromlist(values)
        if len(ts_us) < CHUNK:
            return ts, vals
        cursor = datetime.fromtimestamp(ts_us[-1] / 1e6 + 1e-6, UTC)


def _limits(params: Any) -> tuple[float | None, float | None]:
    p = params if isinstance(params, dict) else {}
    lo, hi = p.get("ok_min"), p.get("ok_max")
    return (float(lo) if lo is not None else None, float(hi) if hi is not None else None)


async def _thresholds(
    conn: AsyncConnection[Any], account_id: str, channel_id: str, start: float, end: float
) -> tuple[rd.Threshold, ...]:
    cur = await conn.execute(
        "SELECT id, params, created_at, is_default FROM rules WHERE channel_id = %s"
        " AND kind = 'range' AND enabled ORDER BY created_at, id LIMIT 1",
        (channel_id,),
    )
    rule = await cur.fetchone()
    if rule is None:
        return ()
    rule_id, params, created_at, is_default = rule
    if created_at.timestamp() >= end:
        return ()
    # the limits in force at `start`, then each change in the period, and who made it
    # (alarms/history.py: both routes a rule's limits change by)
    changes = await limit_changes(conn, account_id, rule_id, channel_id)
    first: tuple[float | None, float | None] = (None, None)
    history: list[rd.Threshold] = []
    changes = made(changes, is_default, created_at)
    whos = ["", *(c.actor for c in changes)]  # who made each step
    for x, who in zip(steps(changes, params), whos, strict=True):
        at = x.since.timestamp() if x.since is not None else None
        if at is None or at < start:
            first = _limits(x.params)
        elif at < end:
            history.append(rd.Threshold(at, *_limits(x.params), who=who))
    return (rd.Threshold(None, *first), *history)


class Site(NamedTuple):
    account_id: str
    name: str
    address: str
    timezone: str


async def site(conn: AsyncConnection[Any], site_id: str, account_id: str | None) -> Site:
    """The site, in `account_id`'s account when given; `site_not_found` otherwise."""
    cur = await conn.execute(
        "SELECT account_id, name, address, timezone FROM sites WHERE id = %s"
        " AND (%s::text IS NULL OR account_id = %s)",
        (site_id, account_id, account_id),
    )
    row = await cur.fetchone()
    if row is None:
        raise ApiError("site_not_found", f"no site {site_id[:40]!r} in this account")
    return Site(*row)


class Channel(NamedTuple):
    id: str
    num: int
    name: str  # "device · channel", as the report prints it
    unit: str
    kind: str
    device: str
    cadence_s: int


async def channels(conn: AsyncConnection[Any], site_id: str) -> list[Channel]:
    """The site's measurement channels on its current devices, in print order: a
    node's own health figures (auxiliary kinds: battery, signal, health, ...) are not
    part of a compliance report."""
    cur = await conn.execute(
        "SELECT c.id, c.num, d.name || ' · ' || c.name, c.unit, c.kind, d.name, d.cadence_s"
        " FROM channels c JOIN devices d ON d.id = c.device_id"
        " WHERE d.site_id = %s AND d.deleted_at IS NULL ORDER BY d.name, c.name, c.id",
        (site_id,),
    )
    rows = [Channel(*r) for r in await cur.fetchall()]
    return [c for c in rows if not (c.kind in KINDS and KINDS[c.kind].auxiliary)]


async def excursions(
    conn: AsyncConnection[Any], channel_ids: list[str], lo: datetime, hi: datetime
) -> list[rd.Excursion]:
    """The channels' alarm events that reached the alarm state and overlap [lo, hi)."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            "SELECT id, channel_id, kind, severity, started_at, alarm_at, cleared_at, value,"
            " acknowledged_at, acknowledged_by, ack_note, ack_cause, ack_action, ack_product,"
            " cleared_by, clear_note FROM events WHERE channel_id = ANY(%s)"
            " AND alarm_at IS NOT NULL AND started_at < %s"
            " AND (cleared_at IS NULL OR cleared_at >= %s) ORDER BY started_at, id",
            (channel_ids, hi, lo),
        )
        return [
            rd.Excursion(
                id=r["id"],
                channel_id=r["channel_id"],
                kind=r["kind"],
                severity=r["severity"],
                started_at=r["started_at"].timestamp(),
                alarm_at=_epoch(r["alarm_at"]),
                cleared_at=_epoch(r["cleared_at"]),
                value=r["value"],
                acknowledged_at=_epoch(r["acknowledged_at"]),
                acknowledged_by=r["acknowledged_by"],
                ack_note=r["ack_note"],
                ack_cause=r["ack_cause"],
                ack_action=r["ack_action"],
                ack_product=r["ack_product"],
                cleared_by=r["cleared_by"],
                clear_note=r["clear_note"],
            )
            for r in await cur.fetchall()
        ]


OFFSETS_MAX = 100  # calibration changes per channel printed (the latest, up to the period's end)


async def _offsets(
    conn: AsyncConnection[Any], channel_id: str, end: float
) -> tuple[rd.Offset, ...]:
    cur = await conn.execute(
        'SELECT effective_from, "offset" FROM channel_offsets WHERE channel_id = %s'
        " AND effective_from < %s ORDER BY effective_from DESC LIMIT %s",
        (channel_id, datetime.fromtimestamp(end, UTC), OFFSETS_MAX),
    )
    return tuple(rd.Offset(t.timestamp(), float(o)) for t, o in reversed(await cur.fetchall()))


async def load_month(
    conn: AsyncConnection[Any],
    site_id: str,
    period_from: date,
    period_to: date,
    *,
    account_id: str | None = None,
    mkt_delta_h: float = rd.MKT_DELTA_H_DEFAULT,
    logo: bytes | None = None,
) -> rd.ReportInput:
    """The site's readings, thresholds and excursions over [period_from, period_to]
    (site-local days, inclusive). `account_id`: the caller's account; another
    account's site is not found."""
    site_row = await site(conn, site_id, account_id)
    acc, name, address, tz = site_row
    start, end = rd.period_bounds(period_from, period_to, tz)
    lo, hi = datetime.fromtimestamp(start, UTC), datetime.fromtimestamp(end, UTC)
    chans = []
    for c in await channels(conn, site_id):
        ts, vals = await _readings(conn, c.num, lo, hi)
        chans.append(
            rd.ChannelInput(
                id=c.id,
                name=c.name,
                device=c.device,
                unit=c.unit,
                cadence_s=c.cadence_s,
                ts=ts,
                values=vals,
                thresholds=await _thresholds(conn, acc, c.id, start, end),
                kind=c.kind,
                offsets=await _offsets(conn, c.id, end),
            )
        )
    exs = await excursions(conn, [c.id for c in chans], lo, hi)
    return rd.ReportInput(
        site_id=site_id,
        site_name=name,
        address=address,
        timezone=tz,
        period_from=period_from,
        period_to=period_to,
        channels=chans,
        excursions=exs,
        mkt_delta_h=mkt_delta_h,
        logo=logo,
    )
