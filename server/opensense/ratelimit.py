"""Rate limits kept in the database, so every server process counts together.

Fixed windows: one counter row per (key, window start). With `hit` the increment and
the check are one statement; a door that cannot afford a statement per message (the
embedded MQTT broker) counts in the process with `LocalCounter`, which writes the same
counters for all keys in one statement a second. Old windows are swept by the
housekeeping job.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from .errors import ApiError
from .storage.write import from_us, to_us

log = logging.getLogger(__name__)

HIT_SQL = (
    "INSERT INTO rate_counters (key, window_start, count) VALUES (%s, %s, %s)"
    " ON CONFLICT (key, window_start) DO UPDATE SET count = rate_counters.count + excluded.count"
    " RETURNING count"
)


def window_start(now: datetime, window_s: int) -> datetime:
    us = to_us(now)
    w = window_s * 1_000_000
    return from_us(us - us % w)


async def hit(
    conn: AsyncConnection[Any],
    key: str,
    limit: int,
    window_s: int,
    now: datetime,
    what: str,
    cost: int = 1,
) -> None:
    """Count `cost` units (a request, or one per channel of a multi-channel read) against
    `key`; raise 429 with Retry-After past `limit`."""
    if window_s <= 0:  # a zero interval switches the limit off
        return
    start = window_start(now, window_s)
    cur = await conn.execute(HIT_SQL, (key, start, cost))
    row = await cur.fetchone()
    assert row is not None
    if row[0] > limit:
        raise limited(limit, window_s, start, now, what)


def limited(limit: int, window_s: int, start: datetime, now: datetime, what: str) -> ApiError:
    """The 429 for a counter that went past `limit` in the window starting at `start`:
    Retry-After both as the header and in the envelope (`retry_after`, seconds)."""
    retry = max(1, math.ceil((start + timedelta(seconds=window_s) - now).total_seconds()))
    return ApiError(
        "rate_limited",
        f"{what} is limited to {limit} per {window_s} s; retry after {retry} s",
        headers={"Retry-After": str(retry)},
        extra={"retry_after": retry},
    )


# --- counted in the process, flushed in batches ----------------------------------------

FLUSH_S = 1.0  # how often a LocalCounter's increments reach rate_counters

FLUSH_SQL = (
    "INSERT INTO rate_counters (key, window_start, count)"
    " SELECT k, w, n FROM unnest(%s::text[], %s::timestamptz[], %s::integer[]) AS u(k, w, n)"
    " ORDER BY k, w"  # one order for every flusher: concurrent flushes cannot deadlock
    " ON CONFLICT (key, window_start) DO UPDATE SET count = rate_counters.count + excluded.count"
    " RETURNING key, window_start, count"
)


class _Count:
    __slots__ = ("end", "flushed", "inflight", "pending")

    def __init__(self, end: datetime) -> None:
        self.end = end  # the window's end
        self.flushed = 0  # the database's total (every door, every process) at the last flush
        self.inflight = 0  # sent in the flush under way
        self.pending = 0  # counted here since


class LocalCounter:
    """`hit` without a round trip: the same counters (`rate_counters`, same keys and
    windows) as `hit`, but counted in this process and written for all keys in one
    statement every FLUSH_S (`run`), which adds the increments and returns each key's
    total, so the count a key is checked against includes what other doors and
    processes added up to the last flush: (that total) + (counted here since).

    How exact: what this process counts, it counts exactly (a flood through this
    process is refused at limit + 1, as with `hit`). What other doors or processes
    count reaches this one at its next flush, and what this one counts reaches them
    then; so a key may get past its limit by what arrives elsewhere (or here) within
    one flush interval after the allowance ran out, at most one window's limit. It
    never refuses wrongly: a total only grows within its window, so the count it
    checks never exceeds the true one. A refusal flushes at once, so the other doors
    see a refused key's count without waiting. A process that dies loses its
    unflushed increments (at most FLUSH_S of counting: a counter, never a reading).
    """

    def __init__(
        self, pool: AsyncConnectionPool, clock: Callable[[], datetime], flush_s: float = FLUSH_S
    ) -> None:
        self.pool = pool
        self.clock = clock
        self.flush_s = flush_s
        self._counts: dict[tuple[str, datetime], _Count] = {}
        self._dirty: set[tuple[str, datetime]] = set()
        self._lock = asyncio.Lock()
        self.flushes = 0  # statements sent, for tests and benches

    def hit(
        self, key: str, limit: int, window_s: int, now: datetime, what: str, cost: int = 1
    ) -> None:
        """Count `cost` units against `key`; raise the 429 of `limited` past `limit`
        (the caller then calls `flush`, so other doors see it at once)."""
        if window_s <= 0:  # a zero interval switches the limit off
            return
        start = window_start(now, window_s)
        k = (key, start)
        c = self._counts.get(k)
        if c is None:
            c = self._counts[k] = _Count(start + timedelta(seconds=window_s))
        c.pending += cost
        self._dirty.add(k)
        if c.flushed + c.inflight + c.pending > limit:
            raise limited(limit, window_s, start, now, what)

    async def flush(self) -> None:
        """Write every increment counted since the last flush in one statement and
        learn the totals. On failure the increments are kept for the next flush."""
        async with self._lock:
            dirty, self._dirty = self._dirty, set()
            if dirty:
                ordered = sorted(dirty)
                for k in ordered:
                    c = self._counts[k]
                    c.inflight, c.pending = c.pending, 0
                try:
                    async with self.pool.connection() as conn:
                        cur = await conn.execute(
                            FLUSH_SQL,
                            (
                                [k for k, _ in ordered],
                                [w for _, w in ordered],
                                [self._counts[k].inflight for k in ordered],
                            ),
                        )
                        totals = await cur.fetchall()
                except BaseException:
                    # most likely not written (the database is unreachable): counted
                    # again with the next flush; at worst a key is counted twice
                    for k in ordered:
                        c = self._counts[k]
                        c.pending += c.inflight
                        c.inflight = 0
                    self._dirty |= set(ordered)
                    raise
                self.flushes += 1
                for key, start, total in totals:
                    c = self._counts[(key, start)]
                    c.flushed = max(c.flushed, total)
                    c.inflight = 0
            now = self.clock()
            for k, c in list(self._counts.items()):
                if c.end <= now and k not in self._dirty:
                    del self._counts[k]  # a window that is over is checked by nobody

    async def run(self) -> None:
        """Flush every `flush_s` until cancelled (a failed flush is logged and tried
        again at the next one)."""
        while True:
            await asyncio.sleep(self.flush_s)
            try:
                await self.flush()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("rate counters not written yet (%s); trying again", exc)
