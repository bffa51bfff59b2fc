"""Every step of an event's life goes through `transition` — one function, so the
audit call (opensense.audit.record) can be added in exactly one place.

Steps: open (grace elapsed: the alarm), ack, clear (back in range after the clear
delay, or by a person with a note), renotify (acknowledged but still out of range),
offline/online (a device's connectivity), peak (a worse reading in an open alarm:
the event's worst `value` moves; no message, no audit row of its own — the clear's
audit row carries the final worst value). Each runs inside the caller's transaction
and queues its notifications in the outbox of that same transaction, so an event
and its messages commit together or not at all.

Audit: every real step (open, offline, ack, clear, online) writes one audit_log row
in the same transaction (opensense.audit.record; actor = the Change's actor, at = its
`now`, the injected clock). A replay that finds its event, an engine clear of an event
a person already cleared, and reminders (renotify: a message, in outbound_log) write
none. audit.record takes a per-account advisory lock until commit; to keep every lock
on rows before any audit lock (no deadlock with the API or another evaluator), the
evaluator passes `pending` and writes the rows once, at the end of its pass, sorted by
account (`write_audit`). A single step (the API, the Telegram button) writes at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from psycopg import AsyncConnection
from psycopg.pq import TransactionStatus
from psycopg.rows import dict_row

from .. import audit
from ..errors import ApiError
from ..ids import new_id
from . import outbox

ACTIONS = ("open", "ack", "clear", "renotify", "offline", "online", "peak")
# the audit_log action of each audited step (docs/audit.md)
AUDIT_ACTIONS = {
    "open": "alarm.open",
    "offline": "device.offline",
    "ack": "alarm.ack",
    "clear": "alarm.clear",
    "online": "device.online",
}


@dataclass(frozen=True)
class AuditEntry:
    account_id: str
    actor: str
    action: str
    subject: str
    data: dict[str, Any]
    at: datetime


@dataclass
class Change:
    action: str
    at: datetime  # the true time of the step
    now: datetime  # wall clock (for scheduling messages)
    account_id: str = ""
    event_id: str | None = None
    channel_id: str | None = None
    device_id: str | None = None
    rule_id: str | None = None
    kind: str = ""
    severity: str = "alarm"
    started_at: datetime | None = None
    value: float | None = None
    actor: str = "system"
    note: dict[str, str | None] = field(default_factory=dict)  # note, cause, action, product
    via: str | None = None  # what carried a person's step: the API token id, the chat


def _iso(t: Any) -> Any:
    return audit.trail.iso(t) if isinstance(t, datetime) else t


def _entry(ch: Change, ev: dict[str, Any]) -> AuditEntry:
    data: dict[str, Any] = {
        "channel_id": ev.get("channel_id"),
        "device_id": ev.get("device_id"),
        "rule_id": ev.get("rule_id"),
        "kind": ev.get("kind"),
        "at": _iso(ch.at),
    }
    if ch.action in ("open", "offline"):
        data.update(
            severity=ev.get("severity"),
            started_at=_iso(ev.get("started_at")),
            value=ev.get("value"),
        )
    elif ch.action == "clear" and ch.value is not None:
        data["value"] = ch.value
    if ch.action in ("ack", "clear") and ch.actor != "system":
        data["by"] = ch.actor
        data.update({k: v for k, v in ch.note.items() if v is not None})
        if ch.via:
            data["via"] = ch.via
    return AuditEntry(
        account_id=str(ev["account_id"]),
        actor=ch.actor,
        action=AUDIT_ACTIONS[ch.action],
        subject=str(ev["id"]),
        data=data,
        at=ch.now,
    )


async def write_audit(conn: AsyncConnection[Any], pending: list[AuditEntry]) -> None:
    """The pass's audit rows, inside its transaction, one account after another (a
    stable sort: each account's rows stay in the order of its steps)."""
    for e in sorted(pending, key=lambda e: e.account_id):
        await audit.record(
            conn,
            account_id=e.account_id,
            actor=e.actor,
            action=e.action,
            subject=e.subject,
            data=e.data,
            at=e.at,
        )
    pending.clear()


async def _audit(
    conn: AsyncConnection[Any],
    ch: Change,
    ev: dict[str, Any],
    pending: list[AuditEntry] | None,
) -> None:
    e = _entry(ch, ev)
    if pending is not None:
        pending.append(e)
    else:
        await write_audit(conn, [e])


