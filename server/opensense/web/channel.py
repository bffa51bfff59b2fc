"""The channel page (docs/dashboard.md, "Channel"): a chart for 24 h / 7 d / 30 d /
13 months from the rollup that fits the range, alarm periods as bands from the event
log, each range rule's thresholds (with their history from the audit trail) as
lines, gaps as gaps; the same data as a table for a browser without JavaScript; the
channel's events with acknowledge and clear forms (operator role or above).

Only rollups are read, never raw readings: a range's points are its buckets, a few
hundred at most (13 months: one per UTC day from rollup_1d). A bucket without data
is a gap: the series carry a null where a bucket is missing, which the chart draws
as a break in the line."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from aiohttp import web
from psycopg import AsyncConnection

from ..alarms import history, person
from ..alarms import store as alarms_store
from ..alarms.history import limit_changes
from ..api.jsonutil import response
from ..api.keys import CONFIG, POOL
from ..errors import ApiError
from ..storage import rollups
from ..storage.read import AGG_SECONDS, floor_bucket
from .board import fmt_value
from .routes import SESSION_COOKIE, check_csrf, form_of, see_other
from .session import render, require, signed_in
from .store import User

routes = web.RouteTableDef()


@dataclass(frozen=True)
class Range:
    label: str
    span: timedelta
    agg: str  # the rollup read: 5m, 1h or 1d


# The chart's ranges, as data: key (the `range` query value) -> what it reads.
RANGES = {
    "24h": Range("24 hours", timedelta(hours=24), "5m"),
    "7d": Range("7 days", timedelta(days=7), "1h"),
    "30d": Range("30 days", timedelta(days=30), "1h"),
    "13m": Range("13 months", timedelta(days=396), "1d"),
}
DEFAULT_RANGE = "24h"
EVENTS_SHOWN = 50  # newest events listed on the page
BANDS_MAX = 500  # alarm periods drawn on one chart
THRESHOLD_PARAMS = {"ok_min": "lower limit", "ok_max": "upper limit"}  # range rules


@dataclass(frozen=True)
class Channel:
    id: str
    num: int
    name: str
    kind: str
    unit: str
    device_name: str
    site_name: str
    timezone: str


async def channel_of(conn: AsyncConnection[Any], user: User, channel_id: str) -> Channel:
    """One of the user's account's live channels; another account's is not found."""
    cur = await conn.execute(
        "SELECT c.id, c.num, c.name, c.kind, c.unit, d.name, s.name, s.timezone"
        "  FROM channels c"
        "  JOIN devices d ON d.id = c.device_id AND d.account_id = c.account_id"
        "   AND d.deleted_at IS NULL"
        "  JOIN sites s ON s.id = d.site_id"
        " WHERE c.id = %s AND c.account_id = %s",
        (channel_id, user.account_id),
    )
    row = await cur.fetchone()
    if row is None:
        code = "sensor_not_found" if channel_id.startswith("snr_") else "channel_not_found"
        raise ApiError(code, f"no channel {channel_id[:40]!r} in this account")
    return Channel(*row)


def range_of(request: web.Request) -> str:
    key = request.query.get("range", DEFAULT_RANGE)
    if key not in RANGES:
        raise ApiError("invalid_request", f"range must be one of {', '.join(RANGES)}")
    return key


def epoch(t: datetime) -> int:
    return int(t.timestamp())


def _num(v: float) -> float:
    return round(v, 3)


async def series(
    conn: AsyncConnection[Any], ch: Channel, rng: Range, now: datetime
) -> dict[str, Any]:
    """The range's buckets from its rollup: x (epoch s), mean, min, max, with a null
    row after each bucket followed by a missing one (a gap stays a gap)."""
    lo = floor_bucket(now - rng.span, rng.agg)
    width = AGG_SECONDS[rng.agg]
    cur = await conn.execute(
        f"SELECT bucket, vsum / n, vmin, vmax FROM ({rollups.buckets_sql(rng.agg)}) b",
        rollups.buckets_params([ch.num], lo, now + timedelta(microseconds=1)),
    )
    x: list[int] = []
    cols: dict[str, list[float | None]] = {"mean": [], "min": [], "max": []}
    for bucket, mean, vmin, vmax in await cur.fetchall():
        t = epoch(bucket)
        if x and t - x[-1] > width:  # missing buckets: break the line
            x.append(x[-1] + width)
            for c in cols.values():
                c.append(None)
        x.append(t)
        cols["mean"].append(_num(mean))
        cols["min"].append(_num(vmin))
        cols["max"].append(_num(vmax))
    return {"agg": rng.agg, "from": epoch(lo), "to": epoch(now), "x": x, **cols}


