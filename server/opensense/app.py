"""The app factory: `create_app(config)` only wires. It holds the contexts every
feature shares (the database pool, the token verifier, the request log, the batch
writer) and the list of features; each feature's `setup(app)` adds its own routes
and contexts (docs/architecture.md, "Adding a feature"). Pools, writers and
background tasks live in cleanup_ctx so they start and stop with the app."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Protocol, TypeVar

from aiohttp import web
from psycopg_pool import AsyncConnectionPool

from opensense_contract.payload import MAX_BODY_BYTES

from . import (
    alarms,
    db,
    devices,
    gateway,
    ingest,
    jobs,
    mqtt,
    openapi,
    reports,
    status,
    storage,
    workers,
)
from . import web as dashboard  # the package's name would shadow aiohttp's `web`
from .api.keys import (
    AUTHS,
    CHANNELS,
    CONFIG,
    DSN,
    HEALTH,
    OBSERVER,
    POOL,
    REQUEST_LOG,
    VERIFIER,
    WRITER,
)
from .api.middleware import error_middleware
from .api.requestlog import RequestLog
from .db import roles as db_roles
from .ingest.authbatch import AuthBatcher, auth_pool
from .ingest.pipeline import ChannelCache
from .reports import verify_routes as report_verify
from .settings import Config
from .status.health import Health
from .status.observe import Observer
from .storage.batcher import BatchWriter
from .tokens import Verifier, load_mac_key
from .workers import Worker


async def database_ctx(app: web.Application) -> AsyncIterator[None]:
    cfg = app[CONFIG]
    dsn = app[DSN]
    await asyncio.to_thread(db.check_migrated, dsn)
    # never serve as a role that could switch the audit trail's trigger off
    await asyncio.to_thread(db_roles.check_serving_role, dsn)
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


async def verifier_ctx(app: web.Application) -> AsyncIterator[None]:
    """The token verifier's fast-check key (outside the database) and its bcrypt pool."""
    cfg = app[CONFIG]
    verifier = app[VERIFIER]
    verifier.mac_key = await asyncio.to_thread(load_mac_key, cfg.token_mac_key, Path(cfg.state_dir))
    yield
    verifier.close()


class _Runner(Protocol):
    def start(self) -> None: ...

    async def stop(self) -> None: ...


R = TypeVar("R", bound=_Runner)


def runner_ctx(
    key: web.AppKey[R], make: Callable[[web.Application], R]
) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context for a background runner of the app: made and started at
    startup and put on the app under `key`, stopped at cleanup."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        runner = make(app)
        runner.start()
        app[key] = runner
        yield
        await runner.stop()

    return ctx


# the request log; the one batch writer every door writes readings through; HTTP
# ingest's token statements, shared by concurrent requests (ingest/authbatch.py)
request_log_ctx = runner_ctx(REQUEST_LOG, lambda app: RequestLog(app[POOL]))
writer_ctx = runner_ctx(
    WRITER, lambda app: BatchWriter(app[POOL], linger_ms=app[CONFIG].write_linger_ms)
)


async def auth_ctx(app: web.Application) -> AsyncIterator[None]:
    """HTTP ingest's token statements, on connections of their own (ingest/authbatch.py
    says why: its plan setting)."""
    pool = auth_pool(app[DSN])
    await pool.open(wait=True, timeout=30)
    auths = AuthBatcher(pool)
    auths.start()
    app[AUTHS] = auths
    yield
    await auths.stop()
    await pool.close()


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


# The features a serving process has, in order: each one's setup adds its routes,
# its contexts (started in this order, stopped in reverse: the status monitor after
# the MQTT side it reads) and, through opensense/openapi.py, its OpenAPI part.
FEATURES: tuple[Callable[[web.Application], None], ...] = (
    ingest.setup,
    devices.setup,
    storage.setup,
    mqtt.setup,
    openapi.setup,
    jobs.setup,
    alarms.setup,
    reports.setup,
    status.setup,
    gateway.setup,
    dashboard.setup,
    report_verify.setup,  # the public verification page of sealed reports
)
# A status-only process (role `status`): the page, /metrics and the incident API
# (docs/status.md).
STATUS_FEATURES: tuple[Callable[[web.Application], None], ...] = (status.setup,)


def create_app(config: Config, dsn: str, worker: Worker | None = None) -> web.Application:
    """`worker`: this process is one of `opensense serve`'s OPENSENSE_WORKERS
    (opensense/workers.py); None: a single server process."""
    app = web.Application(middlewares=[error_middleware], client_max_size=MAX_BODY_BYTES)
    if worker is not None:
        workers.setup(app, worker)
    app[CONFIG] = config
    app[DSN] = dsn
    app[VERIFIER] = Verifier(workers=config.bcrypt_workers)
    app[HEALTH] = Health(config.clock)
    app[OBSERVER] = Observer()
    app.cleanup_ctx.extend([database_ctx, verifier_ctx, request_log_ctx])
    if config.role != "status":
        app.cleanup_ctx.extend([writer_ctx, auth_ctx])  # one batch writer for every door
        app[CHANNELS] = ChannelCache()  # HTTP ingest's copy of devices' channels
    app.router.add_get("/healthz", healthz)
    for setup in STATUS_FEATURES if config.role == "status" else FEATURES:
        setup(app)
    return app
