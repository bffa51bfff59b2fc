"""Management-API authentication: `Authorization: Bearer ua_live_…`."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from psycopg import AsyncConnection

from .. import ratelimit, tokens
from .keys import ACTOR, CONFIG, LOG_ACCOUNT, VERIFIER


def bearer(request: web.Request) -> str | None:
    h = request.headers.get("Authorization", "")
    if h[:7].lower() == "bearer ":
        return h[7:].strip() or None
    return None


async def account(request: web.Request, conn: AsyncConnection[Any], *, read: bool = True) -> str:
    """The account behind the request's user token; counts the read rate limit."""
    cfg = request.app[CONFIG]
    now = cfg.clock()
    row = await tokens.authenticate(conn, request.app[VERIFIER], bearer(request), ("ua_live",), now)
    request[LOG_ACCOUNT] = row.account_id
    request[ACTOR] = row.id
    if read:
        await ratelimit.hit(
            conn, f"read:{row.account_id}", cfg.read_rate_per_min, 60, now, "API access"
        )
    return row.account_id


def actor(request: web.Request) -> str:
    """Who the audit trail names for this request: the API token's id."""
    return request[ACTOR]
