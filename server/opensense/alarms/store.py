"""The SQL of the alarm API (routes.py), as `devices/store.py` is the devices'.

Each function is one statement or a few that belong together; the caller holds the
connection and the transaction (an audit row joins the change's transaction). Rows
the API returns as they are come back as dicts (`dict_row`); rows the code reads come
back as named types (`class_row`). Column names are the tables'
(migration 0004_alarms.sql)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import class_row, dict_row, scalar_row
from psycopg.types.json import Jsonb

from ..ids import new_id

Conn = AsyncConnection[Any]
Row = dict[str, Any]

EVENT_COLS = (
    "id, channel_id, device_id, rule_id, kind, severity, state, value, started_at, alarm_at,"
    " acknowledged_at, acknowledged_by, ack_note, ack_cause, ack_action, ack_product,"
    " cleared_at, cleared_by, clear_note, renotified_at"
)
RULE_COLS = (
    "id, channel_id, kind, params, grace_min, clear_min, severity, enabled, windows, renotify_min"
)
TARGET_COLS = "id, site_id, path, address, name, roles, verified, created_at"
SILENCE_COLS = "id, site_id, channel_id, starts_at, ends_at, reason"


async def _one(conn: Conn, sql: str, args: Any) -> Row | None:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(sql, args)
    return await cur.fetchone()


async def _all(conn: Conn, sql: str, args: Any) -> list[Row]:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(sql, args)
    return await cur.fetchall()


async def _scalar(conn: Conn, sql: str, args: Any) -> Any:
    cur = conn.cursor(row_factory=scalar_row)
    await cur.execute(sql, args)
    return await cur.fetchone()


# --- events -----------------------------------------------------------------------------


async def events(
    conn: Conn, acc: str, state: str | None, channel_id: str | None, limit: int
) -> list[Row]:
    """Newest first; state `open` is every state but cleared."""
    sql = f"SELECT {EVENT_COLS} FROM events WHERE account_id = %s"
    args: list[Any] = [acc]
    if state == "open":
        sql += " AND state <> 'cleared'"
    elif state:
        sql += " AND state = %s"
        args.append(state)
    if channel_id:
        sql += " AND channel_id = %s"
        args.append(channel_id)
    sql += " ORDER BY started_at DESC LIMIT %s"
    args.append(limit)
    return await _all(conn, sql, args)


async def event(conn: Conn, acc: str, event_id: str) -> Row | None:
    return await _one(
        conn, f"SELECT {EVENT_COLS} FROM events WHERE id = %s AND account_id = %s", (event_id, acc)
    )


async def lock_channel_state(conn: Conn, channel_id: str) -> None:
    """The channel's alarm_state row, locked: the evaluator waits (one writer)."""
    await conn.execute("SELECT 1 FROM alarm_state WHERE channel_id = %s FOR UPDATE", (channel_id,))


async def reset_rule_state(conn: Conn, channel_id: str, rule_id: str) -> None:
    """A rule starts afresh after its event was closed by hand: no open event, and its
    state back to ok (its history kept)."""
    await conn.execute(
        "UPDATE alarm_state SET events = events - %s::text,"
        " rules = CASE WHEN rules ? %s::text THEN jsonb_set(rules, ARRAY[%s::text],"
        '   (rules -> %s::text) || \'{"status": "ok", "since": null,'
        '   "clear_since": null, "value": null}\'::jsonb) ELSE rules END'
        " WHERE channel_id = %s",
        (rule_id, rule_id, rule_id, rule_id, channel_id),
    )


# --- rules -------------------------------------------------------------------------------


async def insert_rule(conn: Conn, channel_id: str, kind: str, fields: dict[str, Any]) -> Row:
    cols = ["id", "channel_id", "kind", *fields]
    row = await _one(
        conn,
        f"INSERT INTO rules ({', '.join(cols)}) VALUES ({', '.join(['%s'] * len(cols))})"
        f" RETURNING {RULE_COLS}",
        [new_id("rul"), channel_id, kind, *fields.values()],
    )
    assert row is not None
    return row


