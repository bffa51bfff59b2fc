"""The daily email digest (the `daily_digest` job in jobs.py; docs/alarms.md, "Daily
digest").

Once a day every confirmed email recipient gets one plain-text email about the day
before: per site in its scope (all the account's sites, or its one site), each
measurement channel's min / max / mean from the 5-minute rollups, the alarm events
opened, acknowledged or cleared that day with their notes, the devices that were
offline, and how many notifications about the site's events were delivered.

The day is a calendar day D; each site's part covers D from 00:00 to 24:00 in the
site's time zone, and the digest of D goes out once it is `daily_digest_hour`
(07:00) on D + 1 in every site of the recipient's scope. Only the latest due day is
sent (after a long outage the missed days are not sent late), and a recipient added
after a digest's sending time does not get that one.

Once per recipient and day: `plan` inserts one `digest_mail` row per (recipient,
day) (its primary key), `send_due` claims each with FOR UPDATE SKIP LOCKED and
keeps it locked while sending, so several processes never send it twice; a crash
mid-send rolls the claim back and it goes out after the restart (at-least-once for
the one in-flight mail, as the outbox). The mail goes through `paths.send_email`
with the recipient's unsubscribe link; a recipient that unsubscribed or is no longer
confirmed when its turn comes is dropped. The relay's temporary refusals are retried
with backoff, at most MAIL_ATTEMPTS times; every attempt is in `outbound_log`.
"""

from __future__ import annotations

import logging
from datetime import date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from psycopg import AsyncConnection
from psycopg.rows import dict_row

from ..reports import load
from ..settings import Config
from ..storage import rollups
from . import paths
from .dispatch import _log

log = logging.getLogger(__name__)

KIND = "daily_digest"
PATH = "email"  # the digest is an email: sent through paths.send_email
MAIL_ATTEMPTS = 8
MAIL_BACKOFF = timedelta(minutes=5)
BATCH = 200  # digests one job run sends at most; the next run goes on
EVENTS_MAX = 50  # alarm events listed per site; the rest are counted


def due_day(now: datetime, tz: str, hour: int) -> date:
    """The latest day whose digest is due at `now` for a site in `tz`: day D's goes
    out at `hour`:00 site time on D + 1 (wall-clock arithmetic: DST-proof)."""
    local = now.astimezone(ZoneInfo(tz))
    return (local - timedelta(hours=hour)).date() - timedelta(days=1)


def send_time(day: date, tz: str, hour: int) -> datetime:
    return datetime.combine(day + timedelta(days=1), time(hour), tzinfo=ZoneInfo(tz))


def day_bounds(day: date, tz: str) -> tuple[datetime, datetime]:
    z = ZoneInfo(tz)
    return (
        datetime.combine(day, time(0), tzinfo=z),
        datetime.combine(day + timedelta(days=1), time(0), tzinfo=z),
    )


async def plan(conn: AsyncConnection[Any], cfg: Config, now: datetime) -> int:
    """One pending digest per confirmed email recipient for its latest due day."""
    cur = await conn.execute(
        "SELECT t.id, t.account_id, t.created_at, array_agg(DISTINCT s.timezone)"
        " FROM notify_targets t JOIN sites s ON s.account_id = t.account_id"
        " AND (t.site_id IS NULL OR s.id = t.site_id)"
        " WHERE t.path = %s AND t.verified AND t.deleted_at IS NULL"
        " GROUP BY t.id, t.account_id, t.created_at ORDER BY t.id",
        (PATH,),
    )
    ids: list[str] = []
    accounts: list[str] = []
    days: list[date] = []
    for tid, acc, created, tzs in await cur.fetchall():
        try:
            day = min(due_day(now, tz, cfg.daily_digest_hour) for tz in tzs)
            last = max(send_time(day, tz, cfg.daily_digest_hour) for tz in tzs)
        except (ZoneInfoNotFoundError, ValueError):  # a zone stored before it was checked
            log.warning("recipient %s: a site's time zone is not known; no digest", tid)
            continue
        if created > last:
            continue  # added after this digest's time: its first is the next day's
        ids.append(tid)
        accounts.append(acc)
        days.append(day)
    if not ids:
        return 0
    ins = await conn.execute(
        "INSERT INTO digest_mail (target_id, day, account_id, next_at)"
        " SELECT t, d, a, %s FROM unnest(%s::text[], %s::date[], %s::text[]) AS u(t, d, a)"
        " ORDER BY t ON CONFLICT DO NOTHING",
        (now, ids, days, accounts),
    )
    return ins.rowcount


def _num(v: float) -> str:
    return f"{v:.2f}"


def _at(t: datetime | None, tz: str, day: date) -> str:
    """A time of the site's day as HH:MM, with its date when on another day."""
    if t is None:
        return ""
    local = t.astimezone(ZoneInfo(tz))
    return local.strftime("%H:%M") if local.date() == day else local.strftime("%Y-%m-%d %H:%M")


def _in(t: datetime | None, start: datetime, end: datetime) -> bool:
    return t is not None and start <= t < end


