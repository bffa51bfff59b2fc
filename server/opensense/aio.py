"""asyncio helpers the server's background loops share: stopping a task, failing a
batch's waiting requests, and a PostgreSQL LISTEN that outlives lost connections."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import psycopg

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
                async for note in conn.notifies():
                    await on_note(note.payload)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s lost its connection; reconnecting", what)
            await asyncio.sleep(1)
