"""The app factory: `create_app(config)` only wires. Pools, writers and background
tasks live in cleanup_ctx so they start and stop with the app."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import psycopg
from aiohttp import web
from psycopg_pool import AsyncConnectionPool

from opensense_contract.payload import MAX_BODY_BYTES

from . import db, jobs
from .alarms.routes import routes as alarm_routes
from .alarms.tasks import alarms_ctx
from .api.keys import (
    CONFIG,
    DSN,
    HEALTH,
    MQTT,
    OBSERVER,
    POOL,
    REQUEST_LOG,
    STATUS,
    VERIFIER,
    WRITER,
)
from .api.middleware import error_middleware
from .api.requestlog import RequestLog
from .db import roles as db_roles
from .devices.routes import routes as device_routes
from .gateway import push as gateway_push
from .gateway.routes import routes as gateway_routes
from .ingest.routes import routes as ingest_routes
from .mqtt.emqx import EmqxApi
from .mqtt.emqx import routes as emqx_routes
from .mqtt.side import MqttSide, NoMqtt
from .openapi import routes as openapi_routes
from .settings import Config
from .status import mail as incident_mail
from .status.health import Health
from .status.monitor import StatusMonitor
from .status.observe import Observer
from .status.routes import routes as status_routes
from .storage.batcher import BatchWriter
from .storage.routes import routes as read_routes
from .tokens import Verifier, load_mac_key

log = logging.getLogger(__name__)


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


async def mqtt_ctx(app: web.Application) -> AsyncIterator[None]:
    """The MQTT side: the embedded broker, an external broker's consumer, or none.
    Every process also listens for token revocations to cut live sessions."""
    cfg = app[CONFIG]
    side: MqttSide
    if cfg.mqtt == "embedded":
        from .mqtt.embedded import EmbeddedBroker

        side = EmbeddedBroker(app)
    elif cfg.mqtt == "external":
        from .mqtt.external import ExternalBroker

        side = ExternalBroker(app)
    else:
        side = NoMqtt()
    app[MQTT] = side
    start = getattr(side, "start", None)
    if start is not None:
        await start()
    emqx = EmqxApi(cfg) if cfg.emqx_api_url else None
    listener = asyncio.create_task(_revocations(app[DSN], side, emqx))
    yield
    listener.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await listener
    if emqx is not None:
        await emqx.close()
    stop = getattr(side, "stop", None)
    if stop is not None:
        await stop()


async def _revocations(dsn: str, side: MqttSide, emqx: EmqxApi | None = None) -> None:
    """LISTEN opensense_token_revoked: any process's rotation reaches this broker (and
    EMQX's REST API, when configured: docs/mqtt.md)."""
    kicks: set[asyncio.Task[bool]] = set()
    while True:
        try:
            async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
                await conn.execute("LISTEN opensense_token_revoked")
                async for note in conn.notifies():
                    device_id = note.payload.split(" ", 1)[0]
                    try:
                        await side.token_revoked(device_id)
                    except Exception:
                        log.exception("closing the MQTT session of %s failed", device_id)
                    if emqx is not None:
                        # in the background: an unreachable EMQX must not hold the next note
                        task = asyncio.create_task(emqx.kick(device_id))
                        kicks.add(task)
                        task.add_done_callback(kicks.discard)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("token revocation listener lost its connection; reconnecting")
            await asyncio.sleep(1)


async def jobs_ctx(app: web.Application) -> AsyncIterator[None]:
    cfg = app[CONFIG]
    task = asyncio.create_task(jobs.scheduler(app[POOL], cfg)) if cfg.jobs_enabled else None
    yield
    if task:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def status_ctx(app: web.Application) -> AsyncIterator[None]:
    """The status monitor (snapshot, self-watching) and the incident mailer."""
    cfg = app[CONFIG]
    if cfg.incident_smtp_url:
        incident_mail.SmtpPath.parse(cfg.incident_smtp_url)  # a bad URL stops the start
    side = app.get(MQTT)
    if cfg.mqtt == "embedded" and side is not None:
        app[HEALTH].ok("mqtt", "embedded broker listening")
    monitor = StatusMonitor(
        cfg, app[POOL], app[OBSERVER], app[HEALTH], mqtt_connected=getattr(side, "connected", None)
    )
    app[STATUS] = monitor
    await monitor.tick()  # the first snapshot before the first request
    monitor.start()
    mailer = asyncio.create_task(incident_mail.run(app[POOL], cfg))
    yield
    mailer.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await mailer
    await monitor.stop()


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


def create_app(config: Config, dsn: str) -> web.Application:
    app = web.Application(middlewares=[error_middleware], client_max_size=MAX_BODY_BYTES)
    app[CONFIG] = config
    app[DSN] = dsn
    app[VERIFIER] = Verifier(workers=config.bcrypt_workers)
    app[HEALTH] = Health(config.clock)
    app[OBSERVER] = Observer()
    if config.role == "status":
        # a status-only process: the page, /metrics and the incident API (docs/status.md)
        app.cleanup_ctx.extend([database_ctx, verifier_ctx, request_log_ctx, status_ctx])
        app.router.add_get("/healthz", healthz)
        app.router.add_routes(status_routes)
        return app
    app.cleanup_ctx.extend(
        [
            database_ctx,
            verifier_ctx,
            request_log_ctx,
            writer_ctx,
            mqtt_ctx,
            jobs_ctx,
            alarms_ctx,
            status_ctx,
        ]
    )
    app.router.add_get("/healthz", healthz)
    for table in (
        ingest_routes,
        device_routes,
        read_routes,
        emqx_routes,
        openapi_routes,
        status_routes,
        alarm_routes,
    ):
        app.router.add_routes(table)
    app.router.add_routes(gateway_routes)
    gateway_push.setup(app)  # the gateways' sync long-poll (push)
    return app
