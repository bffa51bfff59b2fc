"""`aio.listen`: a PostgreSQL LISTEN that outlives lost connections (the live updates,
token revocations, channel changes, the gateway's and the MQTT relay's wake-ups).

- `on_note(None)` when listening starts, then every payload in commit order, many to a
  transaction (a batch of readings settles dozens of channels at once);
- a lost connection (its backend terminated) is opened again: `on_note(None)` once
  more, and the notifications after it arrive;
- a failing `on_note` is logged and listening starts again;
- cancelling the task ends it and closes its connection.
"""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest

from opensense import aio

CHANNEL = "opensense_test_listen"


class Notes:
    def __init__(self) -> None:
        self.got: list[str | None] = []
        self.changed = asyncio.Event()
        self.fail_on: str | None = None

    async def __call__(self, payload: str | None) -> None:
        if payload is not None and payload == self.fail_on:
            self.fail_on = None
            raise RuntimeError("on_note failed")
        self.got.append(payload)
        self.changed.set()

    async def until(self, pred: Any) -> None:
        async with asyncio.timeout(10):
            while not pred(self.got):
                self.changed.clear()
                await self.changed.wait()


async def _send(dsn: str, *groups: list[str]) -> None:
    """Each group in one transaction."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for g in groups:
            async with conn.transaction():
                for p in g:
                    await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, p))


async def _listeners(dsn: str) -> list[int]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE query = %s", (f"LISTEN {CHANNEL}",)
        )
        return [int(pid) for (pid,) in await cur.fetchall()]


async def _listener_pid(dsn: str) -> int:
    for _ in range(500):
        if pids := await _listeners(dsn):
            (pid,) = pids
            return pid
        await asyncio.sleep(0.02)
    raise AssertionError("nobody listens")


async def _terminate(dsn: str, pid: int) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("SELECT pg_terminate_backend(%s)", (pid,))


@pytest.mark.db
async def test_every_notification_in_order_and_listening_again_after_a_lost_connection(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    notes = Notes()
    task = asyncio.create_task(aio.listen(dsn, CHANNEL, notes, "test listener"))
    try:
        await notes.until(lambda got: got == [None])
        first = [f"acc_1 ch_{i}" for i in range(500)]
        second = ["acc_2 ch_a", "acc_2 ch_b é"]  # (not ASCII: decoded as the connection's)
        await _send(dsn, first, second)
        await notes.until(lambda got: len(got) == 1 + len(first) + len(second))
        assert notes.got == [None, *first, *second]

        pid = await _listener_pid(dsn)
        await _terminate(dsn, pid)
        await notes.until(lambda got: got.count(None) == 2)  # listening again
        assert await _listener_pid(dsn) != pid
        await _send(dsn, ["acc_3 ch_c"])
        await notes.until(lambda got: got[-1] == "acc_3 ch_c")
        assert "test listener lost its connection" in caplog.text

        notes.fail_on = "acc_4 boom"
        await _send(dsn, ["acc_4 boom"])
        await notes.until(lambda got: got.count(None) == 3)  # logged, listening again
        await _send(dsn, ["acc_4 after"])
        await notes.until(lambda got: got[-1] == "acc_4 after")
    finally:
        await aio.cancel(task)
    for _ in range(500):  # the listener's connection was closed
        if not await _listeners(dsn):
            break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError("the listener's connection is still open")