async def rule(conn: Conn, acc: str, rule_id: str) -> Row | None:
    return await _one(
        conn,
        f"SELECT {', '.join('r.' + c.strip() for c in RULE_COLS.split(','))} FROM rules r"
        " JOIN channels c ON c.id = r.channel_id WHERE r.id = %s AND c.account_id = %s",
        (rule_id, acc),
    )


async def update_rule(conn: Conn, rule_id: str, fields: dict[str, Any]) -> None:
    for k, v in fields.items():  # keys are routes.rule_fields' own names, never the client's
        await conn.execute(f"UPDATE rules SET {k} = %s WHERE id = %s", (v, rule_id))


async def disable_rule(conn: Conn, rule_id: str) -> None:
    await conn.execute("UPDATE rules SET enabled = false WHERE id = %s", (rule_id,))


async def alarm_state(conn: Conn, channel_id: str) -> Row | None:
    """The channel's state as judged; None before its first judgement (its row comes
    with the channel, with no `last_ts` until a pass saves it)."""
    return await _one(
        conn,
        "SELECT status, last_ts, due_at, rules, events FROM alarm_state"
        " WHERE channel_id = %s AND last_ts IS NOT NULL",
        (channel_id,),
    )


async def channel_num(conn: Conn, channel_id: str) -> int:
    num = await _scalar(conn, "SELECT num FROM channels WHERE id = %s", (channel_id,))
    assert num is not None
    return int(num)


# --- recipients ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenTarget:
    """An email recipient found by the token of its link (confirm, unsubscribe)."""

    address: str
    account_id: str
    id: str


@dataclass(frozen=True)
class DeletedTarget:
    id: str
    path: str
    address: str
    site_id: str | None


async def targets(conn: Conn, acc: str) -> list[Row]:
    return await _all(
        conn,
        f"SELECT {TARGET_COLS} FROM notify_targets WHERE account_id = %s AND deleted_at IS NULL"
        " ORDER BY created_at, id",
        (acc,),
    )


async def room_for_target(conn: Conn, acc: str, cap: int) -> bool:
    """Whether the account may add one more recipient. Locks the account row, so
    concurrent additions are counted one after the other (call inside the transaction)."""
    await conn.execute("SELECT 1 FROM accounts WHERE id = %s FOR UPDATE", (acc,))
    n = await _scalar(
        conn,
        "SELECT count(*) FROM notify_targets WHERE account_id = %s AND deleted_at IS NULL",
        (acc,),
    )
    return n is not None and n < cap


async def insert_target(
    conn: Conn,
    acc: str,
    site: str | None,
    path: str,
    address: str,
    name: str,
    roles: list[str],
    secret: str | None,
    token: str | None,
) -> Row | None:
    """The new recipient, or None when the account has this address on this path."""
    return await _one(
        conn,
        "INSERT INTO notify_targets (id, account_id, site_id, path, address, name, roles,"
        " secret, token) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
        f" ON CONFLICT DO NOTHING RETURNING {TARGET_COLS}",
        (new_id("tgt"), acc, site, path, address, name, Jsonb(roles), secret, token),
    )


async def delete_target(conn: Conn, acc: str, target_id: str) -> DeletedTarget | None:
    cur = conn.cursor(row_factory=class_row(DeletedTarget))
    await cur.execute(
        "UPDATE notify_targets SET deleted_at = now() WHERE id = %s AND account_id = %s"
        " AND deleted_at IS NULL RETURNING id, path, address, site_id",
        (target_id, acc),
    )
    return await cur.fetchone()


async def address_of_token(conn: Conn, token: str) -> str | None:
    value: str | None = await _scalar(
        conn,
        "SELECT address FROM notify_targets WHERE token = %s AND path = 'email'"
        " AND deleted_at IS NULL",
        (token,),
    )
    return value


# What the two links do (routes.TOKEN_ACTIONS): a fixed statement each, never text
# from the request.
TOKEN_UPDATES = {
    "verify": "UPDATE notify_targets SET verified = true",
    "unsubscribe": "UPDATE notify_targets SET deleted_at = now()",
}


async def use_token(conn: Conn, action: str, token: str) -> TokenTarget | None:
    cur = conn.cursor(row_factory=class_row(TokenTarget))
    await cur.execute(
        TOKEN_UPDATES[action] + " WHERE token = %s AND path = 'email' AND deleted_at IS NULL"
        " RETURNING address, account_id, id",
        (token,),
    )
    return await cur.fetchone()


