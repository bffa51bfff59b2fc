"""One report's bytes: the one function every way of getting a report calls (the
API's renderer, GET /v1/reports/{id}/file, the monthly schedule and `opensense
report render --local`).

Templates are data: `TEMPLATES` maps a template's name to how its input is loaded
from the database, how its figures are computed (pure) and how its PDF is drawn.
A new template (haccp_annual, server_room_uptime) or a sealing step (the report's
hash into the audit trail and its checkpoint printed on the page) is an entry here
or a change of `build`, and the API, the CLI and the schedule follow.

The load runs on the event loop (async database reads); the pure computation and the
drawing run in a worker thread (`asyncio.to_thread`), so a render never blocks the
loop. `progress(fraction, stage)` is awaited between the steps.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import date
from typing import Any

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from . import data as rd
from . import load, render
from .catalogue import LANGUAGES

Progress = Callable[[float, str], Awaitable[None]]
Loader = Callable[..., Awaitable[rd.ReportInput]]


@dataclass(frozen=True)
class Template:
    name: str
    doc: str
    # (conn, site_id, period_from, period_to, *, account_id) -> the pure input
    load: Loader
    compute: Callable[[rd.ReportInput], rd.ReportData]
    render: Callable[[rd.ReportData, str], bytes]


TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in (
        Template(
            "haccp_monthly",
            "the HACCP report of a period (made for a month): per-channel daily figures and "
            "chart, excursion log, sensor health, threshold changes",
            load.load_month,
            rd.compute,
            render.render_pdf,
        ),
    )
}


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
) -> bytes:
    """The PDF of `template` over the site-local days [period_from, period_to].
    `account_id` None: any account's site (the operator's CLI). Raises KeyError for an
    unknown template or language (the API checks both before it queues a report),
    ApiError site_not_found for a site not in the account."""
    t = TEMPLATES[template]
    if language not in LANGUAGES:
        raise KeyError(language)
    step = progress or _nothing
    await step(0.05, "loading")
    async with _connection(pool_or_conn) as conn:
        inp = await t.load(conn, site_id, period_from, period_to, account_id=account_id)
    await step(0.5, "computing")
    figures = await asyncio.to_thread(t.compute, inp)
    await step(0.7, "drawing")
    pdf = await asyncio.to_thread(t.render, figures, language)
    await step(0.95, "drawn")
    return pdf
