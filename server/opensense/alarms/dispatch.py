"""Sending what the outbox holds.

Rows due now are claimed with FOR UPDATE SKIP LOCKED and stay locked while they
are sent, so with several server processes each message goes out once; a crash
mid-send rolls the claim back and the row is sent after the restart. Every
attempt is written to `outbound_log` (kept 90 days by the retention job).

Pacing per recipient is its path's (`paths.PATHS`, as docs/product.md#notifications sets it): a
Telegram chat gets at most one message per 10 s — what piles up meanwhile goes out
as one grouped message (a "queue overflow" summary when the oldest waited more than
2 min); an email recipient gets at most 10 messages an hour, the rest as one digest.
Nothing here names a path: what a path does differently is a field of its entry. Several rows
due together for one recipient are grouped by site into one message
(Alertmanager-style: a storm is one message, not fifty).

One bad row never holds the others: a send never raises (`_attempt` turns any
exception into an Outcome) and each group is settled in its own savepoint, so a
row whose data cannot be sent (a URL without a valid host, a CR/LF in an address,
stored before those were refused at save) is settled alone, and rows already sent
are never rolled back and sent again. A row that cannot be sent as stored is
quarantined at once; one that keeps failing is quarantined after MAX_ATTEMPTS
(INTERNAL_MAX for unexpected errors): outbox status `failed`, an outbound_log row
with status `quarantined` the tenant sees.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import defaultdict
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import aiohttp
from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from ..settings import Config
from ..status import probes
from . import paths
from .outbox import message, put
from .paths import Outcome

log = logging.getLogger(__name__)

OVERFLOW_AFTER = timedelta(minutes=2)
MAX_ATTEMPTS = 20
INTERNAL_MAX = 3  # an unexpected exception is most likely the row itself: give up sooner
FAILING_AFTER = timedelta(minutes=5)

CLAIM_SQL = """
SELECT o.id, o.account_id, o.target_id, o.event_id, o.kind, o.payload, o.attempts,
       o.created_at, o.channel_id, t.path, t.address, t.secret, t.deleted_at, t.verified,
       t.token
FROM outbox o JOIN notify_targets t ON t.id = o.target_id
WHERE o.status = 'pending' AND o.due_at <= %s
ORDER BY o.due_at, o.id LIMIT %s
FOR UPDATE OF o SKIP LOCKED
"""


def _backoff(attempts: int) -> timedelta:
    return timedelta(seconds=min(600, 15 * 2 ** max(0, attempts - 1)))


def _retry_delay(retry_after: float | None, attempt: int) -> timedelta:
    """The far end's Retry-After when it is a sane number of seconds (a remote may
    answer "nan" or 10**20), bounded to an hour; otherwise the backoff."""
    if retry_after is None or not math.isfinite(retry_after) or retry_after <= 0:
        return _backoff(attempt)
    return timedelta(seconds=min(retry_after, 3600.0))


def group_text(rows: list[dict[str, Any]], now: datetime) -> dict[str, Any]:
    """One message for several: grouped by site, oldest first."""
    overflow = now - min(r["created_at"] for r in rows) > OVERFLOW_AFTER
    head = f"{'Queue overflow: ' if overflow else ''}{len(rows)} notifications"
    by_site: dict[str, list[str]] = defaultdict(list)
    for r in sorted(rows, key=lambda r: r["created_at"]):
        by_site[r["payload"].get("site_id") or ""].append(r["payload"]["subject"])
    lines = [head]
    for subjects in by_site.values():
        lines.extend(f"- {s}" for s in subjects)
    return {
        "kind": "digest",
        "subject": f"[OpenSense] {head}",
        "text": "\n".join(lines),
        "data": {},
        "ackable": False,
    }


def log_status(o: Outcome) -> str:
    """The outbound_log status of one attempt (docs/alarms.md): `failed` is the path's
    failure, `rejected` the recipient's side (retried either way)."""
    if o.status in ("ok", "dropped"):
        return o.status
    if o.status == "invalid":
        return "quarantined"
    return "rejected" if o.scope == "recipient" else "failed"


