"""The overview: every channel of the account with its state, last value and age,
open alarms first, offline devices flagged (docs/dashboard.md)."""

from __future__ import annotations

from datetime import datetime

from aiohttp import web

from ..api.keys import CONFIG, POOL
from . import store
from .session import render, signed_in

routes = web.RouteTableDef()


def age(now: datetime, ts: datetime | None) -> str:
    if ts is None:
        return "no recent reading"
    s = max(0, int((now - ts).total_seconds()))
    if s < 60:
        return f"{s} s ago"
    if s < 3600:
        return f"{s // 60} min ago"
    if s < 86400:
        return f"{s // 3600} h ago"
    return f"{s // 86400} d ago"


STATE_CLASS = {"ok": "ok", "grace": "warn", "clearing": "warn", "alarm": "alarm"}


@routes.get("/")
async def overview(request: web.Request) -> web.Response:
    now = request.app[CONFIG].clock()
    async with request.app[POOL].connection() as conn:
        user = await signed_in(request, conn)
        lines = await store.overview(conn, user.account_id)
    rows = [
        {
            "line": x,
            "value": "–" if x.value is None else f"{x.value:.1f} {x.unit}",
            "age": age(now, x.ts),
            "css": "alarm" if x.open_events else STATE_CLASS.get(x.status, "none"),
            "offline": None if x.offline_since is None else age(now, x.offline_since),
        }
        for x in lines
    ]
    return render(request, user, "overview.html", {"rows": rows})
