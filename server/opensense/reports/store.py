"""The reports table: a report asked for (checked, queued), claimed by one renderer,
its progress, and its end (ready with its SHA-256, or failed with the reason).

A claim is `claimed_by` (the renderer) plus `attempts` (which claim): every write of
a renderer names both, so a renderer whose lease ran out and whose report was
claimed again cannot overwrite the new claim's work (`ClaimLost`).
"""

from __future__ import annotations

import calendar
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from psycopg import AsyncConnection
from psycopg.rows import dict_row

from ..api.jsonutil import rfc3339
from ..errors import ApiError
from ..ids import new_id
from .build import TEMPLATES
from .catalogue import LANGUAGES

Row = dict[str, Any]
MAX_MONTHS = 13
STATUSES = ("queued", "rendering", "ready", "failed")
COLS = (
    "id, account_id, site_id, template, period_from, period_to, language, status, error,"
    " progress, stage, attempts, origin, created_at, started_at, ready_at, failed_at,"
    " render_ms, sha256, size_bytes"
)


class ClaimLost(Exception):
    """This renderer's claim expired and the report was claimed again (or ended)."""


def add_months(d: date, n: int) -> date:
    m = d.month - 1 + n
    y, m = d.year + m // 12, m % 12 + 1
    return date(y, m, min(d.day, calendar.monthrange(y, m)[1]))


def _date(v: Any, name: str) -> date:
    if not isinstance(v, str) or len(v) != 10:
        raise ApiError("invalid_request", f"period.{name} must be a date YYYY-MM-DD")
    try:
        return date.fromisoformat(v)
    except ValueError:
        raise ApiError(
            "invalid_request", f"period.{name} must be a date YYYY-MM-DD, got {v!r}"
        ) from None


@dataclass(frozen=True)
class Ask:
    site_id: str
    template: str
    period_from: date
    period_to: date
    language: str


def parse(body: dict[str, Any]) -> Ask:
    """The request's fields, each refused with a message that says why."""
    unknown = set(body) - {"site_id", "template", "period", "language"}
    if unknown:
        raise ApiError("invalid_request", f"unknown field(s): {', '.join(sorted(unknown))[:200]}")
    site = body.get("site_id")
    if not isinstance(site, str) or not site or len(site) > 64:
        raise ApiError("invalid_request", "site_id must be a site id (site_…)")
    template = body.get("template", "haccp_monthly")
    if not isinstance(template, str) or template not in TEMPLATES:
        raise ApiError(
            "invalid_request",
            f"template must be one of {', '.join(TEMPLATES)}, got {str(template)[:40]!r}",
        )
    language = body.get("language", "en")
    if not isinstance(language, str) or language not in LANGUAGES:
        raise ApiError(
            "invalid_request",
            f"language must be one of {', '.join(LANGUAGES)}, got {str(language)[:20]!r}",
        )
    period = body.get("period")
    if not isinstance(period, dict) or set(period) != {"from", "to"}:
        raise ApiError(
            "invalid_request", 'period must be {"from": "YYYY-MM-DD", "to": "YYYY-MM-DD"}'
        )
    p_from, p_to = _date(period["from"], "from"), _date(period["to"], "to")
    if p_from > p_to:
        raise ApiError("invalid_range", f"period.from {p_from} is after period.to {p_to}")
    if p_to >= add_months(p_from, MAX_MONTHS):
        raise ApiError(
            "invalid_range",
            f"a report covers at most {MAX_MONTHS} months; {p_from} – {p_to} is longer",
        )
    return Ask(site, template, p_from, p_to, language)


def check_ended(ask: Ask, tz: str, now: datetime) -> None:
    """A report is of days that are over in the site's time zone: its bytes never
    change afterwards (late data aside), and the schedule renders a month once."""
    today = now.astimezone(ZoneInfo(tz)).date()
    if ask.period_to >= today:
        raise ApiError(
            "invalid_range",
            f"the period must have ended: its last day {ask.period_to} is not before today "
            f"({today}) in the site's time zone {tz}",
        )