EVENTS_SQL = """
SELECT e.id, e.kind, e.severity, e.value, e.started_at, e.alarm_at, e.acknowledged_at,
       e.acknowledged_by, e.ack_note, e.ack_cause, e.ack_action, e.ack_product,
       e.cleared_at, e.cleared_by, e.clear_note, c.unit, d.name || ' · ' || c.name AS label
FROM events e JOIN channels c ON c.id = e.channel_id JOIN devices d ON d.id = c.device_id
WHERE e.account_id = %(acc)s AND d.site_id = %(site)s AND e.kind <> 'device_offline'
  AND (coalesce(e.alarm_at, e.started_at) >= %(start)s AND coalesce(e.alarm_at, e.started_at) < %(end)s
       OR e.acknowledged_at >= %(start)s AND e.acknowledged_at < %(end)s
       OR e.cleared_at >= %(start)s AND e.cleared_at < %(end)s)
ORDER BY coalesce(e.alarm_at, e.started_at), e.id
"""

OFFLINE_SQL = """
SELECT d.name, e.started_at, e.cleared_at
FROM events e JOIN devices d ON d.id = e.device_id
WHERE e.account_id = %(acc)s AND d.site_id = %(site)s AND e.kind = 'device_offline'
  AND e.started_at < %(end)s AND (e.cleared_at IS NULL OR e.cleared_at >= %(start)s)
ORDER BY d.name, e.started_at
"""

# delivered notifications about the site's events (the digests themselves excluded)
SENT_SQL = """
SELECT count(*) FROM outbound_log l JOIN events e ON e.id = l.event_id
JOIN channels c ON c.id = e.channel_id JOIN devices d ON d.id = c.device_id
WHERE l.account_id = %(acc)s AND l.at >= %(start)s AND l.at < %(end)s AND l.status = 'ok'
  AND l.kind <> %(kind)s AND d.site_id = %(site)s
"""


def _event_line(e: dict[str, Any], tz: str, day: date, start: datetime, end: datetime) -> str:
    unit = f" {e['unit']}" if e["unit"] else ""
    worst = f", worst {_num(e['value'])}{unit}" if e["value"] is not None else ""
    opened = e["alarm_at"] or e["started_at"]
    parts = [f"{e['label']}: {e['kind']} {e['severity']}{worst}"]
    parts.append(
        f"opened {_at(opened, tz, day)}" + ("" if _in(opened, start, end) else " (before)")
    )
    if e["acknowledged_at"] is not None:
        ack = f"acknowledged {_at(e['acknowledged_at'], tz, day)} by {e['acknowledged_by'] or '?'}"
        if e["ack_note"]:
            ack += f': "{e["ack_note"]}"'
        extra = [
            f"{name}: {e[col]}"
            for name, col in (
                ("cause", "ack_cause"),
                ("action", "ack_action"),
                ("product", "ack_product"),
            )  # fmt: skip
            if e[col]
        ]
        if extra:
            ack += f" ({'; '.join(extra)})"
        parts.append(ack)
    if e["cleared_at"] is not None:
        clr = f"cleared {_at(e['cleared_at'], tz, day)} by {e['cleared_by'] or '?'}"
        if e["clear_note"]:
            clr += f': "{e["clear_note"]}"'
        parts.append(clr)
    else:
        parts.append("still open")
    return "- " + "; ".join(parts)


async def site_section(
    conn: AsyncConnection[Any], acc: str, site: dict[str, Any], day: date
) -> tuple[list[str], int]:
    """One site's part of day `day`'s digest (its lines) and its alarm event count."""
    tz = site["timezone"]
    start, end = day_bounds(day, tz)
    q = {"acc": acc, "site": site["id"], "start": start, "end": end, "kind": KIND}
    lines = [f"== {site['name']} ({day.isoformat()}, {tz}) =="]
    chans = await load.channels(conn, site["id"])
    cur = await conn.execute(
        "SELECT channel_num, min(vmin), max(vmax), sum(vsum) / sum(n), sum(n)"
        f" FROM ({rollups.buckets_sql('5m')}) b GROUP BY channel_num",
        rollups.buckets_params([c.num for c in chans], start, end),
    )
    stats = {r[0]: r[1:] for r in await cur.fetchall()}
    lines.append("Channels (min / max / mean):")
    for c in chans:
        unit = f" {c.unit}" if c.unit else ""
        if c.num in stats:
            lo, hi, mean, n = stats[c.num]
            lines.append(f"- {c.name}: {_num(lo)} / {_num(hi)} / {_num(mean)}{unit} ({n} readings)")
        else:
            lines.append(f"- {c.name}: no readings")
    if not chans:
        lines.append("- none")
    ev = conn.cursor(row_factory=dict_row)
    await ev.execute(EVENTS_SQL, q)
    events = await ev.fetchall()
    lines.append(f"Alarm events: {len(events) or 'none'}")
    lines += [_event_line(e, tz, day, start, end) for e in events[:EVENTS_MAX]]
    if len(events) > EVENTS_MAX:
        lines.append(f"- … and {len(events) - EVENTS_MAX} more")
    cur = await conn.execute(OFFLINE_SQL, q)
    offline = await cur.fetchall()
    lines.append(f"Devices offline: {len(offline) or 'none'}")
    for name, since, back in offline[:EVENTS_MAX]:
        lines.append(
            f"- {name}: offline from {_at(since, tz, day)}, "
            + (f"back {_at(back, tz, day)}" if back else "still offline")
        )
    cur = await conn.execute(SENT_SQL, q)
    sent = await cur.fetchone()
    lines.append(f"Notifications sent: {sent[0] if sent else 0}")
    return lines, len(events)