def _clean(text: str | None) -> str | None:
    """Error text as stored: no NUL (PostgreSQL refuses it), bounded."""
    return None if text is None else text.replace("\x00", " ")[:300]


async def _log(
    conn: AsyncConnection[Any],
    account_id: str | None,
    path: str,
    target: str,
    event_id: str | None,
    kind: str,
    o: Outcome,
    attempt: int,
    now: datetime,
    status: str | None = None,
) -> None:
    await conn.execute(
        "INSERT INTO outbound_log (account_id, path, target, event_id, kind, status, code, error, attempt, at)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (account_id, path, target[:500], event_id, kind, status or log_status(o), o.code,
         _clean(o.error), attempt, now),
    )  # fmt: skip


async def send_one(
    session: aiohttp.ClientSession,
    cfg: Config,
    path: str,
    address: str,
    secret: str | None,
    delivery_id: str,
    msg: dict[str, Any],
    now: datetime,
) -> Outcome:
    p = paths.PATHS.get(path)
    if p is None:  # stored by hand or by a release that had it: never sendable here
        return Outcome("invalid", None, f"not sendable: no notification path {path[:40]!r}")
    return await p.send(paths.Send(session, cfg, address, secret, delivery_id, msg, now))


async def _attempt(
    session: aiohttp.ClientSession,
    cfg: Config,
    grp: list[dict[str, Any]],
    make: Callable[[], dict[str, Any]],
    delivery_id: str,
    now: datetime,
) -> Outcome:
    """One send that never raises: whatever the stored row holds, the outcome settles
    it (an escaping exception would roll back the whole claimed batch, every account's
    rows, and send the ones already out again at the next pass)."""
    first = grp[0]
    try:
        msg = make()
        if first["kind"] == "recipient_left":  # to the account's owner, not the recipient
            return await paths.send_email(cfg, str(first["payload"]["to"]), msg)
        return await send_one(
            session, cfg, first["path"], first["address"], _secret(first), delivery_id, msg, now
        )
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        log.exception("sending outbox row %s failed unexpectedly", first.get("id"))
        # the row's own data is the likely cause: counted as this recipient's failure
        return Outcome(
            "retry", None, f"internal error: {type(exc).__name__}", scope="recipient", internal=True
        )


async def dispatch_due(
    pool: AsyncConnectionPool, cfg: Config, session: aiohttp.ClientSession, limit: int = 100
) -> int:
    """Send one batch of due rows; returns how many rows were settled or moved."""
    now = cfg.clock()
    async with pool.connection() as conn, conn.transaction():
        cur = conn.cursor(row_factory=dict_row)
        await cur.execute(CLAIM_SQL, (now, limit))
        rows = await cur.fetchall()
        if not rows:
            return 0
        rows = await _hold_per_channel(conn, rows, now, cfg.notify_channel_interval_s)
        sends: list[tuple[list[dict[str, Any]], Callable[[], dict[str, Any]], str]] = []
        groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in rows:
            if r["kind"] == "recipient_left":  # the owner's notice: whatever the target's state
                sends.append(([r], _payload(r), f"dlv_{r['id']}"))
            else:
                groups[r["target_id"]].append(r)
        await cur.execute(
            "SELECT * FROM target_pacing WHERE target_id = ANY(%s) ORDER BY target_id FOR UPDATE",
            (sorted(groups),),
        )
        pacing = {p["target_id"]: p for p in await cur.fetchall()}
        for tid, grp in groups.items():
            first = grp[0]
            if _verify(first["path"]) and not first["verified"]:
                held = [r for r in grp if r["kind"] != "verify"]
                for r in held:  # double opt-in: nothing but the confirmation goes out
                    o = Outcome("dropped", None, "the recipient has not confirmed yet")
                    await _settle_alone(conn, [r], o, now)
                grp = [r for r in grp if r["kind"] == "verify"]
                if not grp:
                    continue
                first = grp[0]
            if first["deleted_at"] is not None:
                await conn.execute(
                    "UPDATE outbox SET status = 'dropped', last_error = 'recipient removed'"
                    " WHERE id = ANY(%s)",
                    ([r["id"] for r in grp],),
                )
                continue
            p = pacing.get(tid)
            wait = _paced_until(first["path"], p, now)
            if wait is not None:
                await conn.execute(
                    "UPDATE outbox SET due_at = %s WHERE id = ANY(%s)",
                    (wait, [r["id"] for r in grp]),
                )
                continue
            if not paths.is_people(first["path"]) or len(grp) == 1:
                for r in grp:
                    sends.append(([r], _payload(r), f"dlv_{r['id']}"))
            else:
                sends.append((grp, _grouped(grp, now), f"dlv_{grp[0]['id']}"))
        outcomes = await asyncio.gather(
            *(_attempt(session, cfg, g, make, d, now) for g, make, d in sends)
        )
        for (grp, _make, _d), o in zip(sends, outcomes, strict=True):
            await _settle_alone(conn, grp, o, now)
        return len(rows)


