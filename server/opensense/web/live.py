"""Live updates of the overview by Server-Sent Events (docs/dashboard.md, "Live
updates").

`GET /live` streams the signed-in user's account only. What feeds it: the database
NOTIFYs `opensense_live` "<account> <channel or device id>" at the commit of each
change the overview shows (migration 0023: the rule engine's alarm_state, events,
device_alarm_state). One LISTEN connection per process (`aio.listen`) feeds the hub;
the hub reads the changed account's board once (one query, however many of that
account's streams are open; at most `READERS` such reads at once, so a pass of the
rule engine touching many accounts leaves the pool to requests) and hands the
changed cards to each of its streams.

Bounds: `PER_USER` streams per user (a further one ends the user's oldest: a tab
left open elsewhere), `TOTAL` per process (past it 503), `QUEUE` messages waiting
per stream (a stream that cannot keep up is ended; the browser reconnects and starts
from a fresh snapshot). A comment line every `heartbeat_s` keeps proxies from
cutting an idle stream, and every `check_s` one query checks the sessions of all
open streams: a stream whose session ended (signed out, signed out everywhere, idle)
is closed."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from psycopg_pool import AsyncConnectionPool

from .. import aio
from ..api.keys import CONFIG, DSN, POOL
from ..errors import ApiError
from . import store
from .board import Device, board
from .routes import SESSION_COOKIE
from .session import signed_in
from .store import User

log = logging.getLogger(__name__)

routes = web.RouteTableDef()

CHANNEL = "opensense_live"
PER_USER = 4
TOTAL = 1000
QUEUE = 64
HEARTBEAT_S = 15.0
CHECK_S = 5.0
EVERYTHING = "*"  # a pending id meaning "the whole board" (listening again)
READERS = 2  # board reads at once for the streams: the pool stays free for requests


@dataclass(eq=False)
class Stream:
    user: User
    sid_hash: bytes
    queue: asyncio.Queue[bytes | None] = field(default_factory=lambda: asyncio.Queue(QUEUE))
    closed: bool = False

    def send(self, data: bytes | None) -> None:
        """Queue a message (None: the end); a stream whose queue is full is ended."""
        if self.closed:
            return
        if data is None or self.queue.full():
            self.closed = True
            while not self.queue.empty():  # the end is all the reader needs now
                self.queue.get_nowait()
            self.queue.put_nowait(None)
            return
        self.queue.put_nowait(data)


def event(name: str, data: Any) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def board_message(devices: list[Device], ids: set[str] | None) -> bytes | None:
    """The `board` event: the devices and cards among `ids` (None: all); None when
    none of them is on the board."""
    devs, cards = [], []
    for d in devices:
        # the device itself (offline, online) or one of its health channels
        dev_changed = ids is None or d.id in ids or not d.health_ids.isdisjoint(ids)
        if dev_changed:
            devs.append(d.json())
        for c in d.cards:
            if dev_changed or c.channel_id in (ids or ()):
                cards.append(c.json())
    if ids is not None and not cards and not devs:
        return None
    return event("board", {"devices": devs, "cards": cards})


class Hub:
    """The process's open streams by account, fed from one LISTEN connection."""

    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        clock: Any,
        per_user: int = PER_USER,
        total: int = TOTAL,
        heartbeat_s: float = HEARTBEAT_S,
        check_s: float = CHECK_S,
    ) -> None:
        self.pool, self.clock = pool, clock
        self.per_user, self.total = per_user, total
        self.heartbeat_s, self.check_s = heartbeat_s, check_s
        self.streams: dict[str, list[Stream]] = {}  # account -> its streams, oldest first
        self.pending: dict[str, set[str]] = {}  # account -> changed ids not sent yet
        self.flushing: dict[str, asyncio.Task[None]] = {}
        self.listening = asyncio.Event()
        self.readers = asyncio.Semaphore(READERS)

    def count(self) -> int:
        return sum(len(s) for s in self.streams.values())

    def open(self, user: User, sid_hash: bytes) -> Stream:
        if self.count() >= self.total:
            raise ApiError("unavailable", "too many live streams on this server; reload later")
        mine = [s for s in self.streams.get(user.account_id, []) if s.user.id == user.id]
        for old in mine[: max(0, len(mine) - self.per_user + 1)]:
            self.close(old)
        s = Stream(user, sid_hash)
        self.streams.setdefault(user.account_id, []).append(s)
        return s

    def close(self, s: Stream) -> None:
        s.send(None)
        acc = self.streams.get(s.user.account_id, [])
        if s in acc:
            acc.remove(s)
        if not acc:
            self.streams.pop(s.user.account_id, None)

    async def on_note(self, payload: str | None) -> None:
        if payload is None:  # listening (again): whatever changed meanwhile
            self.listening.set()
            for acc in list(self.streams):
                self.changed(acc, EVERYTHING)
            return
        # "<account> <id>", or several ids: "<account> <id> <id> …" (ids hold no
        # space). Read since issue 14's stop 37 so that a later release's trigger may
        # send one notification a statement and account instead of one a channel
        # (docs/dashboard.md, "What feeds it": the release before must read them)
        acc, _, idents = payload.partition(" ")
        if acc in self.streams:
            for ident in idents.split(" "):
                if ident:
                    self.changed(acc, ident)

    def changed(self, acc: str, ident: str) -> None:
        self.pending.setdefault(acc, set()).add(ident)
        if acc not in self.flushing:
            self.flushing[acc] = asyncio.create_task(self.flush(acc))

    async def flush(self, acc: str) -> None:
        """Read the account's board once per batch of changes and send each stream
        the changed cards. Changes arriving meanwhile make the next batch."""
        try:
            while ids := self.pending.pop(acc, set()):
                if acc not in self.streams:
                    continue
                async with self.readers, self.pool.connection() as conn:
                    devices = await board(conn, acc, self.clock())
                msg = board_message(devices, None if EVERYTHING in ids else ids)
                if msg is not None:
                    for s in list(self.streams.get(acc, [])):
                        s.send(msg)
                        if s.closed:
                            self.close(s)
        except Exception:
            log.exception("live: reading the board of %s failed", acc)
        finally:
            self.flushing.pop(acc, None)

    async def check_sessions(self) -> None:
        """Close every stream whose session has ended (one query for all)."""
        while True:
            await asyncio.sleep(self.check_s)
            everyone = [s for ss in self.streams.values() for s in ss]
            if not everyone:
                continue
            try:
                async with self.pool.connection() as conn:
                    cur = await conn.execute(
                        "SELECT id_hash FROM sessions WHERE id_hash = ANY(%s) AND last_seen_at > %s",
                        (list({s.sid_hash for s in everyone}), self.clock() - store.SESSION_IDLE),
                    )
                    live = {bytes(h) for (h,) in await cur.fetchall()}
            except Exception:
                log.exception("live: checking the streams' sessions failed")
                continue
            for s in everyone:
                if s.sid_hash not in live:
                    self.close(s)

    def close_all(self) -> None:
        for ss in list(self.streams.values()):
            for s in list(ss):
                self.close(s)


