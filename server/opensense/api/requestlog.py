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
from urllib.parse import unquote, unquote_plus

from psycopg_pool import AsyncConnectionPool

from .. import aio, tokens

log = logging.getLogger(__name__)

# A query parameter whose name, percent-decoded and in any case, is one of these has its
# value replaced. aiohttp decodes names before the routes read them, so `%74oken=` is
# the `token` parameter and has to be redacted as such.
_SECRET_NAMES = frozenset({"token", "secret", "key", "password"})
# Runs of characters a token can be written with, percent-encoded or not; each run is
# decoded (a few rounds: `%2574` is `%74` is `t`) and checked for a token's shape.
_RUN = re.compile(r"[A-Za-z0-9%_+.~-]+")
_PREFIX = "|".join(re.escape(p) for p in tokens.PREFIXES.values())
# one of our tokens (prefix, key_id, `_`, any part of a secret: ids such as gw_… have
# no `_` after 16 characters), or the key_id_secret tail alone
_TOKEN_SHAPE = re.compile(
    rf"(?i)(?:{_PREFIX})[0-9a-z]{{{tokens.KEY_ID_LEN}}}_"
    rf"|[0-9a-z]{{{tokens.KEY_ID_LEN}}}_[0-9a-z]{{{tokens.SECRET_LEN}}}"
)
_DECODE_ROUNDS = 3


def _decoded(raw: str) -> str:
    text = raw
    for _ in range(_DECODE_ROUNDS):
        nxt = unquote(text)
        if nxt == text:
            break
        text = nxt
    return text


def _redact_run(m: re.Match[str]) -> str:
    raw = m.group(0)
    plain = _decoded(raw)
    if not _TOKEN_SHAPE.search(plain):
        return raw
    kind = next((p for p in tokens.PREFIXES.values() if p in plain.lower()), "")
    return f"{kind}REDACTED"


def _redact_query(query: str) -> str:
    out = []
    for part in re.split(r"([&;])", query):
        name, eq, _value = part.partition("=")
        if eq and _decoded(unquote_plus(name)).strip().lower() in _SECRET_NAMES:
            part = f"{name}=REDACTED"
        out.append(part)
    return "".join(out)


def redact(text: str) -> str:
    """Remove token values from a path, query string or message: every parameter whose
    decoded name is a secret's, and any text that decodes to one of our tokens."""
    path, q, query = text.partition("?")
    if q:
        text = f"{path}?{_redact_query(query)}"
    return _RUN.sub(_redact_run, text)


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
        await aio.cancel(self._task)
        await self.flush()