def _payload(r: dict[str, Any]) -> Callable[[], dict[str, Any]]:
    return lambda: r["payload"]


def _grouped(grp: list[dict[str, Any]], now: datetime) -> Callable[[], dict[str, Any]]:
    return lambda: group_text(grp, now)


async def _settle_alone(
    conn: AsyncConnection[Any], grp: list[dict[str, Any]], o: Outcome, now: datetime
) -> None:
    """Settle one send in its own savepoint: a failure here costs this group only. If
    even that fails, the rows are quarantined without their log detail (never left
    pending to be sent again)."""
    try:
        async with conn.transaction():
            await _settle(conn, grp, o, now)
    except Exception:
        log.exception("settling outbox rows %s failed", [r["id"] for r in grp])
        async with conn.transaction():
            await conn.execute(
                "UPDATE outbox SET status = 'failed', attempts = attempts + 1,"
                " last_error = 'quarantined: the attempt could not be recorded' WHERE id = ANY(%s)",
                ([r["id"] for r in grp],),
            )


async def _hold_per_channel(
    conn: AsyncConnection[Any], rows: list[dict[str, Any]], now: datetime, interval_s: int
) -> list[dict[str, Any]]:
    """Per-channel minimum interval: a person hears of a new alarm on one channel at
    most once per `interval_s`; a later one waits until then (and is grouped with
    whatever else is due). Webhooks are machines and get every event."""
    keys = {
        (r["target_id"], r["channel_id"])
        for r in rows
        if r["kind"] == "alarm_opened" and r["channel_id"] and paths.is_people(r["path"])
    }
    if not keys or interval_s <= 0:
        return rows
    cur = await conn.execute(
        "SELECT target_id, channel_id, max(sent_at) FROM outbox"
        " WHERE status IN ('sent', 'digested') AND kind = 'alarm_opened' AND sent_at > %s"
        " AND (target_id, channel_id) IN (SELECT * FROM unnest(%s::text[], %s::text[]))"
        " GROUP BY 1, 2",
        (now - timedelta(seconds=interval_s), [k[0] for k in keys], [k[1] for k in keys]),
    )
    last = {(t, c): at for t, c, at in await cur.fetchall()}
    keep = []
    for r in rows:
        at = last.get((r["target_id"], r["channel_id"])) if r["kind"] == "alarm_opened" else None
        if at is None or not paths.is_people(r["path"]):
            keep.append(r)
            continue
        await conn.execute(
            "UPDATE outbox SET due_at = %s WHERE id = %s",
            (at + timedelta(seconds=interval_s), r["id"]),
        )
    return keep


