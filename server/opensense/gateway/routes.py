"""Gateway API: what a site gateway calls with its gw_ token (docs/gateway.md)."""

from __future__ import annotations

from aiohttp import web

from ..api.auth import bearer
from ..api.jsonutil import response
from ..api.keys import CONFIG, LOG_ACCOUNT, POOL, VERIFIER
from ..ingest.routes import oldest_accepted
from ..ingest.validate import parse_json
from . import service

routes = web.RouteTableDef()

# A batch of 5,000 readings in the columnar form is about 60 KiB; leave room.
MAX_BATCH_BYTES = 1024 * 1024


async def _gateway(request: web.Request) -> service.Gateway:
    cfg = request.app[CONFIG]
    async with request.app[POOL].connection() as conn:
        gw = await service.authenticate(conn, request.app[VERIFIER], bearer(request), cfg.clock())
    request[LOG_ACCOUNT] = gw.account_id
    return gw


@routes.get("/v1/gateway/sync")
async def sync(request: web.Request) -> web.Response:
    gw = await _gateway(request)
    async with request.app[POOL].connection() as conn:
        doc = await service.sync_document(conn, gw, request.app[CONFIG].clock())
    return response(doc)


@routes.post("/v1/gateway/ingest")
async def ingest(request: web.Request) -> web.Response:
    cfg = request.app[CONFIG]
    gw = await _gateway(request)
    raw = await request.clone(client_max_size=MAX_BATCH_BYTES).read()
    now = cfg.clock()
    body = parse_json(raw)
    checked = service.check_batch(body, now, oldest_accepted(cfg, now), cfg.gateway_batch_max)
    async with request.app[POOL].connection() as conn:
        answer = await service.ingest_batch(
            conn, gw, body["batch"], checked, now=now, compact_after_days=cfg.compact_after_days
        )
    return response(answer)


@routes.post("/v1/gateway/health")
async def health(request: web.Request) -> web.Response:
    gw = await _gateway(request)
    body = service.check_health(parse_json(await request.read()))
    async with request.app[POOL].connection() as conn:
        await service.store_health(conn, gw, body, request.app[CONFIG].clock())
    return response({"ok": True})


@routes.post("/v1/gateway/local-alerts")
async def local_alerts(request: web.Request) -> web.Response:
    cfg = request.app[CONFIG]
    gw = await _gateway(request)
    body = parse_json(await request.read())
    now = cfg.clock()
    async with request.app[POOL].connection() as conn:
        answer = await service.store_local_alerts(conn, gw, body, now, oldest_accepted(cfg, now))
    return response(answer)
