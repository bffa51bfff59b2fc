"""The monthly schedule (the `report_schedule` job in jobs.py): each site's
`haccp_monthly` report of the month that just closed in the site's time zone is
queued once (one row per site and month: a unique index), rendered by any server
process's renderer, and emailed with the PDF attached to the site's report
recipients (`sites.report_recipients`, set with PATCH /v1/sites/{id}).

The email is planned when the report becomes ready (`plan_mail`, in the renderer's
transaction) and sent by this job: the PDF is rendered again and sent only if its
SHA-256 is the report's. A recipient the relay refuses for now is retried with
backoff, at most MAIL_ATTEMPTS times; every attempt's end is in `report_mail`.
"""

from __future__ import annotations

import hashlib
from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from psycopg import AsyncConnection
from psycopg.rows import dict_row

from ..alarms import paths
from ..ids import new_id
from ..settings import Config
from . import build
from .catalogue import LANGUAGES

TEMPLATE = "haccp_monthly"
MAIL_ATTEMPTS = 8
MAIL_BACKOFF = timedelta(minutes=5)
MAIL_BATCH = 50


def closed_month(now: datetime, tz: str) -> tuple[date, date]:
    """The last month that has ended at `now` in time zone `tz`: (first day, last day)."""
    first_of_this = now.astimezone(ZoneInfo(tz)).date().replace(day=1)
    last = first_of_this - timedelta(days=1)
    return last.replace(day=1), last


async def queue_closed_months(conn: AsyncConnection[Any], now: datetime) -> int:
    """Queue the closed month's report of every site that existed in that month and
    has none yet. Each site's month closes at its own local midnight."""
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(
        "SELECT s.id, s.account_id, s.timezone, s.created_at, s.report_options FROM sites s"
        " CROSS JOIN LATERAL (SELECT date_trunc('month', %s AT TIME ZONE s.timezone)::date"
        " AS first) m WHERE s.created_at < (m.first::timestamp AT TIME ZONE s.timezone)"
        " AND NOT EXISTS (SELECT 1 FROM reports r WHERE r.site_id = s.id"
        " AND r.origin = 'schedule' AND r.template = %s AND r.period_to = m.first - 1)"
        " ORDER BY s.id",
        (now, TEMPLATE),
    )
    queued = 0
    for s in await cur.fetchall():
        first, last = closed_month(now, s["timezone"])
        opts = s["report_options"] if isinstance(s["report_options"], dict) else {}
        lang = opts.get("language") if opts.get("language") in LANGUAGES else "en"
        ins = await conn.execute(
            "INSERT INTO reports (id, account_id, site_id, template, period_from, period_to,"
            " language, origin, created_by, created_at) VALUES (%s, %s, %s, %s, %s, %s, %s,"
            " 'schedule', 'schedule', %s)"
            " ON CONFLICT (site_id, template, period_from, period_to)"
            " WHERE origin = 'schedule' DO NOTHING",
            (new_id("rpt"), s["account_id"], s["id"], TEMPLATE, first, last, lang, now),
        )
        queued += ins.rowcount
    return queued


async def plan_mail(conn: AsyncConnection[Any], report: dict[str, Any], now: datetime) -> int:
    """A scheduled report became ready: one pending mail per report recipient."""
    if report.get("origin") != "schedule":
        return 0
    cur = await conn.execute(
        "INSERT INTO report_mail (report_id, address, next_at)"
        " SELECT %s, a, %s FROM sites s, jsonb_array_elements_text(s.report_recipients) a"
        " WHERE s.id = %s ON CONFLICT DO NOTHING",
        (report["id"], now, report["site_id"]),
    )
    return cur.rowcount


def _message(r: dict[str, Any]) -> dict[str, Any]:
    period = f"{r['period_from']} – {r['period_to']}"
    return {
        "kind": "report_ready",
        "subject": f"Monthly report: {r['site_name']} {period}",
        "text": (
            f"The {r['template']} report of {r['site_name']} for {period} is attached.\n"
            f"SHA-256 of the PDF: {r['sha256']}\n"
        ),
    }


async def _settle(
    conn: AsyncConnection[Any], r: dict[str, Any], o: paths.Outcome, now: datetime
) -> str:
    if o.status == "ok":
        status, nxt, err = "sent", r["next_at"], None
    elif o.status == "retry" and r["attempts"] + 1 < MAIL_ATTEMPTS:
        status, nxt, err = "pending", now + MAIL_BACKOFF * 2 ** r["attempts"], o.error
    else:
        status, nxt, err = "failed", r["next_at"], o.error or o.status
    await conn.execute(
        "UPDATE report_mail SET status = %s, attempts = attempts + 1, next_at = %s,"
        " error = %s, sent_at = %s WHERE report_id = %s AND address = %s",
        (status, nxt, err, now if status == "sent" else None, r["report_id"], r["address"]),
    )
    return status


async def send_due_mail(conn: AsyncConnection[Any], cfg: Config, now: datetime) -> dict[str, int]:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(
        "SELECT m.report_id, m.address, m.attempts, m.next_at, r.account_id, r.site_id,"
        " r.template, r.period_from, r.period_to, r.language, r.sha256, s.name AS site_name"
        " FROM report_mail m JOIN reports r ON r.id = m.report_id JOIN sites s ON s.id = r.site_id"
        " WHERE m.status = 'pending' AND m.next_at <= %s ORDER BY m.next_at, m.report_id LIMIT %s",
        (now, MAIL_BATCH),
    )
    rows = await cur.fetchall()
    counts = {"sent": 0, "pending": 0, "failed": 0}
    pdfs: dict[str, bytes | None] = {}
    for r in rows:
        if r["report_id"] not in pdfs:
            made = await build.build(
                conn, r["account_id"], r["site_id"], r["template"],
                r["period_from"], r["period_to"], r["language"],
            )  # fmt: skip
            same = hashlib.sha256(made).hexdigest() == r["sha256"]
            pdfs[r["report_id"]] = made if same else None
        pdf = pdfs[r["report_id"]]
        if pdf is None:
            o = paths.Outcome(
                "dropped", None, "the site's data changed after rendering: not the same PDF"
            )
        else:
            name = f"{r['template']}_{r['period_from']}_{r['period_to']}.pdf"
            o = await paths.send_email(
                cfg, r["address"], _message(r), attachment=(name, "application/pdf", pdf)
            )
        counts[await _settle(conn, r, o, now)] += 1
    return counts


async def run(conn: AsyncConnection[Any], cfg: Config, now: datetime) -> str:
    """The job: queue the closed months' reports, send the report mail that is due."""
    queued = await queue_closed_months(conn, now)
    mail = await send_due_mail(conn, cfg, now)
    return (
        f"{queued} monthly report(s) queued; mail: {mail['sent']} sent, "
        f"{mail['pending']} to retry, {mail['failed']} failed"
    )