async def account_email(conn: Conn, acc: str) -> str | None:
    value: str | None = await _scalar(conn, "SELECT email FROM accounts WHERE id = %s", (acc,))
    return value


# --- Telegram ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinkCode:
    """What a used link code grants."""

    account_id: str
    site_id: str | None
    roles: list[str]


async def insert_link_code(
    conn: Conn, code: str, acc: str, site: str | None, roles: list[str], expires: datetime
) -> None:
    await conn.execute(
        "INSERT INTO telegram_link_codes (code, account_id, site_id, roles, expires_at)"
        " VALUES (%s, %s, %s, %s, %s)",
        (code, acc, site, Jsonb(roles), expires),
    )


async def use_link_code(conn: Conn, code: str, now: datetime) -> LinkCode | None:
    """The code, spent (once: a second use finds it used); None: unknown, used, expired."""
    cur = conn.cursor(row_factory=class_row(LinkCode))
    await cur.execute(
        "UPDATE telegram_link_codes SET used_at = %s WHERE code = %s AND used_at IS NULL"
        " AND expires_at > %s RETURNING account_id, site_id, roles",
        (now, code, now),
    )
    return await cur.fetchone()


async def insert_chat(conn: Conn, link: LinkCode, chat_id: str) -> str | None:
    """The new recipient's id; None: this chat is linked already (nothing changes)."""
    value: str | None = await _scalar(
        conn,
        "INSERT INTO notify_targets (id, account_id, site_id, path, address, roles, verified)"
        " VALUES (%s, %s, %s, 'telegram', %s, %s, true) ON CONFLICT DO NOTHING RETURNING id",
        (new_id("tgt"), link.account_id, link.site_id, chat_id, Jsonb(link.roles)),
    )
    return value


async def chat_event_account(conn: Conn, event_id: str, chat_id: str) -> str | None:
    """The event's account, if this chat is one of its recipients (may acknowledge)."""
    value: str | None = await _scalar(
        conn,
        "SELECT e.account_id FROM events e JOIN notify_targets t ON t.account_id = e.account_id"
        " WHERE e.id = %s AND t.path = 'telegram' AND t.address = %s AND t.deleted_at IS NULL",
        (event_id, chat_id),
    )
    return value


# --- escalation, silences, outbound log -----------------------------------------------------


async def escalation_steps(conn: Conn, site_id: str, lock: bool = False) -> list[Any] | None:
    """The site's steps; None: the default policy (outbox.DEFAULT_STEPS)."""
    sql = "SELECT steps FROM escalation_policies WHERE site_id = %s"
    value: list[Any] | None = await _scalar(conn, sql + (" FOR UPDATE" if lock else ""), (site_id,))
    return value


async def put_escalation(conn: Conn, site_id: str, steps: list[Any]) -> None:
    await conn.execute(
        "INSERT INTO escalation_policies (site_id, steps) VALUES (%s, %s)"
        " ON CONFLICT (site_id) DO UPDATE SET steps = excluded.steps, updated_at = now()",
        (site_id, Jsonb(steps)),
    )


async def silences(conn: Conn, acc: str) -> list[Row]:
    return await _all(
        conn,
        f"SELECT {SILENCE_COLS} FROM silences WHERE account_id = %s"
        " ORDER BY starts_at DESC LIMIT 500",
        (acc,),
    )


async def insert_silence(
    conn: Conn,
    acc: str,
    site: str | None,
    chan: str | None,
    start: datetime,
    end: datetime,
    reason: str | None,
) -> Row:
    row = await _one(
        conn,
        "INSERT INTO silences (id, account_id, site_id, channel_id, starts_at, ends_at,"
        f" reason) VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING {SILENCE_COLS}",
        (new_id("sil"), acc, site, chan, start, end, reason),
    )
    assert row is not None
    return row


async def outbound_log(conn: Conn, acc: str, limit: int) -> list[Row]:
    return await _all(
        conn,
        "SELECT id, path, target, event_id, kind, status, code, error, attempt, at"
        " FROM outbound_log WHERE account_id = %s ORDER BY at DESC, id DESC LIMIT %s",
        (acc, limit),
    )
