"""The status side's app context (the status feature's setup puts it in cleanup_ctx)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from aiohttp import web

from .. import aio
from ..api.keys import CONFIG, HEALTH, MQTT, OBSERVER, POOL, STATUS
from ..workers import is_leader
from . import mail as incident_mail
from .monitor import StatusMonitor


async def status_ctx(app: web.Application) -> AsyncIterator[None]:
    """The status monitor (snapshot, self-watching) and the incident mailer."""
    cfg = app[CONFIG]
    if cfg.incident_smtp_url:
        incident_mail.SmtpPath.parse(cfg.incident_smtp_url)  # a bad URL stops the start
    side = app.get(MQTT)
    if cfg.mqtt == "embedded" and side is not None and is_leader(app):  # its broker
        app[HEALTH].ok("mqtt", "embedded broker listening")
    monitor = StatusMonitor(
        cfg, app[POOL], app[OBSERVER], app[HEALTH], mqtt_connected=getattr(side, "connected", None)
    )
    app[STATUS] = monitor
    await monitor.tick()  # the first snapshot before the first request
    monitor.start()
    mailer = asyncio.create_task(incident_mail.run(app[POOL], cfg))
    yield
    await aio.cancel(mailer)
    await monitor.stop()
