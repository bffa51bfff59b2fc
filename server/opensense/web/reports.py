"""Reports: the account's compliance reports with their progress and a download link,
and a form to ask for one (docs/dashboard.md, "Reports"; docs/reports.md).

The form becomes the body of POST /v1/reports and goes through the API's own function
(`reports/routes.py` `request_report`): the same checks, queue limit and messages. The
download goes through the API's file path (`file_response`: the renderer renders the
PDF again and answers it only with the SHA-256 recorded when it became ready)."""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any

from aiohttp import web
from psycopg import AsyncConnection

from ..api.keys import CONFIG, POOL
from ..devices import store as devices
from ..errors import ApiError
from ..reports import store as reports
from ..reports.catalogue import LANGUAGES
from ..reports.load import month_period
from ..reports.routes import file_response, request_report
from ..reports.templates import TEMPLATES
from .forms import errors_of, posted, text
from .session import render, signed_in
from .store import User

routes = web.RouteTableDef()

PAGE = 50  # reports a page, newest first (?before=<report id> for older ones)
ROLE = "operator"  # who may ask for a report (docs/dashboard.md, "Reports")
FIELDS = ("site_id", "template", "month", "language")
# the API's field a refusal names -> the form's field it is shown next to
API_FIELDS = {
    "site_id": "site_id",
    "template": "template",
    "language": "language",
    "period": "month",
}


def last_month(today: date) -> str:
    return (today.replace(day=1) - timedelta(days=1)).strftime("%Y-%m")


def body_of(form: Any) -> dict[str, Any]:
    """The form as POST /v1/reports's body: the month (YYYY-MM, the page's own field)
    becomes the period from its first to its last day, dates of the site's time zone."""
    month = (text(form, "month") or "").strip()[:20]
    try:
        first, last = month_period(month)
    except ValueError as exc:
        raise ApiError("invalid_request", str(exc)) from None
    return {
        "site_id": text(form, "site_id"),
        "template": text(form, "template"),
        "language": text(form, "language"),
        "period": {"from": first.isoformat(), "to": last.isoformat()},
    }


def shown(r: reports.Row, site_names: dict[str, str]) -> dict[str, Any]:
    ready = r["status"] == "ready"
    return {
        "id": r["id"],
        "site": site_names.get(r["site_id"], r["site_id"]),
        "template": r["template"],
        "period": f"{r['period_from']} – {r['period_to']}",
        "language": r["language"],
        "status": r["status"],
        "percent": round(float(r["progress"]) * 100),
        "stage": r["stage"],
        "error": r["error"],
        "created": r["created_at"].strftime("%Y-%m-%d %H:%M UTC"),
        "sha256": r["sha256"] if ready else None,
        "file": f"/reports/{r['id']}/file" if ready else None,
    }


async def reports_page(
    request: web.Request,
    conn: AsyncConnection[Any],
    user: User,
    *,
    values: Any = None,
    errors: dict[str, str] | None = None,
    status: int = 200,
) -> web.Response:
    before = (request.query.get("before") or "")[:64] or None
    rows = await reports.recent(conn, user.account_id, before, PAGE + 1)
    sites = await devices.list_sites(conn, user.account_id)
    names = {s["id"]: s["name"] for s in sites}
    today = request.app[CONFIG].clock().date()
    values = values or {}
    ctx = {
        "reports": [shown(r, names) for r in rows[:PAGE]],
        "older": rows[PAGE - 1]["id"] if len(rows) > PAGE else None,
        "newest": before is not None,
        "sites": sites,
        "templates": TEMPLATES,
        "languages": LANGUAGES,
        "values": {
            "site_id": text(values, "site_id") or "",
            "template": text(values, "template") or "haccp_monthly",
            "month": text(values, "month") or last_month(today),
            "language": text(values, "language") or "en",
        },
        "errors": errors or {},
        "role": ROLE,
    }
    return render(request, user, "reports.html", ctx, status=status)


@routes.get("/reports")
async def report_list(request: web.Request) -> web.Response:
    async with request.app[POOL].connection() as conn:
        user = await signed_in(request, conn)
        return await reports_page(request, conn, user)


@routes.post("/reports")
async def report_request(request: web.Request) -> web.Response:
    """Ask for a report: queued as POST /v1/reports queues it, then back to the list."""
    async with request.app[POOL].connection() as conn:
        user, form = await posted(request, conn, ROLE)
        try:
            await request_report(request.app, conn, user.account_id, body_of(form), user.id)
        except ApiError as err:
            found = errors_of(err, (*API_FIELDS, "month"))
            errors = {API_FIELDS.get(k, k): v for k, v in found.items()}
            return await reports_page(
                request, conn, user, values=form, errors=errors, status=err.status
            )
    raise web.HTTPSeeOther("/reports")


@routes.get("/reports/{report_id}/file")
async def report_file(request: web.Request) -> web.Response:
    """The PDF, as GET /v1/reports/{id}/file answers it (another account's id: 404)."""
    async with request.app[POOL].connection() as conn:
        user = await signed_in(request, conn)
        row = await reports.get(conn, user.account_id, request.match_info["report_id"])
    return await file_response(request.app, row)
