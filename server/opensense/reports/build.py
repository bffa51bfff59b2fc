"""One report's bytes: the one function every way of getting a report calls (the
API's renderer, GET /v1/reports/{id}/file, the monthly schedule and `opensense
report render --local`).

Templates are data: `reports/templates.py` `TEMPLATES` maps a template's name to
how its input is loaded from the database and how its figures are computed (pure)
and its PDF drawn. A new template is an entry there, and the API, the CLI and the
schedule follow.

The load runs on the event loop (async database reads); the computation and the
drawing run in a worker thread (`asyncio.to_thread`), so a render never blocks the
loop. `progress(fraction, stage)` is awaited between the steps.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import date
from typing import Any

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from .catalogue import LANGUAGES
from .templates import TEMPLATES, Template

__all__ = ["TEMPLATES", "Template", "Progress", "build"]

Progress = Callable[[float, str], Awaitable[None]]


async def _nothing(_fraction: float, _stage: str) -> None:
    return None


@asynccontextmanager
async def _connection(
    pool_or_conn: AsyncConnectionPool | AsyncConnection[Any],
) -> AsyncIterator[AsyncConnection[Any]]:
    if isinstance(pool_or_conn, AsyncConnectionPool):
        async with pool_or_conn.connection() as conn:
            yield conn
    else:
        yield pool_or_conn


async def build(
    pool_or_conn: AsyncConnectionPool | AsyncConnection[Any],
    account_id: str | None,
    site_id: str,
    template: str,
    period_from: date,
    period_to: date,
    language: str,
    progress: Progress | None = None,
    **options: Any,
) -> bytes:
    """The PDF of `template` over the site-local days [period_from, period_to].
    `account_id` None: any account's site (the operator's CLI). `options` go to the
    template's loader (a draft's `logo`, `mkt_delta_h`: the CLI's). Raises KeyError for an
    unknown template or language (the API checks both before it queues a report),
    ApiError site_not_found for a site not in the account."""
    t = TEMPLATES[template]
    if language not in LANGUAGES:
        raise KeyError(language)
    step = progress or _nothing
    await step(0.05, "loading")
    async with _connection(pool_or_conn) as conn:
        inp = await t.load(conn, site_id, period_from, period_to, account_id=account_id, **options)
    await step(0.5, "drawing")
    pdf = await asyncio.to_thread(t.render, inp, language)
    await step(0.95, "drawn")
    return pdf
