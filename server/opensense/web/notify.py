"""The notifications page (docs/dashboard.md, "Notifications"): recipients by path
(alarms/paths.py PATHS), linking a Telegram chat with a one-time code, each site's
escalation steps, and the outbound log with every attempt's status, a page at a time.
Everyone signed in sees; a manager changes, through the alarm API's own functions
(alarms/routes.py): the same checks, messages and audit rows."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from psycopg import AsyncConnection

from ..alarms import outbox, paths
from ..alarms import routes as api
from ..alarms import store as alarm_store
from ..api.keys import POOL
from ..devices.store import get_site, list_sites
from . import alarm_store as views
from .forms import Refused, checked, given, number, posted
from .routes import see_other
from .session import render, signed_in
from .store import User

routes = web.RouteTableDef()

MANAGER = "manager"
STEP_ROWS = 4  # step rows in a site's escalation form (the API takes up to 10)
TARGET_FIELDS = ("path", "address", "name", "site_id", "roles")
STEP_FIELDS = ("steps", "delay_min", "to")
ROLE_WORDS = {"shift": "on shift", "out_of_hours": "out of hours", "manager": "manager"}
TO_WORDS = {"on_shift": "whoever is on shift", "manager": "the managers", "everyone": "everyone"}


def steps_words(steps: list[Any], names: dict[str, str]) -> list[str]:
    out = []
    for s in steps:
        to = s.get("to") if isinstance(s, dict) else None
        who = (
            TO_WORDS.get(to, str(to))
            if isinstance(to, str)
            else ", ".join(names.get(x, x) for x in to or [])
        )
        out.append(f"after {s.get('delay_min')} min: {who}")
    return out


def _before(request: web.Request) -> int | None:
    raw = request.query.get("before", "")
    return int(raw) if raw.isdigit() and len(raw) <= 18 else None


async def _ctx(conn: AsyncConnection[Any], user: User, before: int | None) -> dict[str, Any]:
    acc = user.account_id
    targets = await alarm_store.targets(conn, acc)
    names = {t["id"]: t["name"] or t["address"] for t in targets}
    sites = await list_sites(conn, acc)
    site_names = {s["id"]: s["name"] for s in sites}
    escalation = []
    for s in sites:
        steps = await alarm_store.escalation_steps(conn, s["id"])
        steps = outbox.DEFAULT_STEPS if steps is None else steps
        values: dict[str, str] = {}
        for i, st in enumerate(steps[:STEP_ROWS]):
            values[f"delay_min_{i}"] = str(st.get("delay_min", ""))
            values[f"to_{i}"] = st.get("to") if isinstance(st.get("to"), str) else ""
        escalation.append(
            {"site": s, "words": steps_words(steps, names), "vals": values, "errors": {}}
        )
    log = await views.outbound_page(conn, acc, before)
    more = len(log) > views.PAGE
    log = log[: views.PAGE]
    return {
        "targets": [
            {
                **t,
                "site": site_names.get(t["site_id"], "every site")
                if t["site_id"]
                else "every site",
                "roles_words": ", ".join(ROLE_WORDS.get(r, r) for r in t["roles"] or []),
            }
            for t in targets
        ],  # fmt: skip
        "paths": [
            {"value": p.name, "label": f"{p.name}: {p.doc}"}
            for p in paths.PATHS.values()
            if p.check is not None
        ],
        "linked_paths": [p for p in paths.PATHS.values() if p.check is None],
        "sites": [{"value": "", "label": "every site"}]
        + [{"value": s["id"], "label": s["name"]} for s in sites],
        "roles": [{"value": r, "label": ROLE_WORDS.get(r, r)} for r in outbox.ROLES],
        "step_rows": range(STEP_ROWS),
        "step_to": [{"value": "", "label": "(no step)"}]
        + [{"value": k, "label": TO_WORDS.get(k, k)} for k in outbox.STEP_TARGETS],
        "escalation": escalation,
        "log": [{**x, "when": views.when(x["at"])} for x in log],
        "older": log[-1]["id"] if more and log else None,
        "newest": before is not None,
        "rerrors": {},
        "rvalues": {},
        "created": None,
        "link": None,
        "terrors": {},
    }


@routes.get("/notifications")
async def notifications_page(request: web.Request) -> web.Response:
    async with request.app[POOL].connection() as conn:
        user = await signed_in(request, conn)
        ctx = await _ctx(conn, user, _before(request))
    return render(request, user, "notify.html", ctx)


def _roles_of(form: Any) -> list[str]:
    return [str(r) for r in form.getall("roles", [])][: len(outbox.ROLES) + 1]


@routes.post("/notifications/recipients")
async def add_recipient(request: web.Request) -> web.Response:
    async with request.app[POOL].connection() as conn:
        user, form = await posted(request, conn, MANAGER)
        acc = user.account_id
        await api.write_limit(request, conn, acc)
        body = {
            "path": form.get("path"),
            "address": form.get("address"),
            "name": given(form.get("name")),
            "site_id": given(form.get("site_id")),
            "roles": _roles_of(form),
        }
        try:
            row = await checked(TARGET_FIELDS, api.add_target(conn, request, acc, body, user.id))
        except Refused as r:
            ctx = await _ctx(conn, user, None)
            ctx.update(rerrors=r.errors, rvalues=dict(form))
            return render(request, user, "notify.html", ctx, status=422)
        ctx = await _ctx(conn, user, None)
    ctx["created"] = row  # a webhook's signing secret: shown this once
    return render(request, user, "notify.html", ctx, status=201)


@routes.post("/notifications/recipients/{target_id}/delete")
async def delete_recipient(request: web.Request) -> web.Response:
    async with request.app[POOL].connection() as conn:
        user, _ = await posted(request, conn, MANAGER)
        acc = user.account_id
        await api.write_limit(request, conn, acc)
        await api.remove_target(conn, request, acc, request.match_info["target_id"], user.id)
    return see_other("/notifications")


@routes.post("/notifications/telegram")
async def telegram_link(request: web.Request) -> web.Response:
    """A one-time code to send to the bot from the chat (the API's POST /v1/telegram/link)."""
    async with request.app[POOL].connection() as conn:
        user, form = await posted(request, conn, MANAGER)
        acc = user.account_id
        await api.write_limit(request, conn, acc)
        body = {"site_id": given(form.get("site_id")), "roles": _roles_of(form)}
        try:
            link = await checked(
                TARGET_FIELDS, api.telegram_code(conn, request, acc, body, user.id)
            )
        except Refused as r:
            ctx = await _ctx(conn, user, None)
            ctx.update(terrors=r.errors)
            return render(request, user, "notify.html", ctx, status=422)
        ctx = await _ctx(conn, user, None)
    ctx["link"] = {**link, "expires": views.when(link["expires_at"])}
    return render(request, user, "notify.html", ctx, status=201)


@routes.post("/notifications/escalation/{site_id}")
async def save_escalation(request: web.Request) -> web.Response:
    async with request.app[POOL].connection() as conn:
        user, form = await posted(request, conn, MANAGER)
        acc = user.account_id
        await api.write_limit(request, conn, acc)
        site = await get_site(conn, acc, request.match_info["site_id"])
        steps = []
        for i in range(STEP_ROWS):
            to, delay = given(form.get(f"to_{i}")), number(form.get(f"delay_min_{i}", ""))
            if to is not None or delay is not None:
                steps.append({"delay_min": delay, "to": to})
        try:
            await checked(
                STEP_FIELDS,
                api.set_escalation(conn, request, acc, site["id"], {"steps": steps}, user.id),
            )
        except Refused as r:
            ctx = await _ctx(conn, user, None)
            for e in ctx["escalation"]:
                if e["site"]["id"] == site["id"]:
                    e.update(errors=r.errors, vals=dict(form))
            return render(request, user, "notify.html", ctx, status=422)
    return see_other("/notifications#escalation")