def _verify(path: str) -> bool:
    p = paths.PATHS.get(path)
    return p is not None and p.verify


def _secret(t: dict[str, Any]) -> str | None:
    """What the path's send gets: a verify path's link token (the unsubscribe link),
    otherwise the signing secret (a webhook's)."""
    value: str | None = t["token"] if _verify(t["path"]) else t["secret"]
    return value


def _paced_until(path: str, p: dict[str, Any] | None, now: datetime) -> datetime | None:
    np = paths.PATHS.get(path)
    if p is None or np is None or np.pacing is None:
        return None
    return np.pacing(p, now)


async def _settle(
    conn: AsyncConnection[Any], grp: list[dict[str, Any]], o: Outcome, now: datetime
) -> None:
    first = grp[0]
    ids = [r["id"] for r in grp]
    attempt = max(r["attempts"] for r in grp) + 1
    limit = INTERNAL_MAX if o.internal else MAX_ATTEMPTS
    quarantine = o.status == "invalid" or (o.status == "retry" and attempt >= limit)
    if quarantine:
        why = o.error or "failed"
        o = Outcome(
            "invalid", o.code,
            why if o.status == "invalid" else f"gave up after {attempt} attempts: {why}",
        )  # fmt: skip
    for r in grp:
        owner = r["kind"] == "recipient_left"
        await _log(
            conn, r["account_id"], "email" if owner else r["path"],
            str(r["payload"].get("to")) if owner else r["address"],
            r["event_id"], r["kind"], o, attempt, now,
        )  # fmt: skip
    if o.status == "ok":
        status = "sent" if len(grp) == 1 or not paths.is_people(first["path"]) else "digested"
        await conn.execute(
            "UPDATE outbox SET status = %s, attempts = attempts + 1, sent_at = %s, last_error = NULL"
            " WHERE id = ANY(%s)",
            (status, now, ids),
        )
        await conn.execute(
            "INSERT INTO target_pacing (target_id, window_start, sent, last_sent_at)"
            " VALUES (%s, %s, 1, %s) ON CONFLICT (target_id) DO UPDATE SET"
            " sent = CASE WHEN target_pacing.window_start > %s - interval '1 hour'"
            "   THEN target_pacing.sent + 1 ELSE 1 END,"
            " window_start = CASE WHEN target_pacing.window_start > %s - interval '1 hour'"
            "   THEN target_pacing.window_start ELSE excluded.window_start END,"
            " last_sent_at = excluded.last_sent_at",
            (first["target_id"], now, now, now, now),
        )
    elif o.status in ("dropped", "invalid"):
        await conn.execute(
            "UPDATE outbox SET status = %s, attempts = attempts + 1, last_error = %s WHERE id = ANY(%s)",
            ("dropped" if o.status == "dropped" else "failed", _clean(o.error), ids),
        )
    else:
        delay = _retry_delay(o.retry_after, attempt)
        await conn.execute(
            "UPDATE outbox SET attempts = attempts + 1, last_error = %s, due_at = %s WHERE id = ANY(%s)",
            (_clean(o.error), now + delay, ids),
        )


