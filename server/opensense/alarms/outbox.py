"""Queueing notifications in the durable outbox (table `outbox`).

A row is one message for one recipient. `dedupe_key` (event, kind, recipient) is
unique, so no recipient is told the same thing twice about one event, however
often the engine replays. Escalation is rows due later (`due_at` = now + step
delay); an acknowledgement cancels the ones not sent yet. Rows commit in the
transaction of the event step that caused them, and a NOTIFY wakes the senders.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from psycopg import AsyncConnection
from psycopg.rows import dict_row, scalar_row
from psycopg.types.json import Jsonb

from ..api.jsonutil import rfc3339
from . import paths

DEFAULT_STEPS: list[dict[str, Any]] = [{"delay_min": 0, "to": "everyone"}]
STEP_TARGETS = ("on_shift", "manager", "everyone")
ROLES = ("shift", "out_of_hours", "manager")
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
TITLES = {
    "alarm_opened": "ALARM",
    "alarm_reminder": "STILL IN ALARM",
    "alarm_ack": "ACKNOWLEDGED",
    "alarm_cleared": "CLEARED",
    "device_offline": "OFFLINE",
    "device_online": "ONLINE",
    "test": "TEST",
    "path_failing": "DISPATCH FAILING",
}

CONTEXT_SQL = """
SELECT c.name AS channel_name, c.unit, d.name AS device_name, d.id AS device_id,
       s.id AS site_id, s.name AS site_name, s.timezone, s.opening_hours
