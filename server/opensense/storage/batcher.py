"""Group commit for readings: concurrent ingest requests share one INSERT.

Each request hands its rows to the writer and waits for the commit of the batch
that carried them; only then does it answer 200. While one batch is being written,
new requests queue up and form the next batch, so under load a single statement
carries many requests (no timer, no added latency when idle). Rows are sorted by
(channel, ts), so two writers lock rows and rollup buckets in the same order.

Rollups are not written here (storage/rollups.py): the batch's statement stores the
rows and answers the rollup threshold; rows that may be late are offered, in the same
transaction, to the statement that logs late ranges.

A batch that fails (a poisoned row, a lost connection) is retried request by
request, so each request gets its own answer or its own error. A request answered
200 is committed; a request that got an error stored nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from psycopg import AsyncConnection, errors
from psycopg_pool import AsyncConnectionPool

from .. import aio, db
from . import rollups
from .write import DIRTY_SQL, INSERT_CTE, Row, columns, ensure_month_partitions, to_us

log = logging.getLogger(__name__)

# The new rows' keys, and one row (NULL, threshold): the rollup threshold as this
# statement saw it; the statement takes the writers' lock (storage/rollups.py)
BATCH_SQL = (
    INSERT_CTE.format(order="")  # `_write` sorts the rows
    + DIRTY_SQL
    + """
, seen AS (
  UPDATE devices SET last_seen_at = %(now)s WHERE id = ANY(%(devices)s)
    AND (last_seen_at IS NULL OR last_seen_at < %(now)s)
)
, lk AS (SELECT """
    + rollups.WRITER_LOCK_SQL
    + """)
SELECT channel_num, ts FROM ins
UNION ALL SELECT NULL, (SELECT threshold FROM rollup_state) FROM lk"""
)


@dataclass
class _Job:
    rows: Sequence[Row]
    device_id: str
    now: datetime
    done: asyncio.Future[int] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class BatchWriter:
    def __init__(
        self,
        pool: AsyncConnectionPool,
        writers: int = 2,
        max_rows: int = 8192,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self._pool = pool
        self._clock = clock or (lambda: datetime.now(UTC))
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._writers = writers
        self._max_rows = max_rows
        self._tasks: list[asyncio.Task[None]] = []
        self._seen_written: dict[str, datetime] = {}
        self.batches = 0
        self.requests = 0

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._run()) for _ in range(self._writers)]

    async def stop(self) -> None:
        await aio.cancel(*self._tasks)
        while not self._queue.empty():  # nobody will write these: let their requests fail
            job = self._queue.get_nowait()
            if not job.done.done():
                job.done.set_exception(RuntimeError("server stopping"))

    async def write(self, rows: Sequence[Row], device_id: str, now: datetime) -> int:
        """Store `rows` (recent days only); returns how many were new."""
        job = _Job(rows, device_id, now)
        await self._queue.put(job)
        return await job.done

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            n = len(batch[0].rows)
            while n < self._max_rows and not self._queue.empty():
                job = self._queue.get_nowait()
                batch.append(job)
                n += len(job.rows)
            try:
                await self._write(batch)
            except asyncio.CancelledError:
                for job in batch:
                    if not job.done.done():
                        job.done.set_exception(RuntimeError("server stopping"))
                raise
            except Exception:
                if len(batch) == 1:
                    log.exception("writing a batch of readings failed")
                    if not batch[0].done.done():
                        batch[0].done.set_exception(RuntimeError("storing the readings failed"))
                else:
                    for job in batch:  # one request's trouble must not fail the others
                        try:
                            await self._write([job])
                        except Exception as exc:
                            log.exception("writing one request's readings failed")
                            if not job.done.done():
                                job.done.set_exception(exc)

    async def _write(self, batch: list[_Job]) -> None:
        # The first occurrence of a (channel, ts) in the batch owns it; later ones
        # (another request resending it) are duplicates, as they would be one by one.
        owner: dict[tuple[int, int], int] = {}
        rows: list[Row] = []
        for i, job in enumerate(batch):
            for r in job.rows:
                key = (r.channel_num, to_us(r.ts))
                if key not in owner:
                    owner[key] = i
                    rows.append(r)
        rows.sort(key=lambda r: (r.channel_num, r.ts))
        now = max(job.now for job in batch)
        devices = sorted({job.device_id for job in batch if self._seen_due(job.device_id, job.now)})
        params = {**columns(rows), "now": now, "devices": devices}
        async with self._pool.connection() as conn:
            try:
                inserted = await self._transaction(conn, params, rows)
            except errors.CheckViolation as exc:
                # the partitions job fell behind: a reading must still not be refused
                if "no partition" not in str(exc):
                    raise
                await ensure_month_partitions(conn, {db.month_start(r.ts.date()) for r in rows})
                inserted = await self._transaction(conn, params, rows)
        counts = [0] * len(batch)
        for num, ts in inserted:
            counts[owner[(num, to_us(ts))]] += 1
        self.batches += 1
        self.requests += len(batch)
        for job, c in zip(batch, counts, strict=True):
            if not job.done.done():
                job.done.set_result(c)

    async def _transaction(
        self, conn: AsyncConnection[Any], params: dict[str, Any], rows: list[Row]
    ) -> list[tuple[int, datetime]]:
        """The batch's rows in, and the late ones logged, in one transaction."""
        async with conn.transaction():
            cur = await conn.execute(BATCH_SQL, params)
            got = await cur.fetchall()
            inserted = [(num, ts) for num, ts in got if num is not None]
            threshold = next(ts for num, ts in got if num is None)
            # after the rows went in (storage/rollups.py): rows older than the clock
            # allows a threshold to be, and rows before the threshold this statement saw
            suspect = max(self._clock() - rollups.SUSPECT_AGE, threshold)
            late = [(num, ts, 0.0) for num, ts in inserted if ts < suspect]
            if late:
                await conn.execute(rollups.LATE_SQL, rollups.late_params(late))
        return inserted

    def _seen_due(self, device_id: str, now: datetime) -> bool:
        """last_seen_at is written at most every 5 s per device by this process."""
        last = self._seen_written.get(device_id)
        if last is not None and timedelta(0) <= now - last < timedelta(seconds=5):
            return False
        self._seen_written[device_id] = now
        return True
