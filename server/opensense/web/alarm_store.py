"""What the rules, notifications and audit pages read (web/rules.py, web/notify.py,
web/audit.py). Every statement names the account; every list is bounded (a page of
rows at a time). Writes go through the alarm API's functions (alarms/routes.py)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import dict_row

Conn = AsyncConnection[Any]
Row = dict[str, Any]

PAGE = 50  # rows per page of the outbound log and the audit trail
RULES_MAX = 500  # rules listed on /rules (the API has no account-wide cap on rules)


async def _all(conn: Conn, sql: str, args: Any) -> list[Row]:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(sql, args)
    return await cur.fetchall()


async def channels(conn: Conn, acc: str) -> list[Row]:
    """The account's channels with their device and site (name, time zone)."""
    return await _all(
        conn,
        "SELECT c.id, c.name, c.kind, c.unit, d.name AS device_name, s.id AS site_id,"
        " s.name AS site_name, s.timezone, s.vertical FROM channels c"
        " JOIN devices d ON d.id = c.device_id JOIN sites s ON s.id = d.site_id"
        " WHERE c.account_id = %s ORDER BY s.name, d.name, c.name, c.id LIMIT 2000",
        (acc,),
    )


async def rules(conn: Conn, acc: str) -> list[Row]:
    return await _all(
        conn,
        "SELECT r.id, r.channel_id, r.kind, r.params, r.grace_min, r.clear_min, r.severity,"
        " r.enabled, r.windows, r.renotify_min FROM rules r"
        " JOIN channels c ON c.id = r.channel_id WHERE c.account_id = %s"
        " ORDER BY r.channel_id, r.created_at, r.id LIMIT %s",
        (acc, RULES_MAX),
    )


async def outbound_page(conn: Conn, acc: str, before: int | None) -> list[Row]:
    """One page of the outbound log, newest first; `before`: below that row id (ids
    grow with time: each attempt is a new row)."""
    return await _all(
        conn,
        "SELECT id, path, target, event_id, kind, status, code, error, attempt, at"
        " FROM outbound_log WHERE account_id = %s AND (%s::bigint IS NULL OR id < %s)"
        " ORDER BY id DESC LIMIT %s",
        (acc, before, before, PAGE + 1),
    )


async def audit_page(conn: Conn, acc: str, before: int | None) -> list[Row]:
    """One page of the account's trail, newest first; `before`: below that seq."""
    return await _all(
        conn,
        "SELECT seq, at, actor, action, subject, data FROM audit_log"
        " WHERE account_id = %s AND (%s::bigint IS NULL OR seq < %s)"
        " ORDER BY seq DESC LIMIT %s",
        (acc, before, before, PAGE + 1),
    )


async def audit_job(conn: Conn) -> Row | None:
    """The last run of the scheduled verification (every account's trail)."""
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute("SELECT last_status, last_run_at FROM jobs WHERE name = 'audit_verify'")
    return await cur.fetchone()


def when(t: datetime | None) -> str:
    return "–" if t is None else t.strftime("%Y-%m-%d %H:%M UTC")


async def user_emails(conn: Conn, acc: str) -> dict[str, str]:
    """The account's users by id (the actor of their audit rows)."""
    cur = await conn.execute(
        "SELECT id, email FROM users WHERE account_id = %s LIMIT 10000", (acc,)
    )
    return {r[0]: r[1] for r in await cur.fetchall()}
