"""The API request log (30 days): every request's outcome, with secrets redacted.

Entries are buffered in memory and written with COPY once a second, so logging costs
the hot path one list append. A crash loses at most the last second of log lines,
never a reading.
"""

from __future__ import annotations

import asyncio
import logging
import re
from datetime import datetime
from typing import Any

from psycopg_pool import AsyncConnectionPool

log = logging.getLogger(__name__)

_SECRET_PARAM = re.compile(r"(?i)([?&](?:token|secret|key)=)[^&]*")
_TOKEN_TEXT = re.compile(r"\b(ds_live_|ua_live_|whk_)[0-9a-z_]+")


def redact(text: str) -> str:
    """Remove token values from a path, query string or message."""
    text = _SECRET_PARAM.sub(r"\1REDACTED", text)
    return _TOKEN_TEXT.sub(r"\1REDACTED", text)


COLUMNS = (
    "ts",
    "request_id",
    "method",
    "path",
    "status",
    "code",
    "reason",
    "account_id",
    "device_id",
    "duration_ms",
)


class RequestLog:
    def __init__(self, pool: AsyncConnectionPool, flush_every: float = 1.0) -> None:
        self._pool = pool
        self._buf: list[tuple[Any, ...]] = []
        self._every = flush_every
        self._task: asyncio.Task[None] | None = None

    def add(
        self,
        ts: datetime,
        request_id: str,
        method: str,
        path: str,
        status: int,
        code: str | None,
        reason: str | None,
        account_id: str | None,
        device_id: str | None,
        duration_ms: float,
    ) -> None:
        self._buf.append(
            (
                ts,
                request_id,
                method,
                redact(path)[:2000],
                status,
                code,
                redact(reason)[:2000] if reason else None,
                account_id,
                device_id,
                duration_ms,
            )
        )

    async def flush(self) -> None:
        if not self._buf:
            return
        rows, self._buf = self._buf, []
        try:
            await self._copy(rows)
        except Exception:
            # one bad row must not lose the others: write them one by one
            lost = 0
            for row in rows:
                try:
                    await self._copy([row])
                except Exception:
                    lost += 1
            if lost:
                log.exception("could not write %d request log rows", lost)

    async def _copy(self, rows: list[tuple[Any, ...]]) -> None:
        async with self._pool.connection() as conn, conn.cursor() as cur:
            async with cur.copy(f"COPY request_log ({', '.join(COLUMNS)}) FROM STDIN") as copy:
                for row in rows:
                    await copy.write_row(row)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._every)
            await self.flush()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        await self.flush()
