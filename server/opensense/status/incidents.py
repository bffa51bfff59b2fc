"""Incidents: open (by self-watching or by an operator), acknowledge, post updates,
resolve, attach the post-mortem. Every step that the product says customers hear about
(acknowledgement, updates, resolution, post-mortem) queues a notice to the affected
accounts' email in incident_mail, in the same transaction; the incident mailer
(mail.py) sends it through its own SMTP path.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from psycopg import AsyncConnection
from psycopg.rows import dict_row

from ..errors import ApiError
from ..ids import new_id
from .cadence import CLASSES, next_due, resolution_target

STATUSES = ("investigating", "identified", "monitoring", "resolved")
OPEN_STATUSES = STATUSES[:-1]
MAX_TEXT = 20_000

COLUMNS = (
    "id, class, title, condition, component, status, opened_at, opened_by, acknowledged_at,"
    " acknowledged_by, resolved_at, resolved_by, postmortem, postmortem_at, affected_accounts,"
    " reminded_for"
)


def _text(body: dict[str, Any], key: str, *, required: bool = True, limit: int = MAX_TEXT) -> str:
    v = body.get(key)
    if v is None and not required:
        return ""
    if not isinstance(v, str) or not v.strip():
        raise ApiError("invalid_request", f"`{key}` must be a non-empty string")
    if len(v) > limit:
        raise ApiError("invalid_request", f"`{key}` is longer than {limit} characters")
    return v.strip()


async def _get(
    conn: AsyncConnection[Any], incident_id: str, *, lock: bool = False
) -> dict[str, Any]:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            f"SELECT {COLUMNS} FROM incidents WHERE id = %s" + (" FOR UPDATE" if lock else ""),
            (incident_id,),
        )
        row = await cur.fetchone()
    if row is None:
        raise ApiError("incident_not_found", f"there is no incident {incident_id!r}")
    return row


async def _updates(conn: AsyncConnection[Any], ids: list[str]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {i: [] for i in ids}
    if not ids:
        return out
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            "SELECT incident_id, at, author, status, body FROM incident_updates"
            " WHERE incident_id = ANY(%s) ORDER BY at, id",
            (ids,),
        )
        for r in await cur.fetchall():
            out[r.pop("incident_id")].append(r)
    return out


def present(
    row: dict[str, Any], updates: list[dict[str, Any]], tz: ZoneInfo, now: datetime
) -> dict[str, Any]:
    """The operator's view: everything, with what is due next."""
    last = updates[-1]["at"] if updates else None
    due = next_due(
        row["class"],
        row["opened_at"],
        row["acknowledged_at"],
        last,
        row["resolved_at"],
        bool(row["postmortem"]),
        tz,
    )
    target = resolution_target(row["class"], row["opened_at"], tz)
    return {
        **{k: v for k, v in row.items() if k != "reminded_for"},
        "class_policy": CLASSES[row["class"]].describe(),
        "resolution_target": target,
        "next_due": {"what": due.what, "at": due.at, "overdue": now >= due.at} if due else None,
        "updates": updates,
    }


def public(row: dict[str, Any], updates: list[dict[str, Any]]) -> dict[str, Any]:
    """What the public status page shows: no accounts, no authors."""
    return {
        "id": row["id"],
        "class": row["class"],
        "title": row["title"],
        "component": row["component"],
        "status": row["status"],
        "opened_at": row["opened_at"],
        "acknowledged_at": row["acknowledged_at"],
        "resolved_at": row["resolved_at"],
        "postmortem": row["postmortem"],
        "updates": [{"at": u["at"], "status": u["status"], "body": u["body"]} for u in updates],
    }


async def recent(
    conn: AsyncConnection[Any], now: datetime, days: int = 7
) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """Open incidents, and those resolved in the last `days` days, newest first."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            f"SELECT {COLUMNS} FROM incidents WHERE resolved_at IS NULL"
            " OR resolved_at > %s::timestamptz - make_interval(days => %s)"
            " ORDER BY opened_at DESC LIMIT 50",
            (now, days),
        )
        rows = await cur.fetchall()
    ups = await _updates(conn, [r["id"] for r in rows])
    return [(r, ups[r["id"]]) for r in rows]


async def list_all(
    conn: AsyncConnection[Any], *, open_only: bool, limit: int = 100
) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            f"SELECT {COLUMNS} FROM incidents"
            + (" WHERE resolved_at IS NULL" if open_only else "")
            + " ORDER BY opened_at DESC LIMIT %s",
            (limit,),
        )
        rows = await cur.fetchall()
    ups = await _updates(conn, [r["id"] for r in rows])
    return [(r, ups[r["id"]]) for r in rows]


async def get(
    conn: AsyncConnection[Any], incident_id: str
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    row = await _get(conn, incident_id)
    return row, (await _updates(conn, [incident_id]))[incident_id]


async def _add_update(
    conn: AsyncConnection[Any], incident_id: str, now: datetime, author: str, status: str, body: str
) -> None:
    await conn.execute(
        "INSERT INTO incident_updates (incident_id, at, author, status, body)"
        " VALUES (%s, %s, %s, %s, %s)",
        (incident_id, now, author, status, body),
    )


async def queue_notice(
    conn: AsyncConnection[Any], row: dict[str, Any], now: datetime, what: str, body: str
) -> int:
    """A notice to every affected account's email (all accounts when none are named)."""
    if row["affected_accounts"] is None:
        cur = await conn.execute("SELECT id, email FROM accounts")
    else:
        cur = await conn.execute(
            "SELECT id, email FROM accounts WHERE id = ANY(%s)", (row["affected_accounts"],)
        )
    accounts = await cur.fetchall()
    subject = f"[OpenSense {row['class']}] {what}: {row['title']}"
    text = (
        f"{body}\n\nIncident {row['id']} ({row['class']}, {CLASSES[row['class']].what}), "
        f"opened {row['opened_at']:%Y-%m-%d %H:%M} UTC.\n"
        "Follow it on the status page: /status\n"
    )
    for acc, email in accounts:
        await conn.execute(
            "INSERT INTO incident_mail (incident_id, kind, account_id, to_addr, subject, body,"
            " created_at, next_try_at) VALUES (%s, 'notice', %s, %s, %s, %s, %s, %s)",
            (row["id"], acc, email, subject, text, now, now),
        )
    return len(accounts)


