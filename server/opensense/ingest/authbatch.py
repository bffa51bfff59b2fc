"""HTTP ingest's authentication statement, shared by concurrent requests.

Every HTTP ingest request reads its token's row (a rotated token fails at once, in
every process), its device and site, the sum of the device's channel revisions
(migration 0027) and the channels themselves only when that sum is not the one this
process holds them at (`ChannelCache`, ingest/pipeline.py), and counts its device's
rate limit in the database (exact across processes; counted only for a live token of
a live device, and the secret is checked right after, so a caller needs the token's
public key id to spend a device's allowance).

One statement per request cost more than the rest of a 1-reading request: its
executor start-up alone (the plan's nested loops, the channels' subquery, the locks
of every table it names) took ~55 µs of PostgreSQL's CPU, the whole statement ~190 µs
with its round trip, and the server ~90 µs more in psycopg (docs/ingest-cost.md). As
the batch writer does for the readings (storage/batcher.py), requests arriving while
a statement runs queue up and share the next one: under load one statement carries
many requests; alone, a request waits for nothing (no linger).

Each request is answered as if alone:
- its own row, read in the statement's snapshot, which began after the request
  arrived (so a token rotated before the request was sent is refused, as before);
- its own rate count: the device's counter gains the batch's requests of that device
  (and minute) in one upsert, and each request gets the count it would have got one
  by one, in arrival order (the counter before the batch + its place among them);
- its own channels when their revision is not the one this process holds.
A batch whose statement fails is retried request by request, so one request's
trouble (a key id the database refuses) fails that request alone; unless the database
itself is away (`db.connection_trouble`): then the whole batch fails at once (503),
rather than each request waiting for the pool's timeout in turn.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from psycopg_pool import AsyncConnectionPool

from .. import aio
from ..db import arrays
from .pipeline import AuthRow

log = logging.getLogger(__name__)

# (key id, held revision, rate window) a request, numbered in arrival order; `counted`:
# a live token of a live device. The counters are upserted in key order (two batches
# lock shared counters in the same order). The arrays are each behind a scalar
# subquery so that the planner cannot see their length: with it, a batch of a few
# requests made a custom plan cheaper than the generic one, and PostgreSQL planned
# the statement anew at every execution (45 % of its time at HTTP 32, measured with
# pg_stat_statements.track_planning); without it, both estimate alike and the
# prepared statement's generic plan is kept.
AUTH_BATCH_SQL = """
WITH q AS (
  SELECT * FROM unnest((SELECT %(key_ids)b::text[]), (SELECT %(revs)b::int8[]),
                       (SELECT %(windows)b::timestamptz[]))
    WITH ORDINALITY AS q(key_id, held, win, ord)
), t AS (
  SELECT q.ord, q.win, t.id, t.kind, t.account_id, t.device_id, t.hash, t.revoked_at,
         d.local_id, d.deleted_at, s.vertical, t.fast_check, d.model, r.rev,
         CASE WHEN r.rev IS DISTINCT FROM q.held THEN
           (SELECT coalesce(jsonb_agg(jsonb_build_array(c.kind, c.label, c.id, c.num, c.unit,
                                                        c."offset")), '[]'::jsonb)
            FROM channels c WHERE c.device_id = t.device_id)
         END AS channels,
         (t.kind = 'ds_live' AND t.revoked_at IS NULL AND d.deleted_at IS NULL) AS counted
  FROM q JOIN tokens t ON t.key_id = q.key_id
    LEFT JOIN devices d ON d.id = t.device_id LEFT JOIN sites s ON s.id = d.site_id
    LEFT JOIN LATERAL (SELECT coalesce(sum(c.rev), 0)::bigint AS rev FROM channels c
                       WHERE c.device_id = t.device_id) r ON true
), n AS (
  SELECT 'ingest:' || device_id AS key, win, count(*) AS n FROM t WHERE counted
  GROUP BY device_id, win
), rl AS (
  INSERT INTO rate_counters AS c (key, window_start, count)
  SELECT key, win, n FROM n ORDER BY key, win
  ON CONFLICT (key, window_start) DO UPDATE SET count = c.count + excluded.count
  RETURNING key, window_start, count
)
SELECT t.ord, t.id, t.kind, t.account_id, t.device_id, t.hash, t.revoked_at, t.local_id,
       t.deleted_at, t.vertical, t.fast_check, t.model, t.rev, t.channels,
       CASE WHEN t.counted THEN
         rl.count - n.n + row_number() OVER (PARTITION BY t.counted, t.device_id, t.win
                                             ORDER BY t.ord)
       END AS rate_count
