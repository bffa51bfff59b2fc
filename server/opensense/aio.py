"""asyncio helpers the server's background loops share: stopping a task, failing a
batch's waiting requests, and a PostgreSQL LISTEN that outlives lost connections."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol, TypeVar

import psycopg

from .db import connection_trouble

log = logging.getLogger(__name__)


async def cancel(*tasks: asyncio.Task[Any] | None) -> None:
    """Stop background tasks: cancel them all, then wait until each has ended (so
    that nothing of theirs still runs when the caller goes on to close what they
    use). Their CancelledError is how they end, not an error; None is skipped."""
    running = [t for t in tasks if t is not None]
    for t in running:
        t.cancel()
    for t in running:
        with contextlib.suppress(asyncio.CancelledError):
            await t


def fail(futures: Iterable[asyncio.Future[Any]], exc: BaseException) -> None:
    """Answer every future not answered yet with `exc`: the requests of a batch
    (storage/batcher.py, ingest/authbatch.py) that failed together or were cut off."""
    for fut in futures:
        if not fut.done():
            fut.set_exception(exc)


def fail_queued(queue: asyncio.Queue[Any], exc: BaseException) -> None:
    """Fail the requests left in a stopped batching writer's queue (items with a
    `done` future): nobody will answer them now."""
    while not queue.empty():
        fail([queue.get_nowait().done], exc)


class Waiting(Protocol):
    """A request queued in a batching writer: answered through its future."""

    @property
    def done(self) -> asyncio.Future[Any]: ...


W = TypeVar("W", bound=Waiting)


async def run_batch(
    batch: list[W],
    run: Callable[[list[W]], Awaitable[None]],
    what: str,
    lone: Callable[[Exception], BaseException] = lambda exc: exc,
) -> None:
    """Run one batch of a batching writer (storage/batcher.py, ingest/authbatch.py):
    `run` answers each request's future. If it fails:
    - cancelled (the server stopping): every request fails, and the cancel goes on;
    - the database or the way to it failed (`db.connection_trouble`): every request
      fails at once with that error, rather than each waiting for the pool's timeout
      in turn (answered 503 by the error translator);
    - anything else (a request the database refuses): each request is run alone, so
      one request's trouble fails that request alone; a batch of one fails with
      `lone(exc)`."""
    try:
        await run(batch)
    except asyncio.CancelledError:
        fail((b.done for b in batch), RuntimeError("server stopping"))
        raise
    except Exception as exc:
        if connection_trouble(exc):
            log.warning("%s: a batch of %d request(s) failed: %s", what, len(batch), exc)
            fail((b.done for b in batch), exc)
        elif len(batch) == 1:
            log.exception("%s failed", what)
            fail([batch[0].done], lone(exc))
        else:
            for one in batch:  # one request's trouble must not fail the others
                try:
                    await run([one])
                except Exception as alone:
                    log.exception("%s failed for one request", what)
                    fail([one.done], alone)


async def listen(
    dsn: str, channel: str, on_note: Callable[[str | None], Awaitable[None]], what: str
) -> None:
    """LISTEN on `channel` for ever (a task; cancel it to stop): `on_note(payload)`
    for each NOTIFY, and `on_note(None)` each time listening starts again, since a
    notification sent while no connection listened is lost. A lost connection (or a
    failing `on_note`) is logged as `what`'s and the connection opened again a
    second later."""
    while True:
        try:
            async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
                await conn.execute(f"LISTEN {channel}")
                await on_note(None)
                await _notes(conn, on_note)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s lost its connection; reconnecting", what)
            await asyncio.sleep(1)


async def _notes(
    conn: psycopg.AsyncConnection[Any], on_note: Callable[[str | None], Awaitable[None]]
) -> None:
    """`on_note(payload)` for each notification on `conn`, which runs nothing else
    after its LISTEN; returns never, raises when the connection is lost.

    Read from libpq directly (`conn.pgconn`, psycopg's public wrapper: its socket
    watched by the loop, then `consume_input` and `notifies`), not through psycopg's
    `notifies()`, which makes each notification a `Notify` twice (in its generator, and
    in the connection's own handler, which drops it), yields them one at a time and
    watches and unwatches the socket for every packet: 1.9 against 0.8 µs of CPU a
    notification (tools/bench/listen). The live updates' listener gets one for each
    channel a statement changes (web/live.py; migration 0026): ~3 a fleet node's
    message, now that the batch writer settles calm readings."""
    pgconn = conn.pgconn
    codec = conn.info.encoding
    loop = asyncio.get_running_loop()
    got: list[str] = []
    lost: list[Exception] = []
    ready = asyncio.Event()

    def readable() -> None:
        try:
            pgconn.consume_input()
            while (n := pgconn.notifies()) is not None:
                got.append(n.extra.decode(codec))
        except Exception as exc:  # the connection is gone (or its input is garbage)
            lost.append(exc)
            loop.remove_reader(fd)  # (a closed socket stays readable)
        if got or lost:
            ready.set()

    fd = pgconn.socket
    loop.add_reader(fd, readable)
    try:
        readable()  # what came with the LISTEN's answer
        while True:
            await ready.wait()
            ready.clear()
            if lost:
                raise lost[0]
            batch = got[:]
            got.clear()
            for payload in batch:
                await on_note(payload)
    finally:
        loop.remove_reader(fd)
