"""The overview: the account's measurement channels as cards grouped by device, each
device's health in one line, open alarms first, offline devices flagged, each card a
link to its channel page (docs/dashboard.md). The cards update live when
/static/live.js can open the event stream (web/live.py); without it the page is
complete as served."""

from __future__ import annotations

from aiohttp import web

from ..api.keys import CONFIG, POOL
from .board import board
from .session import render, signed_in

routes = web.RouteTableDef()


@routes.get("/")
async def overview(request: web.Request) -> web.Response:
    now = request.app[CONFIG].clock()
    async with request.app[POOL].connection() as conn:
        user = await signed_in(request, conn)
        devices = await board(conn, user.account_id, now)
    return render(request, user, "overview.html", {"devices": devices})