async def queue_operator(
    conn: AsyncConnection[Any], incident_id: str, to: str, now: datetime, subject: str, body: str
) -> None:
    if not to:
        return
    await conn.execute(
        "INSERT INTO incident_mail (incident_id, kind, to_addr, subject, body, created_at,"
        " next_try_at) VALUES (%s, 'operator', %s, %s, %s, %s, %s)",
        (incident_id, to, subject, body, now, now),
    )


async def open_incident(
    conn: AsyncConnection[Any],
    now: datetime,
    *,
    klass: str,
    title: str,
    body: str,
    author: str,
    component: str | None = None,
    condition: str | None = None,
    affected: list[str] | None = None,
) -> str | None:
    """A new incident with its first update; None when `condition` already has an
    open one (any process may see a condition first; one incident opens)."""
    if klass not in CLASSES:
        raise ApiError("invalid_request", "`class` must be P0, P1 or P2")
    iid = new_id("inc")
    cur = await conn.execute(
        "INSERT INTO incidents (id, class, title, condition, component, opened_at, opened_by,"
        " affected_accounts) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
        " ON CONFLICT (condition) WHERE resolved_at IS NULL AND condition IS NOT NULL"
        " DO NOTHING RETURNING id",
        (iid, klass, title, condition, component, now, author, affected),
    )
    if await cur.fetchone() is None:
        return None
    await _add_update(conn, iid, now, author, "investigating", body)
    return iid


def _check_open(row: dict[str, Any]) -> None:
    if row["resolved_at"] is not None:
        raise ApiError(
            "incident_resolved",
            f"incident {row['id']} was resolved at {row['resolved_at']:%Y-%m-%d %H:%M} UTC;"
            " open a new one if the problem is back",
        )


async def acknowledge(
    conn: AsyncConnection[Any], incident_id: str, now: datetime, author: str, body: str
) -> dict[str, Any]:
    row = await _get(conn, incident_id, lock=True)
    _check_open(row)
    if row["acknowledged_at"] is not None:
        return row
    body = body or "We know about this problem and are investigating."
    await conn.execute(
        "UPDATE incidents SET acknowledged_at = %s, acknowledged_by = %s WHERE id = %s",
        (now, author, incident_id),
    )
    await _add_update(conn, incident_id, now, author, row["status"], body)
    row = await _get(conn, incident_id)
    await queue_notice(conn, row, now, "Acknowledged", body)
    return row


async def post_update(
    conn: AsyncConnection[Any],
    incident_id: str,
    now: datetime,
    author: str,
    status: str | None,
    body: str,
) -> dict[str, Any]:
    row = await _get(conn, incident_id, lock=True)
    _check_open(row)
    status = status or row["status"]
    if status not in OPEN_STATUSES:
        raise ApiError(
            "invalid_request",
            f"`status` must be one of {', '.join(OPEN_STATUSES)}; resolve with /resolve",
        )
    if row["acknowledged_at"] is None:
        # an update is a public confirmation: it acknowledges as well
        await conn.execute(
            "UPDATE incidents SET acknowledged_at = %s, acknowledged_by = %s WHERE id = %s",
            (now, author, incident_id),
        )
    await conn.execute("UPDATE incidents SET status = %s WHERE id = %s", (status, incident_id))
    await _add_update(conn, incident_id, now, author, status, body)
    row = await _get(conn, incident_id)
    await queue_notice(conn, row, now, f"Update ({status})", body)
    return row


async def resolve(
    conn: AsyncConnection[Any], incident_id: str, now: datetime, author: str, body: str
) -> dict[str, Any]:
    row = await _get(conn, incident_id, lock=True)
    _check_open(row)
    await conn.execute(
        "UPDATE incidents SET status = 'resolved', resolved_at = %s, resolved_by = %s,"
        " acknowledged_at = coalesce(acknowledged_at, %s),"
        " acknowledged_by = coalesce(acknowledged_by, %s) WHERE id = %s",
        (now, author, now, author, incident_id),
    )
    await _add_update(conn, incident_id, now, author, "resolved", body)
    row = await _get(conn, incident_id)
    await queue_notice(conn, row, now, "Resolved", body)
    return row


async def set_postmortem(
    conn: AsyncConnection[Any], incident_id: str, now: datetime, author: str, text: str
) -> dict[str, Any]:
    row = await _get(conn, incident_id, lock=True)
    if row["resolved_at"] is None:
        raise ApiError(
            "conflict",
            f"incident {incident_id} is not resolved yet; the post-mortem follows the resolution",
        )
    await conn.execute(
        "UPDATE incidents SET postmortem = %s, postmortem_at = %s WHERE id = %s",
        (text, now, incident_id),
    )
    row = await _get(conn, incident_id)
    await queue_notice(conn, row, now, "Post-mortem", text)
    return row