HUB = web.AppKey("live_hub", Hub)


async def live_ctx(app: web.Application) -> AsyncIterator[None]:
    """The hub, its LISTEN connection and its session check (web/__init__.py)."""
    hub = Hub(app[POOL], app[CONFIG].clock, PER_USER, TOTAL, HEARTBEAT_S, CHECK_S)
    app[HUB] = hub
    tasks = [
        asyncio.create_task(aio.listen(app[DSN], CHANNEL, hub.on_note, "live updates listener")),
        asyncio.create_task(hub.check_sessions()),
    ]
    yield
    hub.close_all()
    await aio.cancel(*tasks, *hub.flushing.values())


async def end_streams(app: web.Application) -> None:
    """At shutdown (app.on_shutdown), before the server waits for open requests: an
    open stream would otherwise hold it until its next heartbeat."""
    if HUB in app:
        app[HUB].close_all()


@routes.get("/live")
async def live(request: web.Request) -> web.StreamResponse:
    """The event stream: a `board` event with every card first, then one with the
    changed cards after each change; `: hb` comments in between."""
    hub = request.app[HUB]
    async with request.app[POOL].connection() as conn:
        user = await signed_in(request, conn)
        # registered before the snapshot is read: a change meanwhile is sent after it
        stream = hub.open(user, store.digest(request.cookies[SESSION_COOKIE]))
        try:
            devices = await board(conn, user.account_id, request.app[CONFIG].clock())
        except BaseException:
            hub.close(stream)
            raise
    resp = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "X-Accel-Buffering": "no"}
    )
    try:
        await resp.prepare(request)
        snapshot = board_message(devices, None)
        assert snapshot is not None
        await resp.write(b"retry: 3000\n\n" + snapshot)
        while True:
            try:
                msg = await asyncio.wait_for(stream.queue.get(), hub.heartbeat_s)
            except TimeoutError:
                msg = b": hb\n\n"
            if msg is None:
                break
            await resp.write(msg)
    except (ConnectionResetError, ConnectionError):
        pass  # the browser went away
    finally:
        hub.close(stream)
    return resp


# --- the dashboard's scripts (CSP script-src 'self': files, never inline) -----------

STATIC = Path(__file__).parent / "static"
ASSETS = {
    "/static/live.js": ("live.js", "text/javascript"),
    "/static/channel.js": ("channel.js", "text/javascript"),
    "/static/vendor/uplot/uPlot.iife.min.js": ("vendor/uplot/uPlot.iife.min.js", "text/javascript"),
    "/static/vendor/uplot/uPlot.min.css": ("vendor/uplot/uPlot.min.css", "text/css"),
    "/static/vendor/uplot/LICENSE": ("vendor/uplot/LICENSE", "text/plain"),
}


def _asset(path: str, name: str, ctype: str) -> None:
    body = (STATIC / name).read_bytes()

    async def handler(request: web.Request) -> web.Response:
        return web.Response(
            body=body,
            content_type=ctype,
            charset="utf-8",
            headers={"Cache-Control": "public, max-age=3600"},
        )

    routes.get(path)(handler)


for _path, (_name, _ctype) in ASSETS.items():
    _asset(_path, _name, _ctype)