FROM channels c JOIN devices d ON d.id = c.device_id JOIN sites s ON s.id = d.site_id
WHERE c.id = %s
"""


def in_opening_hours(hours: dict[str, Any], tz: str, t: datetime) -> bool:
    """`opening_hours` = {"mon": [["08:00", "18:00"]], ...} in the site's time zone.
    Empty: always open (everyone on shift)."""
    if not hours:
        return True
    local = t.astimezone(ZoneInfo(tz))
    hm = local.strftime("%H:%M")
    for span in hours.get(DAYS[local.weekday()], []) or []:
        if isinstance(span, list | tuple) and len(span) == 2 and span[0] <= hm < span[1]:
            return True
    return False


def _pick(targets: list[dict[str, Any]], to: Any, open_now: bool) -> list[dict[str, Any]]:
    people = [t for t in targets if paths.is_people(t["path"])]
    if isinstance(to, list):
        return [t for t in people if t["id"] in to]
    if to == "everyone":
        return people
    role = to if to != "on_shift" else ("shift" if open_now else "out_of_hours")
    chosen = [t for t in people if role in t["roles"]]
    if not chosen and to == "on_shift":  # nobody on call out of hours: the managers, then all
        chosen = [t for t in people if "manager" in t["roles"]] or people
    return chosen


def message(kind: str, ev: dict[str, Any] | None, ctx: dict[str, Any]) -> dict[str, Any]:
    """The payload every path renders from: subject, text, and the webhook data."""
    title = TITLES.get(kind, kind.upper())
    site, chan = ctx.get("site_name", ""), ctx.get("channel_name", "")
    subject = f"[{title}] {site} {chan}".strip()
    lines = [subject]
    data: dict[str, Any] = {}
    if ev is not None:
        unit = ctx.get("unit") or ""
        if ev.get("value") is not None:
            lines.append(f"value {ev['value']:g} {unit} ({ev['kind']} rule, {ev['severity']})")
        lines.append(f"since {rfc3339(ev['started_at'])}")
        if ev.get("acknowledged_by"):
            lines.append(f"acknowledged by {ev['acknowledged_by']}: {ev.get('ack_note') or ''}")
        if ev.get("cleared_at"):
            lines.append(f"cleared {rfc3339(ev['cleared_at'])}")
        data = {
            "event_id": ev["id"],
            "channel_id": ev["channel_id"],
            "device_id": ctx.get("device_id"),
            "site_id": ctx.get("site_id"),
            "kind": ev["kind"],
            "severity": ev["severity"],
            "state": ev["state"],
            "value": ev.get("value"),
            "started_at": rfc3339(ev["started_at"]),
            "alarm_at": rfc3339(ev["alarm_at"]) if ev.get("alarm_at") else None,
            "acknowledged_by": ev.get("acknowledged_by"),
            "ack_note": ev.get("ack_note"),
            "cleared_at": rfc3339(ev["cleared_at"]) if ev.get("cleared_at") else None,
        }
    return {
        "kind": kind,
        "subject": subject,
        "text": "\n".join(lines),
        "data": data,
        "site_id": ctx.get("site_id"),
        "ackable": kind in ("alarm_opened", "alarm_reminder") and ev is not None,
    }


async def _context(conn: AsyncConnection[Any], channel_id: str) -> dict[str, Any]:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(CONTEXT_SQL, (channel_id,))
    return await cur.fetchone() or {}


async def _targets(conn: AsyncConnection[Any], account_id: str, site_id: str | None) -> list[Any]:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(
        "SELECT id, path, roles FROM notify_targets WHERE account_id = %s AND deleted_at IS NULL"
        " AND (site_id IS NULL OR site_id = %s) ORDER BY id",
        (account_id, site_id),
    )
    return await cur.fetchall()


async def silenced(
    conn: AsyncConnection[Any],
    account_id: str,
    site_id: str | None,
    channel_id: str | None,
    now: datetime,
) -> bool:
    cur = await conn.execute(
        "SELECT 1 FROM silences WHERE account_id = %s AND starts_at <= %s AND ends_at > %s"
        " AND (site_id IS NULL OR site_id = %s) AND (channel_id IS NULL OR channel_id = %s) LIMIT 1",
        (account_id, now, now, site_id, channel_id),
    )
    return await cur.fetchone() is not None


async def put(
    conn: AsyncConnection[Any],
    *,
    account_id: str,
    target_id: str,
    event_id: str | None,
    kind: str,
    key: str,
    payload: dict[str, Any],
    due: datetime,
    status: str = "pending",
) -> None:
    await conn.execute(
        "INSERT INTO outbox (account_id, target_id, event_id, kind, dedupe_key, payload, due_at,"
        " status, channel_id) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
        " ON CONFLICT (dedupe_key) DO NOTHING",
        (
            account_id,
            target_id,
            event_id,
            kind,
            key,
            Jsonb(payload),
            due,
            status,
            (payload.get("data") or {}).get("channel_id"),
        ),  # fmt: skip
    )
    await conn.execute("SELECT pg_notify('opensense_outbox', '')")


async def enqueue_opened(
    conn: AsyncConnection[Any], ev: dict[str, Any], kind: str, now: datetime
) -> None:
    ctx = await _context(conn, ev["channel_id"])
    site_id = ctx.get("site_id")
    cur = conn.cursor(row_factory=scalar_row)
    await cur.execute("SELECT steps FROM escalation_policies WHERE site_id = %s", (site_id,))
    steps = await cur.fetchone()
    if steps is None:
        steps = DEFAULT_STEPS
    targets = await _targets(conn, ev["account_id"], site_id)
    quiet = await silenced(conn, ev["account_id"], site_id, ev["channel_id"], now)
    status = "silenced" if quiet else "pending"
    payload = message(kind, ev, ctx)
    local = await covered_locally(conn, ev, now) if kind == "alarm_opened" else None
    for t in targets:  # machines (webhooks) hear everything at once
        if not paths.is_people(t["path"]):
            await put(
                conn, account_id=ev["account_id"], target_id=t["id"], event_id=ev["id"], kind=kind,
                key=f"{ev['id']}:{kind}:{t['id']}", payload=payload, due=now, status=status,
            )  # fmt: skip
    for i, step in enumerate(steps):
        due = now + timedelta(minutes=float(step.get("delay_min", 0)))
        open_now = in_opening_hours(ctx.get("opening_hours") or {}, ctx.get("timezone", "UTC"), due)
        for t in _pick(targets, step.get("to", "everyone"), open_now):
            await put(
                conn, account_id=ev["account_id"], target_id=t["id"], event_id=ev["id"], kind=kind,
                key=f"{ev['id']}:{kind}:{t['id']}",
                payload={**payload, "step": i, **({"local_alert": local} if local else {})},
                due=due, status="local" if local and not quiet else status,
            )  # fmt: skip


# A local alert without a clear stands for people having been told for this long
# (docs/gateway.md): after that the server's alarm notifies again.
LOCAL_ALERT_TTL = timedelta(hours=24)


async def covered_locally(
    conn: AsyncConnection[Any], ev: dict[str, Any], now: datetime
) -> dict[str, Any] | None:
    """The site gateway's local alert that already told people of this alarm, if any.

    A gateway alerts locally while the server is out of reach and posts its local_alerts
    before it forwards the backlog (docs/gateway.md), so by the time the late readings
    open this event here, the row is in. Same channel (and rule, when the gateway names
    it), and the local alarm went off during this excursion (between its true start and
    its end): the people were woken once; they are not woken again for it. Webhooks (machines) still hear the event, so integrations keep the full record.
    Only alerts posted with the gateway's live token count (a rotated or deleted
    gateway's alerts do not), and one without a clear only for LOCAL_ALERT_TTL."""
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(
        "SELECT l.gateway_id, l.path, l.opened_at FROM local_alerts l"
        " JOIN gateways g ON g.id = l.gateway_id AND g.deleted_at IS NULL"
        " JOIN tokens t ON t.id = l.token_id AND t.revoked_at IS NULL"
        " WHERE l.channel_id = %s AND (l.rule_id IS NULL OR l.rule_id = %s)"
        " AND l.opened_at BETWEEN %s AND coalesce(%s, 'infinity'::timestamptz)"
        " AND (l.cleared_at IS NOT NULL OR l.opened_at > %s)"
        " ORDER BY l.opened_at LIMIT 1",
        (
            ev["channel_id"],
            ev.get("rule_id"),
            ev["started_at"],
            ev.get("cleared_at"),
            now - LOCAL_ALERT_TTL,
        ),
    )
    row = await cur.fetchone()
    if row is None:
        return None
    return {**row, "opened_at": row["opened_at"].isoformat()}


