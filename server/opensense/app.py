"""The app factory: `create_app(config)` only wires. Pools, writers and background
tasks live in cleanup_ctx so they start and stop with the app."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from aiohttp import web
from psycopg_pool import AsyncConnectionPool

from . import db, jobs
from .api.keys import CONFIG, DSN, POOL, REQUEST_LOG, VERIFIER, WRITER
from .api.middleware import error_middleware
from .api.requestlog import RequestLog
from .devices.routes import routes as device_routes
from .ingest.routes import routes as ingest_routes
from .ingest.validate import MAX_BODY_BYTES
from .openapi import routes as openapi_routes
from .settings import Config
from .storage.batcher import BatchWriter
from .storage.routes import routes as read_routes
from .tokens import Verifier

log = logging.getLogger(__name__)


async def database_ctx(app: web.Application) -> AsyncIterator[None]:
    cfg = app[CONFIG]
    dsn = app[DSN]
    await asyncio.to_thread(db.check_migrated, dsn)
    pool = AsyncConnectionPool(
        dsn,
        min_size=cfg.pool_min,
        max_size=cfg.pool_max,
        kwargs={"autocommit": True, "options": "-c timezone=UTC"},
        open=False,
    )
    await pool.open(wait=True, timeout=30)
    app[POOL] = pool
    yield
    await pool.close()


async def request_log_ctx(app: web.Application) -> AsyncIterator[None]:
    rl = RequestLog(app[POOL])
    rl.start()
    app[REQUEST_LOG] = rl
    yield
    await rl.stop()


async def writer_ctx(app: web.Application) -> AsyncIterator[None]:
    writer = BatchWriter(app[POOL])
    writer.start()
    app[WRITER] = writer
    yield
    await writer.stop()


async def jobs_ctx(app: web.Application) -> AsyncIterator[None]:
    cfg = app[CONFIG]
    task = asyncio.create_task(jobs.scheduler(app[POOL], cfg)) if cfg.jobs_enabled else None
    yield
    if task:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


def create_app(config: Config, dsn: str) -> web.Application:
    app = web.Application(middlewares=[error_middleware], client_max_size=MAX_BODY_BYTES)
    app[CONFIG] = config
    app[DSN] = dsn
    app[VERIFIER] = Verifier()
    app.cleanup_ctx.extend([database_ctx, request_log_ctx, writer_ctx, jobs_ctx])
    app.router.add_get("/healthz", healthz)
    for table in (ingest_routes, device_routes, read_routes, openapi_routes):
        app.router.add_routes(table)
    return app