async def compose(
    conn: AsyncConnection[Any],
    r: dict[str, Any],
    cache: dict[tuple[str, date], tuple[list[str], int]],
) -> dict[str, Any]:
    """The digest of day `r["day"]` for recipient `r` (its account, its site scope)."""
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(
        "SELECT id, name, timezone FROM sites WHERE account_id = %s"
        " AND (%s::text IS NULL OR id = %s) ORDER BY name, id",
        (r["account_id"], r["site_id"], r["site_id"]),
    )
    day: date = r["day"]
    body = [f"OpenSense daily digest for {day.isoformat()}", ""]
    alarms = 0
    for site in await cur.fetchall():
        key = (site["id"], day)
        if key not in cache:
            cache[key] = await site_section(conn, r["account_id"], site, day)
        lines, n = cache[key]
        body += [*lines, ""]
        alarms += n
    return {
        "kind": KIND,
        "subject": f"[OpenSense] Daily digest {day.isoformat()}: {alarms} alarm event(s)",
        "text": "\n".join(body).rstrip() + "\n",
    }


CLAIM_SQL = """
SELECT m.target_id, m.day, m.account_id, m.attempts, t.address, t.token, t.site_id,
       t.verified, t.deleted_at
FROM digest_mail m JOIN notify_targets t ON t.id = m.target_id
WHERE m.status = 'pending' AND m.next_at <= %s
ORDER BY m.next_at, m.target_id LIMIT 1
FOR UPDATE OF m SKIP LOCKED
"""


async def _send(
    conn: AsyncConnection[Any],
    cfg: Config,
    r: dict[str, Any],
    cache: dict[tuple[str, date], tuple[list[str], int]],
) -> paths.Outcome:
    if r["deleted_at"] is not None:
        return paths.Outcome("dropped", None, "recipient removed (unsubscribed)")
    if not r["verified"]:
        return paths.Outcome("dropped", None, "the recipient has not confirmed yet")
    try:
        async with conn.transaction():  # a savepoint: a failing query spoils this row only
            msg = await compose(conn, r, cache)
    except Exception as exc:
        log.exception("composing the digest of %s for %s failed", r["day"], r["target_id"])
        return paths.Outcome("retry", None, f"internal error: {type(exc).__name__}", internal=True)
    return await paths.send_email(cfg, r["address"], msg, r["token"])


async def _settle(
    conn: AsyncConnection[Any], r: dict[str, Any], o: paths.Outcome, now: datetime
) -> str:
    attempt = r["attempts"] + 1
    if o.status == "ok":
        status, nxt = "sent", now
    elif o.status == "retry" and attempt < MAIL_ATTEMPTS:
        status, nxt = "pending", now + MAIL_BACKOFF * 2 ** r["attempts"]
    else:
        status, nxt = ("dropped" if o.status == "dropped" else "failed"), now
    await conn.execute(
        "UPDATE digest_mail SET status = %s, attempts = %s, next_at = %s, error = %s,"
        " sent_at = %s WHERE target_id = %s AND day = %s",
        (status, attempt, nxt, None if o.status == "ok" else (o.error or o.status)[:300],
         now if status == "sent" else None, r["target_id"], r["day"]),
    )  # fmt: skip
    final = "quarantined" if status == "failed" and o.status != "dropped" else None
    await _log(conn, r["account_id"], PATH, r["address"], None, KIND, o, attempt, now, status=final)
    return status


async def send_due(conn: AsyncConnection[Any], cfg: Config, now: datetime) -> dict[str, int]:
    """Send the due digests one by one, each claimed and settled in its own
    transaction (the connection is in autocommit mode, as the pool's are)."""
    counts = {"sent": 0, "pending": 0, "failed": 0, "dropped": 0}
    cache: dict[tuple[str, date], tuple[list[str], int]] = {}
    for _ in range(BATCH):
        async with conn.transaction():
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(CLAIM_SQL, (now,))
            r = await cur.fetchone()
            if r is None:
                break
            o = await _send(conn, cfg, r, cache)
            counts[await _settle(conn, r, o, now)] += 1
    return counts


async def run(conn: AsyncConnection[Any], cfg: Config, now: datetime) -> str:
    """The job: plan each recipient's latest due digest, send what is due."""
    if not cfg.daily_digest:
        return "skipped: OPENSENSE_DAILY_DIGEST is off"
    planned = await plan(conn, cfg, now)
    c = await send_due(conn, cfg, now)
    return (
        f"{planned} digest(s) planned; {c['sent']} sent, {c['pending']} to retry, "
        f"{c['dropped']} dropped, {c['failed']} failed"
    )