async def bands(
    conn: AsyncConnection[Any], user: User, ch: Channel, lo: datetime, now: datetime
) -> list[dict[str, Any]]:
    """Alarm periods overlapping [lo, now]: from the first reading out of range to the
    clear (or now, still open)."""
    cur = await conn.execute(
        "SELECT id, state, started_at, cleared_at FROM events"
        " WHERE account_id = %s AND channel_id = %s AND started_at <= %s"
        "   AND (cleared_at IS NULL OR cleared_at >= %s)"
        " ORDER BY started_at LIMIT %s",
        (user.account_id, ch.id, now, lo, BANDS_MAX),
    )
    return [
        {"id": eid, "state": state, "from": epoch(max(start, lo)), "to": epoch(end or now)}
        for eid, state, start, end in await cur.fetchall()
    ]


def _steps(points: list[tuple[datetime | None, Any]], lo: datetime) -> list[list[Any]]:
    """[[epoch, value], …] of one threshold from lo on: the value in force at lo, then
    each change of it after lo. `points`: (since, value) oldest first, since None
    "from the beginning" (alarms/history.py `steps`); a value None: no limit."""
    at_lo = None
    out: list[list[Any]] = []
    for since, v in points:
        if since is None or since <= lo:
            at_lo = v
        elif v != (out[-1][1] if out else at_lo):
            out.append([epoch(since), v])
    return [[epoch(lo), at_lo], *out]


async def thresholds(
    conn: AsyncConnection[Any], user: User, ch: Channel, lo: datetime
) -> list[dict[str, Any]]:
    """Each enabled range rule's limits as step lines, their history from the audit
    trail (alarms/history.py: the rule's own rows and the channel's PATCHes; a
    channel's default rule is in force from the channel's beginning)."""
    cur = await conn.execute(
        "SELECT id, params, is_default, created_at FROM rules"
        " WHERE channel_id = %s AND kind = 'range' AND enabled ORDER BY created_at",
        (ch.id,),
    )
    out = []
    for rule_id, params, is_default, created_at in await cur.fetchall():
        changes = await limit_changes(conn, user.account_id, rule_id, ch.id)
        steps = history.steps(history.made(changes, is_default, created_at), params)
        for key, label in THRESHOLD_PARAMS.items():
            points = [(x.since, None if x.params is None else x.params.get(key)) for x in steps]
            if all(v is None for _, v in points):
                continue
            out.append({"rule": rule_id, "label": label, "steps": _steps(points, lo)})
    return out


async def chart_data(
    conn: AsyncConnection[Any], user: User, ch: Channel, key: str, now: datetime
) -> dict[str, Any]:
    rng = RANGES[key]
    data = await series(conn, ch, rng, now)
    lo = datetime.fromtimestamp(data["from"], UTC)
    return {
        "channel": {"id": ch.id, "name": ch.name, "unit": ch.unit, "kind": ch.kind},
        "range": key,
        **data,
        "bands": await bands(conn, user, ch, lo, now),
        "thresholds": await thresholds(conn, user, ch, lo),
    }


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ValueError, KeyError):
        return ZoneInfo("UTC")