async def cancel_escalation(
    conn: AsyncConnection[Any], event_id: str, now: datetime, *, ack: bool
) -> None:
    """An acknowledgement stops every message not sent yet: someone knows. The end of
    an alarm stops the later steps only; the first one still goes out, so an excursion
    found in late (buffered) readings is reported even though it is over."""
    await conn.execute(
        "UPDATE outbox SET status = 'cancelled' WHERE event_id = %s AND status = 'pending'"
        " AND kind IN ('alarm_opened', 'alarm_reminder', 'device_offline')"
        " AND (%s OR due_at > %s)",
        (event_id, ack, now),
    )


async def _told(conn: AsyncConnection[Any], ev: dict[str, Any]) -> list[str]:
    """Who heard about this event (sent or still being tried), plus every machine
    (webhook)."""
    cur = conn.cursor(row_factory=scalar_row)
    await cur.execute(
        "SELECT DISTINCT o.target_id FROM outbox o WHERE o.event_id = %s"
        " AND o.status IN ('sent', 'pending', 'failed', 'digested')"
        " UNION SELECT id FROM notify_targets WHERE account_id = %s AND path = ANY(%s)"
        " AND deleted_at IS NULL ORDER BY 1",
        (ev["id"], ev["account_id"], paths.machine_paths()),
    )
    return list(await cur.fetchall())


async def enqueue_follow_up(
    conn: AsyncConnection[Any], ev: dict[str, Any], kind: str, now: datetime
) -> None:
    ctx = await _context(conn, ev["channel_id"])
    payload = message(kind, ev, ctx)
    quiet = await silenced(conn, ev["account_id"], ctx.get("site_id"), ev["channel_id"], now)
    for tid in await _told(conn, ev):
        await put(
            conn, account_id=ev["account_id"], target_id=tid, event_id=ev["id"], kind=kind,
            key=f"{ev['id']}:{kind}:{tid}", payload=payload, due=now,
            status="silenced" if quiet else "pending",
        )  # fmt: skip


async def enqueue_reminder(conn: AsyncConnection[Any], ev: dict[str, Any], now: datetime) -> None:
    ctx = await _context(conn, ev["channel_id"])
    payload = message("alarm_reminder", ev, ctx)
    quiet = await silenced(conn, ev["account_id"], ctx.get("site_id"), ev["channel_id"], now)
    stamp = rfc3339(ev["renotified_at"])
    for tid in await _told(conn, ev):
        await put(
            conn, account_id=ev["account_id"], target_id=tid, event_id=ev["id"],
            kind="alarm_reminder", key=f"{ev['id']}:alarm_reminder:{stamp}:{tid}",
            payload=payload, due=now, status="silenced" if quiet else "pending",
        )  # fmt: skip


async def silence_webhooks(conn: AsyncConnection[Any], now: datetime) -> int:
    """silence_opened when a silence begins, silence_closed when it ends: to every
    machine (webhook) of the account, once each (flags on the silence, in the same transaction)."""
    n = 0
    for kind, flag, at in (
        ("silence_opened", "opened_sent", "starts_at"),
        ("silence_closed", "closed_sent", "ends_at"),
    ):
        cur = conn.cursor(row_factory=dict_row)
        await cur.execute(
            f"UPDATE silences SET {flag} = true WHERE id IN (SELECT id FROM silences"
            f" WHERE NOT {flag} AND {at} <= %s ORDER BY id FOR UPDATE SKIP LOCKED LIMIT 500)"
            " RETURNING id, account_id, site_id, channel_id, starts_at, ends_at, reason",
            (now,),
        )
        for sil in await cur.fetchall():
            payload = {
                "kind": kind,
                "subject": f"[{kind}] {sil['reason']}",
                "text": sil["reason"],
                "data": {
                    "silence_id": sil["id"],
                    "site_id": sil["site_id"],
                    "channel_id": sil["channel_id"],
                    "from": rfc3339(sil["starts_at"]),
                    "to": rfc3339(sil["ends_at"]),
                    "reason": sil["reason"],
                },
                "site_id": sil["site_id"],
                "ackable": False,
            }
            tcur = await conn.execute(
                "SELECT id FROM notify_targets WHERE account_id = %s AND path = ANY(%s)"
                " AND deleted_at IS NULL ORDER BY id",
                (sil["account_id"], paths.machine_paths()),
            )
            for (tid,) in await tcur.fetchall():
                await put(
                    conn, account_id=sil["account_id"], target_id=tid, event_id=None, kind=kind,
                    key=f"{sil['id']}:{kind}:{tid}", payload=payload, due=now,
                )  # fmt: skip
                n += 1
    return n
