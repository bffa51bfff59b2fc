"""Read API: one channel's series (JSON or CSV) and up to 32 channels at once.

Every channel read counts one unit of the account's read rate limit (a 32-channel
read is 32 requests' worth of work). A computed aggregate (fn=last|p50|p95, whose
cost grows with the readings in range) may span at most
`OPENSENSE_READ_MAX_CHANNEL_DAYS` channel-days per request: past it the request is
refused with 422 `invalid_range` naming the cap, before anything is read; within it,
it counts one unit per `DAYS_PER_UNIT` channel-days (if that is more than one per
channel), so the rate limit bounds the CPU an account's reads may take.
"""

from __future__ import annotations

import base64
import binascii
import math
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

from .. import ratelimit
from ..api import auth
from ..api.body import query_choice, query_int, query_ts
from ..api.jsonutil import response, rfc3339
from ..api.keys import CONFIG, POOL
from ..devices import store
from ..errors import ApiError
from ..ingest.validate import parse_ts
from .read import AGG_SECONDS, AGGS, COMPUTED_FNS, FNS, floor_bucket, read_series

routes = web.RouteTableDef()
MAX_LIMIT = 5000
MAX_CHANNELS = 32
DAYS_PER_UNIT = 31  # a computed read costs a rate-limit unit per month of one channel
_EARLIEST = datetime(1, 1, 2, tzinfo=UTC)
_LATEST = datetime(9999, 12, 31, tzinfo=UTC)


def encode_cursor(ts: datetime) -> str:
    return base64.urlsafe_b64encode(("v1:" + rfc3339(ts)).encode()).decode().rstrip("=")


def decode_cursor(text: str) -> datetime:
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()
        if not raw.startswith("v1:"):
            raise ValueError
        ts = parse_ts(raw[3:], "cursor")
        if ts >= _LATEST:
            raise ValueError
        return ts
    except (ValueError, binascii.Error, ApiError, UnicodeDecodeError):
        raise ApiError("invalid_request", "cursor is not one this API handed out") from None


def _params(request: web.Request, now: datetime) -> dict[str, Any]:
    to = query_ts(request, "to") or now
    frm = query_ts(request, "from") or (max(to, _EARLIEST) - timedelta(hours=24))
    if frm >= to:
        raise ApiError("invalid_range", "from must be before to")
    agg = query_choice(request, "agg", AGGS, "raw")
    fn = query_choice(request, "fn", FNS, "mean")
    limit = query_int(request, "limit", MAX_LIMIT, 1, MAX_LIMIT)
    cur = request.query.get("cursor")
    fmt = query_choice(request, "format", ("json", "csv"), "json")
    return {
        "lo": frm,
        "hi": to,
        "agg": agg,
        "fn": fn,
        "limit": limit,
        "after": decode_cursor(cur) if cur else None,
        "format": fmt,
    }


def check_cost(p: dict[str, Any], channels: int, max_channel_days: int) -> int:
    """The request's rate-limit units; refuses a computed read over more than
    `max_channel_days` channel-days (the part of the range still to answer: a cursor
    moves the start)."""
    if p["agg"] == "raw" or p["fn"] not in COMPUTED_FNS:
        return channels  # raw points and rollup buckets are bounded by `limit`
    start = floor_bucket(p["lo"], p["agg"])
    if p["after"] is not None:
        start = max(start, p["after"] + timedelta(seconds=AGG_SECONDS[p["agg"]]))
    days = max(0.0, (p["hi"] - start).total_seconds() / 86400)
    if days * channels > max_channel_days:
        raise ApiError(
            "invalid_range",
            f"fn={p['fn']} reads at most {max_channel_days} channel-days per request"
            f" (asked: {channels} channel(s) x {days:.1f} days); read a shorter range or"
            " fewer channels at a time, or use fn=mean|min|max|count (from rollups)",
        )
    return int(max(channels, math.ceil(days * channels / DAYS_PER_UNIT)))


def _value(v: float, fn: str, agg: str) -> float | int:
    return int(v) if agg != "raw" and fn == "count" else v


async def _series(conn: Any, acc: str, channel_id: str, p: dict[str, Any]) -> dict[str, Any]:
    ch = await store.channel_row(conn, acc, channel_id)
    points, more = await read_series(
        conn, ch["num"], p["lo"], p["hi"], p["agg"], p["fn"], p["limit"], p["after"]
    )
    return {
        "channel_id": ch["id"],
        "agg": p["agg"],
        "fn": p["fn"] if p["agg"] != "raw" else None,
        "data": [[rfc3339(t), _value(v, p["fn"], p["agg"])] for t, v in points],
        "next_cursor": encode_cursor(points[-1][0]) if more and points else None,
        "has_more": more,
    }


@routes.get("/v1/channels/{channel_id}/measurements")
async def channel_measurements(request: web.Request) -> web.StreamResponse:
    cfg = request.app[CONFIG]
    now = cfg.clock()
    async with request.app[POOL].connection() as conn:
        acc = await auth.account(request, conn)
        p = _params(request, now)
        units = check_cost(p, 1, cfg.read_max_channel_days)
        if units > 1:  # the first unit was counted with the token
            await ratelimit.hit(
                conn, f"read:{acc}", cfg.read_rate_per_min, 60, now, "API access", cost=units - 1
            )
        if p["format"] == "csv":
            await ratelimit.hit(conn, f"export:{acc}", 1, cfg.export_interval_s, now, "CSV export")
        s = await _series(conn, acc, request.match_info["channel_id"], p)
    if p["format"] == "json":
        return response(s)
    lines = ["ts,value"] + [f"{t},{v!r}" for t, v in s["data"]]
    resp = web.Response(text="\n".join(lines) + "\n", content_type="text/csv", charset="utf-8")
    resp.headers["X-Has-More"] = "true" if s["has_more"] else "false"
    if s["next_cursor"]:
        resp.headers["X-Next-Cursor"] = s["next_cursor"]
    resp.headers["Content-Disposition"] = f'attachment; filename="{s["channel_id"]}.csv"'
    return resp


@routes.get("/v1/measurements")
async def multi_measurements(request: web.Request) -> web.Response:
    """Several channels: ?channel_id=a&channel_id=b (or channels=a,b), same options."""
    cfg = request.app[CONFIG]
    now = cfg.clock()
    async with request.app[POOL].connection() as conn:
        acc = await auth.account(request, conn)  # the first channel's unit
        ids = request.query.getall("channel_id", [])
        if request.query.get("channels"):
            ids += [c for c in request.query["channels"].split(",") if c]
        ids = list(dict.fromkeys(ids))
        if not 1 <= len(ids) <= MAX_CHANNELS:
            raise ApiError("invalid_request", f"name 1 to {MAX_CHANNELS} channels, got {len(ids)}")
        p = _params(request, now)
        if p["format"] != "json":
            raise ApiError(
                "invalid_request", "multi-channel reads answer JSON only; export one channel as CSV"
            )
        units = check_cost(p, len(ids), cfg.read_max_channel_days)
        if units > 1:  # one unit per channel read (or more), counted before any is read
            await ratelimit.hit(
                conn, f"read:{acc}", cfg.read_rate_per_min, 60, now, "API access",
                cost=units - 1,
            )  # fmt: skip
        series = [await _series(conn, acc, cid, p) for cid in ids]
    return response({"series": series})
