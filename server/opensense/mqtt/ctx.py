"""The MQTT side's app context (the mqtt feature's setup puts it in cleanup_ctx)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from .. import aio
from ..api.keys import CONFIG, DSN, MQTT, POOL
from ..workers import WORKER, LeaderRelay, is_leader
from .emqx import EmqxApi
from .side import MqttSide, NoMqtt

log = logging.getLogger(__name__)

CHANNELS_CHANGED = "opensense_channels_changed"


async def mqtt_ctx(app: web.Application) -> AsyncIterator[None]:
    """The MQTT side: the embedded broker, an external broker's consumer, or none.
    Every process also listens for token revocations to cut live sessions."""
    cfg = app[CONFIG]
    side: MqttSide
    if cfg.mqtt == "embedded" and not is_leader(app):
        # one of several workers: the broker (and its port) is the leader's
        side = LeaderRelay(app[POOL])
    elif cfg.mqtt == "embedded":
        from .embedded import EmbeddedBroker

        side = EmbeddedBroker(app)
    elif cfg.mqtt == "external":
        from .external import BrokerUrl, ExternalBroker, default_client_id

        client_id = None
        worker = app.get(WORKER)
        if worker is not None and BrokerUrl.parse(cfg.mqtt_url).consumer == "shared":
            # one session per worker: the workers share the HTTP port the default uses
            base = default_client_id(BrokerUrl.parse(cfg.mqtt_url), cfg.port)
            client_id = f"{base}-w{worker.index}"
        side = ExternalBroker(app, client_id=client_id)
    else:
        side = NoMqtt()
    app[MQTT] = side
    start = getattr(side, "start", None)
    if start is not None:
        await start()
    emqx = EmqxApi(cfg) if cfg.emqx_api_url else None
    listener = asyncio.create_task(_revocations(app[DSN], side, emqx))
    changes = asyncio.create_task(_channel_changes(app[DSN], side))
    yield
    await aio.cancel(listener, changes)
    if emqx is not None:
        await emqx.close()
    stop = getattr(side, "stop", None)
    if stop is not None:
        await stop()


async def _revocations(dsn: str, side: MqttSide, emqx: EmqxApi | None = None) -> None:
    """LISTEN opensense_token_revoked: any process's rotation reaches this broker (and
    EMQX's REST API, when configured: docs/mqtt.md)."""
    kicks: set[asyncio.Task[bool]] = set()

    async def revoked(payload: str | None) -> None:
        if payload is None:  # listening (again): no revocation in that
            return
        device_id = payload.split(" ", 1)[0]
        try:
            await side.token_revoked(device_id)
        except Exception:
            log.exception("closing the MQTT session of %s failed", device_id)
        if emqx is not None:
            # in the background: an unreachable EMQX must not hold the next note
            task = asyncio.create_task(emqx.kick(device_id))
            kicks.add(task)
            task.add_done_callback(kicks.discard)

    await aio.listen(dsn, "opensense_token_revoked", revoked, "token revocation listener")


async def _channel_changes(dsn: str, side: MqttSide) -> None:
    """LISTEN opensense_channels_changed (devices/store.py `patch_channel`, with the
    device id): a calibration offset changed in any process reaches this process's
    broker side, which reads the device's channels again. On (re)listening, every
    device's, since a change sent while nobody listened is lost."""

    async def changed(payload: str | None) -> None:
        try:
            await side.channels_changed(payload or None)
        except Exception:
            log.exception("refreshing the MQTT side's channels of %s failed", payload)

    await aio.listen(dsn, CHANNELS_CHANGED, changed, "channel change listener")
