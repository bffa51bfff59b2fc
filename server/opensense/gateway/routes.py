"""Gateway API: what a site gateway calls with its gw_ token (docs/gateway.md)."""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from ..api.auth import bearer
from ..api.jsonutil import response
from ..api.keys import CONFIG, LOG_ACCOUNT, POOL, VERIFIER
from ..errors import ApiError
from ..ingest.routes import oldest_accepted
from ..ingest.validate import parse_json
from . import store
from .push import SYNC_WATCH

routes = web.RouteTableDef()

# A batch of 5,000 readings in the columnar form is about 60 KiB; leave room.
MAX_BATCH_BYTES = 1024 * 1024
# The longest a sync long-poll is held: under the 60 s idle timeout of common proxies.
MAX_WAIT_S = 55


async def _gateway(request: web.Request) -> store.Gateway:
    cfg = request.app[CONFIG]
    async with request.app[POOL].connection() as conn:
        gw = await store.authenticate(conn, request.app[VERIFIER], bearer(request), cfg.clock())
    request[LOG_ACCOUNT] = gw.account_id
    return gw


@routes.get("/v1/gateway/sync")
async def sync(request: web.Request) -> web.Response:
    """The sync document. With `wait` (seconds) and the `version` the gateway holds,
    a long-poll: answered at once if the document differs, else held until the
    site's document changes (push, docs/gateway.md) or `wait` runs out (304)."""
    cfg = request.app[CONFIG]
    gw = await _gateway(request)
    wait, held = _wait(request)
    if not wait:
        async with request.app[POOL].connection() as conn:
            doc = await store.sync_document(conn, gw, cfg.clock())
        return response(doc)
    watch = request.app[SYNC_WATCH]
    deadline = time.monotonic() + wait
    try:
        while True:
            # watch before reading, so a change made in between is not missed
            changed = watch.watch(gw.site_id)
            try:
                async with request.app[POOL].connection() as conn:
                    doc = await store.sync_document(conn, gw, cfg.clock())
                if doc["version"] != held:
                    return response(doc)
                left = deadline - time.monotonic()
                if left <= 0 or watch.closing:
                    return web.Response(status=304)
                try:
                    await asyncio.wait_for(changed.wait(), left)
                except TimeoutError:
                    return web.Response(status=304)
            finally:
                watch.forget(gw.site_id, changed)
    finally:
        # the end of a long-poll is a call too: a gateway holding one is up
        async with request.app[POOL].connection() as conn:
            await store.heard(conn, gw.id, cfg.clock())


def _wait(request: web.Request) -> tuple[float, str]:
    raw, held = request.query.get("wait"), request.query.get("version", "")
    if raw is None:
        return 0.0, held
    try:
        wait = float(raw)
    except ValueError:
        wait = -1.0
    if not 0 <= wait <= MAX_WAIT_S:
        raise ApiError("invalid_request", f"wait must be 0..{MAX_WAIT_S} seconds")
    if wait and not 0 < len(held) <= 128:
        raise ApiError("invalid_request", "a long-poll (wait) needs the version held")
    return wait, held


@routes.post("/v1/gateway/ingest")
async def ingest(request: web.Request) -> web.Response:
    cfg = request.app[CONFIG]
    gw = await _gateway(request)
    raw = await request.clone(client_max_size=MAX_BATCH_BYTES).read()
    now = cfg.clock()
    body = parse_json(raw)
    checked = store.check_batch(body, now, oldest_accepted(cfg, now), cfg.gateway_batch_max)
    async with request.app[POOL].connection() as conn:
        answer = await store.ingest_batch(
            conn, gw, body["batch"], checked, now=now, compact_after_days=cfg.compact_after_days
        )
    return response(answer)


@routes.post("/v1/gateway/health")
async def health(request: web.Request) -> web.Response:
    gw = await _gateway(request)
    body = store.check_health(parse_json(await request.read()))
    async with request.app[POOL].connection() as conn:
        await store.store_health(conn, gw, body, request.app[CONFIG].clock())
    return response({"ok": True})


@routes.post("/v1/gateway/local-alerts")
async def local_alerts(request: web.Request) -> web.Response:
    cfg = request.app[CONFIG]
    gw = await _gateway(request)
    body = parse_json(await request.read())
    now = cfg.clock()
    async with request.app[POOL].connection() as conn:
        answer = await store.store_local_alerts(conn, gw, body, now, oldest_accepted(cfg, now))
    return response(answer)