def public(r: Row) -> Row:
    ready = r["status"] == "ready"
    return {
        "id": r["id"],
        "site_id": r["site_id"],
        "template": r["template"],
        "period": {"from": r["period_from"].isoformat(), "to": r["period_to"].isoformat()},
        "language": r["language"],
        "status": r["status"],
        "progress": round(float(r["progress"]), 3),
        "stage": r["stage"],
        "error": r["error"],
        "attempts": r["attempts"],
        "origin": r["origin"],
        "created_at": rfc3339(r["created_at"]),
        "started_at": rfc3339(r["started_at"]) if r["started_at"] else None,
        "ready_at": rfc3339(r["ready_at"]) if r["ready_at"] else None,
        "render_ms": r["render_ms"],
        "sha256": r["sha256"] if ready else None,
        "size_bytes": r["size_bytes"] if ready else None,
        "file": f"/v1/reports/{r['id']}/file" if ready else None,
    }


async def _one(conn: AsyncConnection[Any], sql: str, args: Any) -> Row | None:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(sql, args)
    return await cur.fetchone()


async def site_timezone(conn: AsyncConnection[Any], account_id: str, site_id: str) -> str:
    cur = await conn.execute(
        "SELECT timezone FROM sites WHERE id = %s AND account_id = %s", (site_id, account_id)
    )
    row = await cur.fetchone()
    if row is None:  # another account's site is not told apart from none at all
        raise ApiError("site_not_found", f"no site {site_id[:40]!r} in this account")
    return str(row[0])


async def create(
    conn: AsyncConnection[Any],
    account_id: str,
    ask: Ask,
    now: datetime,
    *,
    queue_max: int,
    actor: str,
    origin: str = "api",
) -> Row:
    """Queue a report after every check (in the caller's transaction). The account's
    queue is counted under a lock on the account row, so two requests at once cannot
    both take its last place."""
    check_ended(ask, await site_timezone(conn, account_id, ask.site_id), now)
    await conn.execute("SELECT 1 FROM accounts WHERE id = %s FOR UPDATE", (account_id,))
    cur = await conn.execute(
        "SELECT count(*) FROM reports WHERE account_id = %s AND status IN ('queued', 'rendering')",
        (account_id,),
    )
    waiting = (await cur.fetchone() or (0,))[0]
    if waiting >= queue_max:
        raise ApiError(
            "rate_limited",
            f"this account has {waiting} reports queued or rendering (at most {queue_max}); "
            "wait for one to finish",
            headers={"Retry-After": "30"},
        )
    row = await _one(
        conn,
        f"INSERT INTO reports (id, account_id, site_id, template, period_from, period_to,"
        f" language, origin, created_by, created_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s,"
        f" %s, %s) RETURNING {COLS}",
        (
            new_id("rpt"),
            account_id,
            ask.site_id,
            ask.template,
            ask.period_from,
            ask.period_to,
            ask.language,
            origin,
            actor,
            now,
        ),  # fmt: skip
    )
    assert row is not None
    return row


async def get(conn: AsyncConnection[Any], account_id: str | None, report_id: str) -> Row:
    row = await _one(
        conn,
        f"SELECT {COLS} FROM reports WHERE id = %s AND (%s::text IS NULL OR account_id = %s)",
        (report_id, account_id, account_id),
    )
    if row is None:
        raise ApiError("report_not_found", f"no report {report_id[:40]!r} in this account")
    return row


async def recent(
    conn: AsyncConnection[Any], account_id: str, before: str | None, limit: int
) -> list[Row]:
    """The account's reports newest first, `limit` of them; `before`: those older than
    that report of the account (none when it is not the account's)."""
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(
        f"SELECT {COLS} FROM reports WHERE account_id = %(acc)s AND (%(before)s::text IS NULL"
        " OR (created_at, id) < (SELECT created_at, id FROM reports WHERE id = %(before)s"
        " AND account_id = %(acc)s)) ORDER BY created_at DESC, id DESC LIMIT %(limit)s",
        {"acc": account_id, "before": before, "limit": limit},
    )
    return await cur.fetchall()


