"""Group commit for readings: concurrent ingest requests share one INSERT.

Each request hands its rows to the writer and waits for the commit of the batch
that carried them; only then does it answer 200. While one batch is being written,
new requests queue up and form the next batch, so under load a single statement
carries many requests. Rows are sorted by (channel, ts), so two writers lock rows
and rollup buckets in the same order.

Linger (OPENSENSE_WRITE_LINGER_MS, as Kafka's linger.ms): at a steady trickle (a
fleet's nodes each sending a message a minute) nothing queues while a statement runs,
so every request would pay a statement and a commit of its own. A writer that finds
only what arrived since the last statement then waits until the first request of its
batch is `linger` old, taking whatever comes meanwhile, but only while waiting pays:
when requests have arrived often enough lately that at least one more is expected
within the linger, and lingering has been gathering more requests (`_Linger`). A
lone client sending request after request (each waiting for its answer) gains
nothing from waiting and stops paying it after a few tries; an idle server never
lingers. A request waits at most `linger` more than before.

Rollups are not written here (storage/rollups.py): the batch's statement stores the
rows and logs the range of the late ones. It also marks the channels for the rule
engine, except the calm readings of channels written now and then, which it settles
itself (CALM_CTE, `_Streams`; migration 0032).

A batch that fails (a poisoned row) is retried request by request, so each request
gets its own answer or its own error; a batch that fails because the database is away
(`db.connection_trouble`) fails whole at once, rather than each request waiting for
the pool's timeout in turn. A request answered 200 is committed; a request that got an
error stored nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from psycopg import errors
from psycopg_pool import AsyncConnectionPool

from .. import aio
from ..db import arrays
from . import rollups
from .write import (
    DIRTY_SQL,
    INSERT_CTE,
    ON_CONFLICT,
    RowLike,
    columns,
    execute_mending_partitions,
)

log = logging.getLogger(__name__)

# Calm readings (migration 0032; docs/alarms.md, "Calm readings"): a channel's new
# readings are settled here, not marked for the rule engine, when its state row says
# the engine left every rule of the channel in ok (`status`) with a band of values
# none of which can move them, computed at the rules it has now (`calm_rev` is its
# `meta_rev`: any change to the rules, the channel or its site moves that), and:
# - they all lie in that band;
# - they come after what was judged (`last_ts`), by more than CALM_QUIET_S (reading
#   time);
# - the engine has taken a checkpoint of the channel (its second pass does), and the
#   channel's judged time (`last_ts`) is less than 10 minutes of readings past it
#   (alarms/evaluator.py CHECKPOINT_EVERY; tests/test_calm_readings.py holds the two
#   equal): from there the engine's next pass, going on from `last_ts`, takes its
#   checkpoint at `last_ts` (`_run`), so it judges the channel once about every 10
#   minutes of readings and a late reading's rewind finds a checkpoint as near as
#   before. (Settling until the readings' end reached 10 minutes, as at first, left
#   `last_ts` short of it: the pass found no checkpoint due and the next message
#   went to the engine again, two passes every 10 minutes.)
# - they end within 20 minutes of readings after the checkpoint: a long run at once
#   (a node's buffer after an outage) goes to the engine;
# - no mark for the engine is waiting (an earlier reading of the channel is not judged
#   yet: these must be judged after it).
# Such a reading changes nothing of the state but the time it was judged up to, which
# this statement moves, under the row's lock: SKIP LOCKED, so a writer never waits for
# a rule-engine pass (which holds its channels' rows from claim to commit); a row
# locked elsewhere is marked for the engine instead, as every other one is. The lock
# taken on a row whose state a pass changed after this statement's snapshot sees the
# changed row and checks it again (READ COMMITTED): a channel the engine just put in
# grace is not settled. The `UPDATE` wakes the dashboards as a pass's save does
# (migration 0026's trigger).
#
# Only the channels in %(calm)s are looked at (`_Streams`: those this writer stored no
# reading of in the last CALM_QUIET_S of wall time). A channel written more often (a
# stream, whatever its readings' own times) is cheaper to the engine, whose pass
# judges everything a gather brought at once, than to this statement, which would
# lock and update its state row in every batch: settling the HTTP bench's channels
# (a reading each every ~80 ms, their times a minute apart) cost HTTP 32 a request
# ~5 µs a reading more in PostgreSQL (docs/ingest-cost.md, stop 36).
CALM_QUIET_S = 5.0
CALM_CTE = f"""
, calm AS (
  SELECT a.channel_num, g.hi_ts FROM (
      SELECT channel_num, min(ts) AS lo_ts, max(ts) AS hi_ts, min(value) AS lo_v,
        max(value) AS hi_v
      FROM ins WHERE channel_num = ANY(%(calm)b::int4[]) GROUP BY channel_num) g
    JOIN alarm_state a ON a.channel_num = g.channel_num
  WHERE a.status = 'ok' AND a.calm_rev = a.meta_rev
    AND g.lo_v >= a.calm_lo AND g.hi_v <= a.calm_hi
    AND g.lo_ts > a.last_ts + interval '{CALM_QUIET_S:g} seconds'
    AND a.last_ts < a.cp_last + interval '10 minutes'
    AND g.hi_ts < a.cp_last + interval '20 minutes'
    AND NOT EXISTS (SELECT FROM alarm_dirty d WHERE d.channel_num = a.channel_num)
  ORDER BY a.channel_num
  FOR UPDATE OF a SKIP LOCKED
), settled AS (
  UPDATE alarm_state a SET last_ts = calm.hi_ts FROM calm
  WHERE a.channel_num = calm.channel_num
  RETURNING a.channel_num
)"""
# The marks for the engine, as storage/write.py DIRTY_SQL makes them, of the channels
# not settled above
CALM_DIRTY_SQL = DIRTY_SQL.replace(
    "FROM ins GROUP BY",
    "FROM ins WHERE channel_num NOT IN (SELECT channel_num FROM settled)\n  GROUP BY",
)
assert CALM_DIRTY_SQL != DIRTY_SQL

# One statement, one transaction (autocommit): the rows, the rule engine's wake-up
# (and calm readings settled: CALM_CTE), the late rows' ranges (storage/rollups.py),
# last_seen_at; answers the keys of the rows that were stored already (resent
# readings: usually none), not those of the new ones: a batch of 1,000 new readings no
# longer sends 1,000 keys back to be parsed and matched (~2 µs a reading of the
# server's CPU, HTTP 32 a request)
_SEEN = """
, seen AS (
  UPDATE devices SET last_seen_at = %(now)s WHERE id = ANY(%(devices)s)
    AND (last_seen_at IS NULL OR last_seen_at < %(now)s)
)"""
_ANSWER = """
SELECT s.channel_num, s.ts FROM src s
WHERE NOT EXISTS (SELECT FROM ins i WHERE i.channel_num = s.channel_num AND i.ts = s.ts)"""


def _statement(conflict: str, calm: bool, answer: str) -> str:
    marks = CALM_CTE + CALM_DIRTY_SQL if calm else DIRTY_SQL
    return (
        INSERT_CTE.format(order="", conflict=conflict)  # `_write` sorts the rows
        + marks
        + rollups.LATE_CTE
        + _SEEN
        + answer
    )


BATCH_SQL = _statement(ON_CONFLICT, True, _ANSWER)
# The first try of every batch: the same without ON CONFLICT DO NOTHING. Almost every
# batch holds new readings only, and ON CONFLICT's speculative insertion looks each
# row up in the primary key before inserting it (the insert looks it up again): 3.0
# of the statement's 11 µs a reading at HTTP 32 (perf, docs/ingest-cost.md). Without
# it the primary key alone refuses a row stored already: the statement fails whole
# (nothing of it is kept), and the batch runs again as BATCH_SQL (`_write`).
_NOTHING = "\nSELECT NULL::int4, NULL::timestamptz WHERE false"
PLAIN_BATCH_SQL = _statement("", True, _NOTHING)
# The two without the calm look-up, for a batch that offers it no channel (`_Streams`:
# all of them written in the last CALM_QUIET_S, a stream's batch): each of its channels
# marked for the engine, as before migration 0032, and nothing of CALM_CTE to plan or
# run (with it, such batches cost HTTP 32 a request ~1-2 µs a reading more)
STREAM_BATCH_SQL = _statement(ON_CONFLICT, False, _ANSWER)
PLAIN_STREAM_BATCH_SQL = _statement("", False, _NOTHING)


class _Streams:
    """When (monotonic) this writer last stored a reading of each channel, to tell a
    stream (written again within `quiet_s`) from a channel written now and then: only
    the latter are offered to CALM_CTE (`quiet`). A cost filter: the statement decides,
    so a channel offered wrongly is only looked up for nothing, and one withheld is
    marked for the engine as every reading was before. Bounded: emptied when it holds
    MAX channels (then every channel is offered once)."""

    MAX = 262144

    def __init__(self, quiet_s: float = CALM_QUIET_S, clock: Any = time.monotonic) -> None:
        self.quiet_s = quiet_s
        self._clock = clock
        self._last: dict[int, float] = {}

    def quiet(self, rows: Sequence[RowLike]) -> list[int]:
        """The channels of `rows` (sorted by channel) not written here in the last
        `quiet_s`; all of them are written now."""
        last = self._last
        if len(last) > self.MAX:
            last.clear()
        now = self._clock()
        since = now - self.quiet_s
        out: list[int] = []
        prev_num = -1
        for r in rows:
            num = r[0]
            if num != prev_num:
                before = last.get(num)
                if before is None or before <= since:
                    out.append(num)
                last[num] = now
                prev_num = num
        return out


@dataclass
class _Job:
    rows: Sequence[RowLike]
    device_id: str
    now: datetime
    done: asyncio.Future[int] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    arrived: float = field(default_factory=time.monotonic)


class _Linger:
    """Whether a writer should wait for more requests before its statement.

    Two running estimates: the gap between requests (exponentially weighted, so a
    pause of a second ends lingering at once), and how many requests a linger gained
    (weighted likewise). Lingering pays when a request is expected within the linger
    and lingers have been gaining requests; when they stop gaining (a lone client
    waiting for each answer), a linger is tried again at most once a second."""

    ALPHA = 0.2  # weight of the newest observation
    MIN_GAIN = 0.5  # requests a linger must gather on average to go on lingering
    PROBE_S = 1.0  # while it does not, one linger a second at most

    def __init__(self, linger_s: float) -> None:
        self.linger_s = linger_s
        self._last = -1e9
        self._gap = 1e9  # no estimate yet: as if idle
        self._gain = self.MIN_GAIN  # the first linger finds out
        self._probed = -1e9

    def arrived(self, now: float) -> None:
        gap = now - self._last
        self._last = now
        # after a pause (or at the start) the newest gap is the estimate
        self._gap = gap if max(gap, self._gap) > 1.0 else self._gap + self.ALPHA * (gap - self._gap)

    def due(self, now: float) -> bool:
        if self.linger_s <= 0 or self._gap > self.linger_s or now - self._last > self.linger_s:
            return False
        if self._gain >= self.MIN_GAIN:
            return True
        if now - self._probed >= self.PROBE_S:
            self._probed = now
            return True
        return False

    def gained(self, jobs: int) -> None:
        self._gain += self.ALPHA * (jobs - self._gain)


class BatchWriter:
    def __init__(
        self,
        pool: AsyncConnectionPool,
        writers: int = 2,
        max_rows: int = 8192,
        linger_ms: float = 0.0,
    ) -> None:
        self._pool = pool
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._writers = writers
        self._max_rows = max_rows
        self._linger = _Linger(linger_ms / 1000)
        self._collecting = asyncio.Lock()  # one writer gathers a batch at a time
        self._tasks: list[asyncio.Task[None]] = []
        self._seen_written: dict[str, datetime] = {}
        self._streams = _Streams()
        self._active = 0  # batches taken from the queue and not yet written
        self.batches = 0
        self.requests = 0
        self.lingered = 0  # batches that waited for more requests
        self.resent = 0  # batches that held a reading stored already (run twice)
        self.attempts = 0  # statements tried, the failed ones included (tests)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._run()) for _ in range(self._writers)]

    async def stop(self) -> None:
        await aio.cancel(*self._tasks)
        aio.fail_queued(self._queue, RuntimeError("server stopping"))

    async def settled(self, poll_s: float = 0.005) -> None:
        """Once nothing is queued or being written: every request handed over before
        (even one whose caller was cancelled, whose rows are written all the same) is
        committed or failed. Polls; the caller bounds the wait (a server under steady
        load may never settle)."""
        # polled, not an Event: nothing on the write path pays for a wait made at stop
        while self._active or not self._queue.empty():  # noqa: ASYNC110
            await asyncio.sleep(poll_s)

    async def write(self, rows: Sequence[RowLike], device_id: str, now: datetime) -> int:
        """Store `rows` (recent days only); returns how many were new."""
        job = _Job(rows, device_id, now)
        self._linger.arrived(job.arrived)
        self._queue.put_nowait(job)  # unbounded: never blocks
        return await job.done

    def _take(self, batch: list[_Job], n: int) -> int:
        while n < self._max_rows and not self._queue.empty():
            job = self._queue.get_nowait()
            batch.append(job)
            n += len(job.rows)
        return n

    async def _gather(self, batch: list[_Job]) -> None:
        """Fill `batch` with the queued requests; with a linger due, also with those
        arriving until its first request is `linger` old."""
        async with self._collecting:
            batch.append(await self._queue.get())
            self._active += 1  # (given back by _run when the batch is done)
            n = self._take(batch, len(batch[0].rows))
            if n >= self._max_rows:
                return
            wait = batch[0].arrived + self._linger.linger_s - time.monotonic()
            if wait <= 0 or not self._linger.due(time.monotonic()):
                return
            had = len(batch)
            await asyncio.sleep(wait)
            self._take(batch, n)
            self._linger.gained(len(batch) - had)
            self.lingered += 1

    async def _run(self) -> None:
        while True:
            batch: list[_Job] = []
            try:
                await self._run_batch(batch)
            finally:
                if batch:
                    self._active -= 1

    async def _run_batch(self, batch: list[_Job]) -> None:
        try:
            await self._gather(batch)
        except asyncio.CancelledError:
            aio.fail((job.done for job in batch), RuntimeError("server stopping"))
            raise
        await aio.run_batch(
            batch,
            self._write,
            "writing readings",
            lone=lambda _exc: RuntimeError("storing the readings failed"),
        )

    async def _write(self, batch: list[_Job]) -> None:
        # The first occurrence of a (channel, ts) in the batch owns it; later ones
        # (another request resending it) are duplicates, as they would be one by one.
        # Keyed by (channel, ts) as datetimes: aware ones are equal (and hash alike) when
        # they are the same instant, whatever their offsets.
        owner: dict[tuple[int, datetime], int] = {}
        rows: list[RowLike] = []
        counts = [0] * len(batch)  # each request's rows of this statement, then its new ones
        for i, job in enumerate(batch):
            n = 0
            for r in job.rows:
                key = r[:2]
                if key not in owner:
                    owner[key] = i
                    rows.append(r)
                    n += 1
            counts[i] = n
        rows.sort()  # by (channel, ts): no two rows share both, so value never decides
        now = max(job.now for job in batch)
        devices = sorted({job.device_id for job in batch if self._seen_due(job.device_id, job.now)})
        quiet = self._streams.quiet(rows)
        params = {**columns(rows), "now": now, "devices": devices, "calm": arrays.int4s(quiet)}
        plain, again = (
            (PLAIN_BATCH_SQL, BATCH_SQL) if quiet else (PLAIN_STREAM_BATCH_SQL, STREAM_BATCH_SQL)
        )
        self.attempts += 1
        async with self._pool.connection() as conn:  # autocommit: one statement, one transaction
            try:
                cur = await execute_mending_partitions(conn, plain, params, rows, savepoint=False)
            except errors.UniqueViolation:  # a reading stored already: nothing was kept
                self.resent += 1
                cur = await execute_mending_partitions(conn, again, params, rows, savepoint=False)
            stored_already = await cur.fetchall()
        for num, ts in stored_already:
            counts[owner[(num, ts)]] -= 1
        self.batches += 1
        self.requests += len(batch)
        for job, c in zip(batch, counts, strict=True):
            if not job.done.done():
                job.done.set_result(c)

    def _seen_due(self, device_id: str, now: datetime) -> bool:
        """last_seen_at is written at most every 5 s per device by this process."""
        last = self._seen_written.get(device_id)
        if last is not None and timedelta(0) <= now - last < timedelta(seconds=5):
            return False
        self._seen_written[device_id] = now
        return True
