"""Rate limits kept in the database, so every server process counts together.

Fixed windows: one counter row per (key, window start). The increment and the check
are one statement. Old windows are swept by the housekeeping job.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta
from typing import Any

from psycopg import AsyncConnection

from .errors import ApiError
from .storage.write import from_us, to_us

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