# --- the renderer's side ---------------------------------------------------------------


async def expire(conn: AsyncConnection[Any], now: datetime, max_attempts: int) -> int:
    """Fail the reports whose renderer stopped with the lease as often as allowed."""
    cur = await conn.execute(
        "UPDATE reports SET status = 'failed', failed_at = %s, claimed_until = NULL,"
        " error = format('the renderer stopped without finishing %%s times (crashed, killed or"
        " out of memory); ask again or tell the operator', attempts)"
        " WHERE status = 'rendering' AND claimed_until < %s AND attempts >= %s",
        (now, now, max_attempts),
    )
    return cur.rowcount


CLAIM_SQL = f"""
WITH c AS (
    SELECT id FROM reports
    WHERE (status = 'queued' OR (status = 'rendering' AND claimed_until < %(now)s))
      AND (%(only)s::text IS NULL OR id = %(only)s)
    ORDER BY created_at, id LIMIT 1
    FOR UPDATE SKIP LOCKED
)
UPDATE reports r SET status = 'rendering', attempts = r.attempts + 1, claimed_by = %(me)s,
    claimed_until = %(until)s, started_at = %(now)s, progress = 0, stage = 'claimed'
FROM c WHERE r.id = c.id
RETURNING {", ".join("r." + c.strip() for c in COLS.split(","))}
"""


async def claim(
    conn: AsyncConnection[Any],
    me: str,
    now: datetime,
    lease: timedelta,
    max_attempts: int,
    only: str | None = None,
) -> Row | None:
    """One report for renderer `me`: the oldest queued one, or one whose renderer's
    lease ran out (tried fewer than max_attempts times); `only`: that report or none.
    None: nothing to do."""
    await expire(conn, now, max_attempts)
    args = {"now": now, "me": me, "until": now + lease, "only": only}
    return await _one(conn, CLAIM_SQL, args)


async def progress(
    conn: AsyncConnection[Any],
    r: Row,
    me: str,
    fraction: float,
    stage: str,
    now: datetime,
    lease: timedelta,
) -> None:
    cur = await conn.execute(
        "UPDATE reports SET progress = %s, stage = %s, claimed_until = %s"
        " WHERE id = %s AND claimed_by = %s AND attempts = %s AND status = 'rendering'",
        (fraction, stage, now + lease, r["id"], me, r["attempts"]),
    )
    if cur.rowcount != 1:
        raise ClaimLost(r["id"])


async def ready(
    conn: AsyncConnection[Any], r: Row, me: str, sha256: str, size: int, now: datetime
) -> bool:
    cur = await conn.execute(
        "UPDATE reports SET status = 'ready', progress = 1, stage = 'ready', ready_at = %s,"
        " sha256 = %s, size_bytes = %s, claimed_until = NULL, error = NULL,"
        " render_ms = (extract(epoch FROM %s - started_at) * 1000)::int"
        " WHERE id = %s AND claimed_by = %s AND attempts = %s AND status = 'rendering'",
        (now, sha256, size, now, r["id"], me, r["attempts"]),
    )
    return cur.rowcount == 1


async def failed(conn: AsyncConnection[Any], r: Row, me: str, reason: str, now: datetime) -> bool:
    cur = await conn.execute(
        "UPDATE reports SET status = 'failed', stage = 'failed', failed_at = %s, error = %s,"
        " claimed_until = NULL"
        " WHERE id = %s AND claimed_by = %s AND attempts = %s AND status = 'rendering'",
        (now, reason[:500], r["id"], me, r["attempts"]),
    )
    return cur.rowcount == 1