FROM t
  LEFT JOIN n ON t.counted AND n.key = 'ingest:' || t.device_id AND n.win = t.win
  LEFT JOIN rl ON rl.key = n.key AND rl.window_start = n.win
-- the counters' commit does not wait for its WAL to reach the disk (this statement's
-- own transaction only; the readings' statements keep synchronous commit): visible to
-- every process at once, and a database crash may forget the last fraction of a
-- second of counts (docs/mqtt.md, "How it is counted")
WHERE set_config('synchronous_commit', 'off', true) IS NOT NULL
"""


# The statement runs on connections of its own (`auth_pool`), which take its prepared
# statement's generic plan, always. Its plan cannot depend on the parameters (the arrays
# are behind scalar subqueries, above), but PostgreSQL weighs the generic plan's cost
# against the average of every custom plan it made since the statement was prepared:
# once autovacuum's ANALYZE of tokens, devices, channels or rate_counters had raised
# the estimates, the generic plan cost more than that average (of plans made against
# the tables before) and every execution was planned anew, for good
# (pg_stat_statements, embedded PostgreSQL 18, tools/bench/ingest: from the tables'
# first autoanalyze on, ~100 % of calls planned, half of the statement's time). Set
# for the connection rather than by SET LOCAL around each statement, which is three
# statements more a batch: HTTP 1 a request, a few requests a batch, would pay them.
POOL_OPTIONS = "-c timezone=UTC -c plan_cache_mode=force_generic_plan"
RUNNERS = 2  # statements in flight at once: one gathers the next batch while one runs


def auth_pool(dsn: str, runners: int = RUNNERS) -> AsyncConnectionPool:
    """The statement's connections (one a runner, all kept open: serving.py counts
    them; autocommit), not yet open."""
    return AsyncConnectionPool(
        dsn,
        min_size=runners,
        max_size=runners,
        kwargs={"autocommit": True, "options": POOL_OPTIONS},
        open=False,
    )


@dataclass
class _Ask:
    key_id: str
    held: int | None  # the channels' revision this process holds (None: none)
    window: datetime
    done: asyncio.Future[AuthRow | None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class AuthBatcher:
    """`lookup` answers one request's row; concurrent ones share a statement. `runners`
    statements may be in flight at once (one gathers the next batch while another
    runs); a batch holds at most `max_batch` requests."""

    def __init__(
        self, pool: AsyncConnectionPool, runners: int = RUNNERS, max_batch: int = 256
    ) -> None:
        self._pool = pool
        self._runners = runners
        self._max_batch = max_batch
        self._queue: asyncio.Queue[_Ask] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self.attempts = 0  # statements tried (tests)
        self.statements = 0  # statements run (tests, benches)
        self.requests = 0  # requests answered by them

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._run()) for _ in range(self._runners)]

    async def stop(self) -> None:
        await aio.cancel(*self._tasks)
        aio.fail_queued(self._queue, RuntimeError("server stopping"))

    async def lookup(self, key_id: str, held: int | None, window: datetime) -> AuthRow | None:
        """The token's row (None: no such key id), its device's rate count included."""
        ask = _Ask(key_id, held, window)
        self._queue.put_nowait(ask)  # unbounded: a request already holds its socket
        return await ask.done

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self._max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            await aio.run_batch(batch, self._answer, "an ingest authentication statement")

    async def _answer(self, batch: list[_Ask]) -> None:
        params = {  # packed in binary (db/arrays.py): psycopg's text arrays cost more
            "key_ids": arrays.texts([a.key_id for a in batch]),
            "revs": arrays.int8s([a.held for a in batch]),
            "windows": arrays.timestamptzs([a.window for a in batch]),
        }
        self.attempts += 1
        async with self._pool.connection() as conn:  # autocommit: one statement
            cur = await conn.execute(AUTH_BATCH_SQL, params)
            rows: list[tuple[Any, ...]] = await cur.fetchall()
        self.statements += 1
        self.requests += len(batch)
        found = {int(r[0]): AuthRow._make(r[1:]) for r in rows}
        for i, ask in enumerate(batch, start=1):
            if not ask.done.done():
                ask.done.set_result(found.get(i))