async def _page(
    request: web.Request,
    conn: AsyncConnection[Any],
    user: User,
    ch: Channel,
    key: str,
    form: dict[str, Any] | None = None,
    status: int = 200,
) -> web.Response:
    now = request.app[CONFIG].clock()
    data = await chart_data(conn, user, ch, key, now)
    tz = _zone(ch.timezone)
    fmt = "%Y-%m-%d" if data["agg"] == "1d" else "%Y-%m-%d %H:%M"
    rows = [
        {"t": datetime.fromtimestamp(t, tz).strftime(fmt), "mean": fmt_value(m, ch.unit, ch.kind),
         "min": fmt_value(lo, ch.unit, ch.kind), "max": fmt_value(hi, ch.unit, ch.kind)}
        for t, m, lo, hi in zip(data["x"], data["mean"], data["min"], data["max"], strict=True)
        if m is not None
    ]  # fmt: skip
    events = await alarms_store.events(conn, user.account_id, None, ch.id, EVENTS_SHOWN)

    def local(t: datetime | None) -> str:
        return "" if t is None else t.astimezone(tz).strftime("%Y-%m-%d %H:%M %Z")

    return render(
        request,
        user,
        "channel.html",
        {
            "ch": ch,
            "key": key,
            "ranges": RANGES,
            "rows": rows,
            "agg": data["agg"],
            "bands": len(data["bands"]),
            "limits": [t["label"] for t in data["thresholds"]],
            "events": events,
            "local": local,
            "fmt": lambda v: fmt_value(v, ch.unit, ch.kind),
            "form": form or {"event": "", "what": "", "errors": {}, "values": {}},
        },
        status=status,
    )


@routes.get("/channels/{channel_id}")
async def channel_page(request: web.Request) -> web.Response:
    async with request.app[POOL].connection() as conn:
        user = await signed_in(request, conn)
        key = range_of(request)
        ch = await channel_of(conn, user, request.match_info["channel_id"])
        return await _page(request, conn, user, ch, key)


@routes.get("/channels/{channel_id}/data")
async def channel_data(request: web.Request) -> web.Response:
    """The chart's data as JSON (web/static/channel.js draws it)."""
    async with request.app[POOL].connection() as conn:
        user = await signed_in(request, conn)
        key = range_of(request)
        ch = await channel_of(conn, user, request.match_info["channel_id"])
        return response(await chart_data(conn, user, ch, key, request.app[CONFIG].clock()))


async def _person_step(request: web.Request, what: str) -> web.Response:
    """The ack or clear form: CSRF, operator role, the event one of this channel's;
    the note validated field by field with the API's messages (alarms/person.py).
    A refusal shows the page again (422) with each message next to its field, and
    nothing changes."""
    form = await form_of(request)
    async with request.app[POOL].connection() as conn:
        user = await signed_in(request, conn)
        check_csrf(request.cookies.get(SESSION_COOKIE), form)
        require(user, "operator")
        ch = await channel_of(conn, user, request.match_info["channel_id"])
        event_id = request.match_info["event_id"]
        ev = await alarms_store.event(conn, user.account_id, event_id)
        if ev is None or ev["channel_id"] != ch.id:
            raise ApiError("event_not_found", f"no event {event_id[:40]!r} on this channel")
        # an optional field left empty is no value; the note itself is required
        body = {k: form.get(k) or None for k in person.NOTE_FIELDS if k != "note"}
        body["note"] = form.get("note", "")
        errors: dict[str, str] = {}
        for k in person.NOTE_FIELDS:
            try:
                person.text(body, k, required=k == "note")
            except ApiError as exc:
                errors[k] = exc.message
        if not errors:
            try:
                await person.step(
                    conn, what, user.account_id, ev["id"], user.email, person.note(body),
                    user.id, request.app[CONFIG].clock(),
                )  # fmt: skip
            except ApiError as exc:
                if exc.code != "event_state":
                    raise
                errors["event"] = exc.message
        if errors:
            values = {k: form.get(k, "") for k in person.NOTE_FIELDS}
            state = {"event": ev["id"], "what": what, "errors": errors, "values": values}
            return await _page(request, conn, user, ch, DEFAULT_RANGE, state, status=422)
    return see_other(f"/channels/{ch.id}#events")


@routes.post("/channels/{channel_id}/events/{event_id}/ack")
async def ack(request: web.Request) -> web.Response:
    return await _person_step(request, "ack")


@routes.post("/channels/{channel_id}/events/{event_id}/clear")
async def clear(request: web.Request) -> web.Response:
    return await _person_step(request, "clear")
