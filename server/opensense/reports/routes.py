"""The reports API (docs/api.md, docs/reports.md): ask for a report, follow it, get
its PDF. The PDF is not stored: GET …/file renders it again and answers it only if
its SHA-256 is the one recorded when the report became ready."""

from __future__ import annotations

import hashlib

from aiohttp import web

from ..api import auth
from ..api.body import json_object
from ..api.jsonutil import response
from ..api.keys import CONFIG, POOL, REPORTS
from ..errors import ApiError
from . import store

routes = web.RouteTableDef()


@routes.post("/v1/reports")
async def create_report(request: web.Request) -> web.Response:
    cfg = request.app[CONFIG]
    async with request.app[POOL].connection() as conn:
        acc = await auth.account(request, conn)
        ask = store.parse(await json_object(request))
        async with conn.transaction():
            row = await store.create(
                conn,
                acc,
                ask,
                cfg.clock(),
                queue_max=cfg.report_queue_max,
                actor=auth.actor(request),
            )
    request.app[REPORTS].wake.set()
    return response(store.public(row), status=202)


@routes.get("/v1/reports/{report_id}")
async def get_report(request: web.Request) -> web.Response:
    async with request.app[POOL].connection() as conn:
        acc = await auth.account(request, conn)
        row = await store.get(conn, acc, request.match_info["report_id"])
    return response(store.public(row))


@routes.get("/v1/reports/{report_id}/file")
async def report_file(request: web.Request) -> web.Response:
    async with request.app[POOL].connection() as conn:
        acc = await auth.account(request, conn)
        row = await store.get(conn, acc, request.match_info["report_id"])
    if row["status"] != "ready":
        raise ApiError(
            "conflict",
            f"report {row['id']} is {row['status']}, not ready"
            + (f": {row['error']}" if row["error"] else ""),
        )
    pdf = await request.app[REPORTS].file(row)
    if hashlib.sha256(pdf).hexdigest() != row["sha256"]:
        raise ApiError(
            "conflict",
            "the site's data for this period changed after the report was rendered (late "
            "readings or a correction), so its PDF cannot be made again with SHA-256 "
            f"{row['sha256']}; ask for a new report",
        )
    name = f"{row['template']}_{row['period_from']}_{row['period_to']}_{row['language']}.pdf"
    return web.Response(
        body=pdf,
        content_type="application/pdf",
        headers={
            "Content-Disposition": f'attachment; filename="{name}"',
            "X-Content-SHA256": row["sha256"],
            "Cache-Control": "private, max-age=0",
        },
    )