async def check_paths(
    pool: AsyncConnectionPool, now: datetime, min_accounts: int = probes.MIN_ACCOUNTS
) -> list[str]:
    """A path whose counted attempts in the last 5 min all failed, with no success for
    more than 5 min, is failing: the same figures the status page's dispatch_failing
    condition reads (status/probes.py), so one account's failing recipients (status
    `rejected`: its mail domain, its webhook) do not count unless they span
    `min_accounts` accounts. Opening such an incident tells the affected accounts
    through their other paths, once."""
    opened = []
    async with pool.connection() as conn, conn.transaction():
        figures = await probes.dispatch(conn, now, min_accounts)
        # the paths people read; a webhook is one customer's own endpoint: its
        # failures are in the outbound log, not a service incident
        for path in paths.people_paths():
            d = figures.get(path) or {}
            attempts, failed = d.get("attempts_5m", 0), d.get("failed_5m", 0)
            failing = (
                attempts > 0
                and failed == attempts
                and (d.get("failing_for_s") or 0) >= FAILING_AFTER.total_seconds()
            )
            cur = await conn.execute(
                "SELECT opened_at FROM path_incidents WHERE path = %s AND closed_at IS NULL FOR UPDATE",
                (path,),
            )
            open_row = await cur.fetchone()
            if failing and open_row is None:
                await conn.execute(
                    "INSERT INTO path_incidents (path, opened_at) VALUES (%s, %s)", (path, now)
                )
                await _report_failing(conn, path, now)
                opened.append(path)
            elif not failing and open_row is not None and attempts > failed:
                await conn.execute(
                    "UPDATE path_incidents SET closed_at = %s WHERE path = %s AND closed_at IS NULL",
                    (now, path),
                )
    return opened


async def _report_failing(conn: AsyncConnection[Any], path: str, now: datetime) -> None:
    cur = await conn.execute(
        "SELECT DISTINCT account_id FROM outbound_log WHERE path = %s AND at > %s AND account_id IS NOT NULL",
        (path, now - timedelta(hours=1)),
    )
    for (acc,) in await cur.fetchall():
        tcur = await conn.execute(
            "SELECT id FROM notify_targets WHERE account_id = %s AND path <> %s AND deleted_at IS NULL",
            (acc, path),
        )
        msg = message("path_failing", None, {})
        msg["subject"] = f"[DISPATCH FAILING] {path} notifications are failing"
        msg["text"] = (
            f"OpenSense could not deliver {path} notifications for more than 5 minutes "
            f"(since before {now.isoformat(timespec='minutes')}). Alarms reach you through "
            "this path meanwhile; check the outbound log."
        )
        msg["data"] = {"path": path}
        for (tid,) in await tcur.fetchall():
            await put(
                conn, account_id=acc, target_id=tid, event_id=None, kind="path_failing",
                key=f"path_failing:{path}:{now.isoformat()}:{tid}", payload=msg, due=now,
            )  # fmt: skip


async def send_test(
    pool: AsyncConnectionPool,
    cfg: Config,
    session: aiohttp.ClientSession,
    account_id: str,
    by: str,
) -> list[dict[str, Any]]:
    """The test alarm: one message through every configured recipient, now, each
    result logged. Not queued: the person pressing the button waits for the answer."""
    now = cfg.clock()
    async with pool.connection() as conn:
        cur = conn.cursor(row_factory=dict_row)
        await cur.execute(
            "SELECT id, path, address, secret, token, verified FROM notify_targets WHERE account_id = %s"
            " AND deleted_at IS NULL ORDER BY id",
            (account_id,),
        )
        targets = await cur.fetchall()
    msg = message("test", None, {})
    msg["subject"] = "[TEST] OpenSense test notification"
    msg["text"] = f"This is a test notification from OpenSense, sent by {by}."
    msg["data"] = {"test": True, "by": by}

    async def one(t: dict[str, Any]) -> Outcome:
        if _verify(t["path"]) and not t["verified"]:
            return Outcome("dropped", None, "the recipient has not confirmed yet")
        row = {**t, "kind": "test", "payload": msg}
        return await _attempt(session, cfg, [row], lambda: msg, f"dlv_test_{t['id']}", now)

    outs = await asyncio.gather(*(one(t) for t in targets))
    async with pool.connection() as conn, conn.transaction():
        for t, o in zip(targets, outs, strict=True):
            await _log(conn, account_id, t["path"], t["address"], None, "test", o, 1, now)
    return [
        {"target_id": t["id"], "path": t["path"], "status": "ok" if o.status == "ok" else "failed",
         "code": o.code, "error": o.error}
        for t, o in zip(targets, outs, strict=True)
    ]  # fmt: skip
