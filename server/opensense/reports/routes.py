"""The reports API (docs/api.md, docs/reports.md): ask for a report, follow it, get
its PDF. The PDF is not stored: GET …/file renders it again and answers it only if
its SHA-256 is the one recorded when the report became ready."""

from __future__ import annotations

import hashlib
from typing import Any

from aiohttp import web
from psycopg import AsyncConnection

from ..api import auth
from ..api.body import json_object
from ..api.jsonutil import response
from ..api.keys import CONFIG, POOL, REPORTS
from ..errors import ApiError
from . import store

routes = web.RouteTableDef()


async def request_report(
    app: web.Application,
    conn: AsyncConnection[Any],
    account_id: str,
    body: dict[str, Any],
    actor: str,
) -> store.Row:
    """Check a request (the API's JSON body, or the dashboard's form made into one) and
    queue it, every refusal an ApiError in the API's words; the renderer is woken. The
    one function of POST /v1/reports and the dashboard's reports page."""
    cfg = app[CONFIG]
    ask = store.parse(body)
    async with conn.transaction():
        row = await store.create(
            conn, account_id, ask, cfg.clock(), queue_max=cfg.report_queue_max, actor=actor
        )
    app[REPORTS].wake.set()
    return row


@routes.post("/v1/reports")
async def create_report(request: web.Request) -> web.Response:
    async with request.app[POOL].connection() as conn:
        acc = await auth.account(request, conn)
        body = await json_object(request)
        row = await request_report(request.app, conn, acc, body, auth.actor(request))
    return response(store.public(row), status=202)


@routes.get("/v1/reports/{report_id}")
async def get_report(request: web.Request) -> web.Response:
    async with request.app[POOL].connection() as conn:
        acc = await auth.account(request, conn)
        row = await store.get(conn, acc, request.match_info["report_id"])
    return response(store.public(row))


async def file_response(app: web.Application, row: store.Row) -> web.Response:
    """A ready report's PDF, rendered again by the renderer and answered only with the
    SHA-256 recorded when it became ready; 409 (conflict) otherwise. The one path of
    GET /v1/reports/{id}/file and the dashboard's download link."""
    if row["status"] != "ready":
        raise ApiError(
            "conflict",
            f"report {row['id']} is {row['status']}, not ready"
            + (f": {row['error']}" if row["error"] else ""),
        )
    pdf = await app[REPORTS].file(row)
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


@routes.get("/v1/reports/{report_id}/file")
async def report_file(request: web.Request) -> web.Response:
    async with request.app[POOL].connection() as conn:
        acc = await auth.account(request, conn)
        row = await store.get(conn, acc, request.match_info["report_id"])
    return await file_response(request.app, row)
