"""Routes of the status feature.

Public: /status (HTML), /status.json, /metrics (bearer OPENSENSE_METRICS_TOKEN when
set): answered from the in-memory snapshot, no query on the request path.
Per account (ua_live_ token): /v1/status/gateways, the account's own gateways.
Operator (bearer OPENSENSE_OPERATOR_TOKEN; empty: these answer 404):
/v1/status/internal and /v1/incidents….
"""

from __future__ import annotations

import hmac
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from ..api import auth
from ..api.body import json_object
from ..api.jsonutil import response
from ..api.keys import CONFIG, POOL, STATUS
from ..errors import ApiError
from . import incidents
from .metrics import exposition

routes = web.RouteTableDef()


@routes.get("/status")
async def status_html(request: web.Request) -> web.Response:
    snap = request.app[STATUS].snapshot
    return web.Response(
        body=snap.html_bytes,
        content_type="text/html",
        charset="utf-8",
        headers={"Cache-Control": "no-cache"},
    )


@routes.get("/status.json")
async def status_json(request: web.Request) -> web.Response:
    snap = request.app[STATUS].snapshot
    return web.Response(
        body=snap.json_bytes,
        content_type="application/json",
        headers={"Cache-Control": "no-cache"},
    )


def _check_bearer(request: web.Request, secret: str, what: str) -> None:
    given = auth.bearer(request)
    if given is None:
        raise ApiError("auth_required", f"{what} needs Authorization: Bearer <token>")
    if not hmac.compare_digest(given.encode(), secret.encode()):
        raise ApiError("token_invalid", f"that token is not the {what} token")


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    cfg = request.app[CONFIG]
    if cfg.metrics_token:
        _check_bearer(request, cfg.metrics_token, "metrics")
    resp = web.Response(body=exposition(request.app[STATUS]))
    resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return resp


@routes.get("/v1/status/gateways")
async def my_gateways(request: web.Request) -> web.Response:
    async with request.app[POOL].connection() as conn:
        acc = await auth.account(request, conn)
    return response({"data": request.app[STATUS].gateways_of(acc)})


# --- operator ------------------------------------------------------------------------


def operator(request: web.Request) -> str:
    cfg = request.app[CONFIG]
    if not cfg.operator_token:
        raise ApiError("not_found", "the operator API is off (OPENSENSE_OPERATOR_TOKEN is empty)")
    _check_bearer(request, cfg.operator_token, "operator")
    return "operator"


async def _body(request: web.Request) -> dict[str, Any]:
    return await json_object(request)


def _author(body: dict[str, Any], default: str) -> str:
    a = body.get("author", default)
    if not isinstance(a, str) or not a.strip() or len(a) > 200:
        raise ApiError("invalid_request", "`author` must be a name of 1 to 200 characters")
    return a.strip()


def _view(request: web.Request, row: dict[str, Any], ups: list[dict[str, Any]]) -> dict[str, Any]:
    mon = request.app[STATUS]
    return incidents.present(row, ups, mon.tz, request.app[CONFIG].clock())


@routes.get("/v1/status/internal")
async def internal(request: web.Request) -> web.Response:
    operator(request)
    mon = request.app[STATUS]
    s = mon.snapshot
    return response(
        {
            "generated_at": s.at,
            "stale": s.stale,
            "process": mon.process,
            "build_ms": round(s.build_ms, 2),
            "figures": s.figures,
            "firing": [
                {
                    "condition": f.ident,
                    "class": f.condition.klass,
                    "since": f.since,
                    "detail": f.detail,
                }
                for f in s.firing
            ],
        }
    )


@routes.get("/v1/incidents")
async def list_incidents(request: web.Request) -> web.Response:
    operator(request)
    open_only = request.query.get("open", "false").lower() in ("1", "true", "yes")
    async with request.app[POOL].connection() as conn:
        rows = await incidents.list_all(conn, open_only=open_only)
    return response({"data": [_view(request, r, u) for r, u in rows]})


@routes.post("/v1/incidents")
async def open_incident(request: web.Request) -> web.Response:
    who = operator(request)
    body = await _body(request)
    klass = body.get("class")
    if klass not in ("P0", "P1", "P2"):
        raise ApiError("invalid_request", "`class` must be P0, P1 or P2 (the incident classes)")
    title = incidents._text(body, "title", limit=200)
    text = incidents._text(body, "body")
    affected = body.get("affected_accounts")
    if affected is not None and (
        not isinstance(affected, list) or not all(isinstance(a, str) for a in affected)
    ):
        raise ApiError("invalid_request", "`affected_accounts` must be a list of acc_ ids")
    component = body.get("component")
    if component is not None and not isinstance(component, str):
        raise ApiError("invalid_request", "`component` must be a string")
    now = request.app[CONFIG].clock()
    async with request.app[POOL].connection() as conn, conn.transaction():
        iid = await incidents.open_incident(
            conn,
            now,
            klass=klass,
            title=title,
            body=text,
            author=_author(body, who),
            component=component,
            affected=affected,
        )
        assert iid is not None
        row, ups = await incidents.get(conn, iid)
    async with request.app[POOL].connection() as conn:
        await request.app[STATUS].refresh_incidents(conn)
    return response(_view(request, row, ups), status=201)


@routes.get("/v1/incidents/{incident_id}")
async def get_incident(request: web.Request) -> web.Response:
    operator(request)
    async with request.app[POOL].connection() as conn:
        row, ups = await incidents.get(conn, request.match_info["incident_id"])
    return response(_view(request, row, ups))


async def _step(request: web.Request, fn: Any, *args: Any) -> web.Response:
    who = operator(request)
    body = await _body(request)
    iid = request.match_info["incident_id"]
    now = request.app[CONFIG].clock()
    async with request.app[POOL].connection() as conn, conn.transaction():
        await fn(conn, iid, now, _author(body, who), *[a(body) for a in args])
        row, ups = await incidents.get(conn, iid)
    async with request.app[POOL].connection() as conn:
        await request.app[STATUS].refresh_incidents(conn)
    return response(_view(request, row, ups))


def _opt_text(key: str) -> Any:
    return lambda b: incidents._text(b, key, required=False)


def _req_text(key: str) -> Any:
    return lambda b: incidents._text(b, key)


def _status(b: dict[str, Any]) -> str | None:
    s = b.get("status")
    if s is not None and s not in incidents.OPEN_STATUSES:
        raise ApiError(
            "invalid_request",
            f"`status` must be one of {', '.join(incidents.OPEN_STATUSES)}; resolve with /resolve",
        )
    return s


@routes.post("/v1/incidents/{incident_id}/ack")
async def ack(request: web.Request) -> web.Response:
    return await _step(request, incidents.acknowledge, _opt_text("body"))


@routes.post("/v1/incidents/{incident_id}/updates")
async def update(request: web.Request) -> web.Response:
    return await _step(request, incidents.post_update, _status, _req_text("body"))


@routes.post("/v1/incidents/{incident_id}/resolve")
async def resolve(request: web.Request) -> web.Response:
    return await _step(request, incidents.resolve, _req_text("body"))


@routes.put("/v1/incidents/{incident_id}/postmortem")
async def postmortem(request: web.Request) -> web.Response:
    return await _step(request, incidents.set_postmortem, _req_text("text"))
