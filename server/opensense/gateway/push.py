"""Sync pushed to the gateway (issue 11, item 19): a device token rotated or revoked
on the server must stop working at the site broker at once, not at the gateway's
next periodic sync.

The gateway holds `GET /v1/gateway/sync?wait=…&version=…` open (a long-poll: plain
HTTPS, through any proxy or NAT, no inbound port at the site). Triggers (migration
0010) NOTIFY `opensense_gateway_sync` with the site id whenever a site's sync
document may change (a device token made, rotated or revoked; a device moved,
renamed or deleted; a rule changed), in whichever server process made the change;
every process LISTENs and wakes the long-polls of that site, which answer with the
new document. A lost listener connection wakes every long-poll once it is back (a
notification may have been missed meanwhile), and each long-poll ends after `wait`
seconds anyway, so nothing is ever stale for longer than that.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from .. import aio
from ..api.keys import DSN

log = logging.getLogger(__name__)

CHANNEL = "opensense_gateway_sync"


class SyncWatch:
    """Long-polls waiting for a change of their site, per site."""

    def __init__(self) -> None:
        self.waiters: dict[str, set[asyncio.Event]] = {}
        self.closing = False  # the server stops: long-polls answer at once

    def watch(self, site_id: str) -> asyncio.Event:
        ev = asyncio.Event()
        self.waiters.setdefault(site_id, set()).add(ev)
        return ev

    def forget(self, site_id: str, ev: asyncio.Event) -> None:
        got = self.waiters.get(site_id)
        if got is not None:
            got.discard(ev)
            if not got:
                del self.waiters[site_id]

    def wake(self, site_id: str | None) -> None:
        """Wake the long-polls of one site (None: of every site)."""
        groups = self.waiters.values() if site_id is None else [self.waiters.get(site_id, set())]
        for group in groups:
            for ev in group:
                ev.set()

    async def listen(self, dsn: str) -> None:
        async def wake(site_id: str | None) -> None:
            self.wake(site_id)  # None (listening again): whatever changed meanwhile

        await aio.listen(dsn, CHANNEL, wake, "gateway sync listener")


SYNC_WATCH = web.AppKey("gateway_sync_watch", SyncWatch)


def setup(app: web.Application) -> None:
    """Wire the push into an app: the watch, its listener task, and its part in the
    stop (before aiohttp waits for open requests, so a held long-poll never holds
    the stop up)."""
    watch = SyncWatch()
    app[SYNC_WATCH] = watch

    async def listener(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(watch.listen(app[DSN]))
        yield
        await aio.cancel(task)

    async def closing(_app: web.Application) -> None:
        watch.closing = True
        watch.wake(None)

    app.cleanup_ctx.append(listener)
    app.on_shutdown.append(closing)