async def transition(
    conn: AsyncConnection[Any], ch: Change, pending: list[AuditEntry] | None = None
) -> dict[str, Any]:
    """Apply one lifecycle step; returns the event row. Idempotent for the engine's
    steps (an alarm replayed from the same readings finds its event). Runs inside the
    caller's transaction (its audit row needs one). With `pending`, the audit row is
    queued there for `write_audit` at the end of the caller's transaction."""
    assert ch.action in ACTIONS, ch.action
    if conn.info.transaction_status != TransactionStatus.INTRANS:
        raise RuntimeError("lifecycle.transition runs inside the caller's transaction")
    cur = conn.cursor(row_factory=dict_row)
    if ch.action in ("open", "offline"):
        await cur.execute(
            "INSERT INTO events (id, account_id, channel_id, rule_id, kind, severity, state,"
            " started_at, alarm_at, value, device_id)"
            " VALUES (%s, %s, %s, %s, %s, %s, 'alarm', %s, %s, %s, %s)"
            " ON CONFLICT (rule_id, started_at) WHERE rule_id IS NOT NULL DO NOTHING"
            " RETURNING *",
            (
                new_id("evt"),
                ch.account_id,
                ch.channel_id,
                ch.rule_id,
                ch.kind,
                ch.severity,
                ch.started_at or ch.at,
                ch.at,
                ch.value,
                ch.device_id,
            ),
        )
        ev = await cur.fetchone()
        if ev is None:  # replayed: the event exists already
            await cur.execute(
                "SELECT * FROM events WHERE rule_id = %s AND started_at = %s",
                (ch.rule_id, ch.started_at or ch.at),
            )
            found = await cur.fetchone()
            assert found is not None
            if ch.value is not None and found["value"] != ch.value:
                # late readings inside grace: the replay knows the true worst so far
                await cur.execute(
                    "UPDATE events SET value = %s WHERE id = %s RETURNING *",
                    (ch.value, found["id"]),
                )
                found = await cur.fetchone()
                assert found is not None
            return found
        await outbox.enqueue_opened(
            conn, ev, "device_offline" if ch.action == "offline" else "alarm_opened", ch.now
        )
        await _audit(conn, ch, ev, pending)
        return ev

    assert ch.event_id is not None
    await cur.execute("SELECT * FROM events WHERE id = %s FOR UPDATE", (ch.event_id,))
    ev = await cur.fetchone()
    if ev is None or (ch.account_id and ev["account_id"] != ch.account_id):
        raise ApiError("event_not_found", f"no event {ch.event_id[:40]!r} in this account")

    if ch.action == "ack":
        if ev["acknowledged_at"] is not None:
            raise ApiError("event_state", "this event was acknowledged already")
        await cur.execute(
            "UPDATE events SET acknowledged_at = %s, acknowledged_by = %s, ack_note = %s,"
            " ack_cause = %s, ack_action = %s, ack_product = %s,"
            " state = CASE WHEN state = 'cleared' THEN state ELSE 'acknowledged' END"
            " WHERE id = %s RETURNING *",
            (
                ch.at,
                ch.actor,
                ch.note.get("note"),
                ch.note.get("cause"),
                ch.note.get("action"),
                ch.note.get("product"),
                ev["id"],
            ),
        )
        ev = await cur.fetchone()
        assert ev is not None
        await outbox.cancel_escalation(conn, ev["id"], ch.now, ack=True)
        await outbox.enqueue_follow_up(conn, ev, "alarm_ack", ch.now)
        await _audit(conn, ch, ev, pending)
        return ev

    if ch.action in ("clear", "online"):
        if ev["state"] == "cleared":
            if ch.actor != "system":
                raise ApiError("event_state", "this event was cleared already")
            return ev
        await cur.execute(
            "UPDATE events SET state = 'cleared', cleared_at = %s, cleared_by = %s,"
            " clear_note = %s WHERE id = %s RETURNING *",
            (ch.at, ch.actor, ch.note.get("note"), ev["id"]),
        )
        ev = await cur.fetchone()
        assert ev is not None
        await outbox.cancel_escalation(conn, ev["id"], ch.now, ack=False)
        kind = "device_online" if ch.action == "online" else "alarm_cleared"
        await outbox.enqueue_follow_up(conn, ev, kind, ch.now)
        await _audit(conn, ch, ev, pending)
        return ev

    if ch.action == "peak":
        if ev["cleared_at"] is None or ev["cleared_at"] >= ch.at:
            await cur.execute(
                "UPDATE events SET value = %s WHERE id = %s RETURNING *", (ch.value, ev["id"])
            )
            ev = await cur.fetchone()
            assert ev is not None
        return ev

    # renotify
    await cur.execute(
        "UPDATE events SET renotified_at = %s WHERE id = %s RETURNING *", (ch.at, ev["id"])
    )
    ev = await cur.fetchone()
    assert ev is not None
    await outbox.enqueue_reminder(conn, ev, ch.now)
    return ev
