"""The rules pages (docs/dashboard.md, "Rules"): the account's alarm rules, an editor
that starts from a vertical preset or a rule kind, time windows as a friendly form
("every day at 22:00 for 30 min" -> the RRULE the API stores, shown back in words),
silences and recompute. Everyone signed in sees; a manager changes. Every change goes
through the alarm API's own function (alarms/routes.py), so its checks, messages and
audit rows are the API's; the actor is the signed-in user."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from aiohttp import web
from psycopg import AsyncConnection

from opensense_contract.rules import RULE_KINDS, SEVERITIES, RuleKind

from ..alarms import routes as api
from ..alarms import store as alarm_store
from ..api.keys import CONFIG, POOL
from ..devices.store import channel_row, list_sites
from ..errors import ApiError
from ..presets import VERTICALS
from . import alarm_store as views
from .forms import Refused, checked, given, number, posted
from .routes import see_other
from .session import render, signed_in
from .store import User

routes = web.RouteTableDef()

MANAGER = "manager"
# (RRULE day, label), Monday first as the engine's WKST default
WEEKDAYS = (
    ("MO", "Mon"), ("TU", "Tue"), ("WE", "Wed"), ("TH", "Thu"),
    ("FR", "Fri"), ("SA", "Sat"), ("SU", "Sun"),
)  # fmt: skip
DAY_LABEL = dict(WEEKDAYS)
TIME_RE = re.compile(r"^(\d{1,2}):(\d{2})$")
RULE_FIELDS = ("kind", "grace_min", "clear_min", "renotify_min", "severity", "enabled", "params")
WINDOW_FIELDS = ("duration_min", "days", "start", "windows", "rrule")
SILENCE_FIELDS = ("scope", "to", "reason", "site_id", "channel_id")


# --- words ------------------------------------------------------------------------------


def minutes_words(n: Any) -> str:
    if not isinstance(n, int):
        return str(n)
    h, m = divmod(n, 60)
    if not h:
        return f"{m} min"
    return f"{h} h" + (f" {m} min" if m else "")


def params_words(params: Any) -> str:
    if not isinstance(params, dict) or not params:
        return "–"
    return ", ".join(f"{k} {v}" for k, v in params.items())


def rrule_of(days: list[str], hour: int, minute: int) -> str:
    """The RRULE of a window starting at hour:minute on these days (none or all: daily)."""
    at = f"BYHOUR={hour};BYMINUTE={minute}"
    if not days or len(days) == len(WEEKDAYS):
        return f"FREQ=DAILY;{at}"
    order = [d for d, _ in WEEKDAYS if d in days]
    return f"FREQ=WEEKLY;BYDAY={','.join(order)};{at}"


def window_words(w: Any) -> str:
    """A stored window in words: "Every day at 22:00 for 30 min: rule paused"."""
    if not isinstance(w, dict) or not isinstance(w.get("rrule"), str):
        return "a window the engine ignores (not an RRULE)"
    parts = dict(p.partition("=")[::2] for p in w["rrule"].upper().split(";"))
    try:
        hours = [int(x) for x in parts.get("BYHOUR", "0").split(",")]
        mins = [int(x) for x in parts.get("BYMINUTE", "0").split(",")]
        every = int(parts.get("INTERVAL", "1"))
    except ValueError:
        return f"schedule {w['rrule']}"
    times = ", ".join(f"{h:02d}:{m:02d}" for h in sorted(hours) for m in sorted(mins))
    if parts.get("FREQ") == "DAILY":
        when = "Every day" if every == 1 else f"Every {every} days"
    elif parts.get("FREQ") == "WEEKLY":
        days = [DAY_LABEL.get(d, d) for d in parts.get("BYDAY", "MO").split(",")]
        when = ("Every " if every == 1 else f"Every {every} weeks on ") + ", ".join(days)
    else:
        return f"schedule {w['rrule']}"
    p = w.get("params")
    during = "rule paused" if p is None else "limits " + params_words(p)
    return f"{when} at {times} for {minutes_words(w.get('duration_min'))}: {during}"


def rule_words(r: dict[str, Any]) -> str:
    return f"{r['kind']}: {params_words(r['params'])}"


# --- reading ----------------------------------------------------------------------------


def channel_label(c: dict[str, Any]) -> str:
    return f"{c['site_name']} · {c['device_name']} · {c['name']}"


def presets_for(kind: str | None) -> list[dict[str, str]]:
    """The vertical presets (for a channel's measurement kind, or all), as select options."""
    out = []
    for v in VERTICALS.values():
        for measure, d in v.rules.items():
            if kind is None or measure == kind:
                label = f"{v.doc} ({measure}, a {d.kind} rule)"
                out.append({"value": f"preset:{v.name}:{measure}", "label": label})
    return out


def start_options() -> list[dict[str, str]]:
    kinds = [
        {"value": f"kind:{k.name}", "label": f"{k.name}: {k.doc}"} for k in RULE_KINDS.values()
    ]
    return presets_for(None) + kinds


async def _rules_ctx(conn: AsyncConnection[Any], user: User, now: datetime) -> dict[str, Any]:
    acc = user.account_id
    chans = await views.channels(conn, acc)
    by_id = {c["id"]: c for c in chans}
    rows = []
    for r in await views.rules(conn, acc):
        c = by_id.get(r["channel_id"])
        rows.append(
            {
                "rule": r,
                "channel": channel_label(c) if c else r["channel_id"],
                "words": rule_words(r),
                "grace": minutes_words(r["grace_min"]),
                "windows": [window_words(w) for w in r["windows"] or []],
            }
        )
    sites = {x["id"]: x["name"] for x in await list_sites(conn, acc)}
    silences = [
        {
            **s,
            "scope": _scope_words(s, by_id, sites),
            "from": views.when(s["starts_at"]),
            "to": views.when(s["ends_at"]),
            "active": s["starts_at"] <= now < s["ends_at"],
        }
        for s in await alarm_store.silences(conn, acc)
    ]
    scopes = [{"value": "account", "label": "Every site of the account (times in UTC)"}]
    scopes += [{"value": f"site:{i}", "label": f"Site {n}"} for i, n in sites.items()]
    scopes += [{"value": f"channel:{c['id']}", "label": channel_label(c)} for c in chans]
    return {
        "rows": rows,
        "channels": [{"value": c["id"], "label": channel_label(c)} for c in chans],
        "starts": start_options(),
        "silences": silences,
        "scopes": scopes,
        "errors": {},
        "values": {},
    }


def _scope_words(s: dict[str, Any], chans: dict[str, Any], sites: dict[str, str]) -> str:
    if s["channel_id"]:
        c = chans.get(s["channel_id"])
        return channel_label(c) if c else str(s["channel_id"])
    if s["site_id"]:
        return "Site " + str(sites.get(s["site_id"], s["site_id"]))
    return "Every site of the account"


@routes.get("/rules")
async def rules_page(request: web.Request) -> web.Response:
    async with request.app[POOL].connection() as conn:
        user = await signed_in(request, conn)
        ctx = await _rules_ctx(conn, user, request.app[CONFIG].clock())
    return render(request, user, "rules.html", ctx)


def _kind_fields(rk: RuleKind, chans: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for p in rk.params:
        f: dict[str, Any] = {"name": p.name, "doc": p.doc, "type": p.type, "required": p.required}
        if p.type == "choice":
            f["options"] = list(p.choices)
        elif p.type == "channel_id":
            f["options"] = [c["id"] for c in chans]
            f["labels"] = {c["id"]: channel_label(c) for c in chans}
        out.append(f)
    return out


def _values_of(rule: dict[str, Any]) -> dict[str, str]:
    def s(v: Any) -> str:
        return "" if v is None else str(v)

    vals = {k: s(v) for k, v in (rule.get("params") or {}).items()}
    for k in ("grace_min", "clear_min", "renotify_min", "severity"):
        vals[k] = s(rule.get(k))
    vals["enabled"] = "on" if rule.get("enabled", True) else ""
    return vals


async def _editor_ctx(
    conn: AsyncConnection[Any],
    user: User,
    ch: dict[str, Any],
    kind: str,
    rule: dict[str, Any] | None,
) -> dict[str, Any]:
    chans = await views.channels(conn, user.account_id)
    c = next((x for x in chans if x["id"] == ch["id"]), None)
    return {
        "rule": rule,
        "kind": RULE_KINDS[kind],
        "fields": _kind_fields(RULE_KINDS[kind], chans),
        "channel": channel_label(c) if c else ch["id"],
        "channel_id": ch["id"],
        "severities": SEVERITIES,
        "windows": [window_words(w) for w in (rule or {}).get("windows") or []],
        "weekdays": WEEKDAYS,
        "errors": {},
        "werrors": {},
        "values": {},
        "wvalues": {"start": "22:00", "duration_min": "30", "during": "pause"},
        "done": None,
    }


@routes.get("/rules/new")
async def new_rule_page(request: web.Request) -> web.Response:
    """The editor, filled from a preset or empty for a kind; nothing is stored yet. A
    preset without a rule for the channel's measurement: /rules again, saying so."""
    q = request.query
    now = request.app[CONFIG].clock()
    async with request.app[POOL].connection() as conn:
        user = await signed_in(request, conn)
        ch = await channel_row(conn, user.account_id, q.get("channel_id", "")[:100])
        start = q.get("start", "")[:100]
        values: dict[str, str] = {"severity": "alarm", "enabled": "on", "grace_min": "15"}
        kind, why = None, "start must be a preset or a rule kind"
        if start.startswith("kind:") and start[5:] in RULE_KINDS:
            kind = start[5:]
        elif start.startswith("preset:"):
            _, name, measure = (start.split(":") + ["", ""])[:3]
            v = VERTICALS.get(name)
            d = v.rules.get(ch["kind"]) if v else None
            why = f"start: the preset {name[:40]!r} has no rule for {ch['kind']} channels"
            if d is not None and measure == ch["kind"]:
                kind = d.kind
                values.update(_values_of({"params": d.params, "grace_min": d.grace_min}))
                values["clear_min"] = ""
        if kind is None:
            ctx = await _rules_ctx(conn, user, now)
            ctx.update(errors={"start": why}, values={"channel_id": ch["id"], "start": start})
            return render(request, user, "rules.html", ctx, status=422)
        ctx = await _editor_ctx(conn, user, ch, kind, None)
    ctx["values"] = values
    return render(request, user, "rule.html", ctx)


def rule_body(form: Any, rk: RuleKind) -> dict[str, Any]:
    """The editor's form as the API's rule body (every field: a full edit)."""
    params: dict[str, Any] = {}
    for p in rk.params:
        raw = form.get(p.name, "")
        v = number(raw) if p.type == "number" else given(raw)
        if v is not None:
            params[p.name] = v
    body: dict[str, Any] = {"params": params, "severity": form.get("severity")}
    for k in ("grace_min", "clear_min", "renotify_min"):
        body[k] = number(form.get(k, ""))
    body["enabled"] = form.get("enabled") == "on"
    return body


def _names(rk: RuleKind, extra: tuple[str, ...]) -> tuple[str, ...]:
    return (*(p.name for p in rk.params), *extra)


@routes.post("/rules/new")
async def create_rule(request: web.Request) -> web.Response:
    async with request.app[POOL].connection() as conn:
        user, form = await posted(request, conn, MANAGER)
        acc = user.account_id
        await api.write_limit(request, conn, acc)
        ch = await channel_row(conn, acc, str(form.get("channel_id", ""))[:100])
        kind = form.get("kind")
        if kind not in RULE_KINDS:
            raise ApiError("invalid_rule", f"kind must be one of {', '.join(RULE_KINDS)}")
        rk = RULE_KINDS[kind]
        body = {"kind": kind, **rule_body(form, rk)}
        try:
            row = await checked(
                _names(rk, RULE_FIELDS), api.add_rule(conn, request, acc, ch, body, user.id)
            )
        except Refused as r:
            ctx = await _editor_ctx(conn, user, ch, kind, None)
            ctx.update(errors=r.errors, values=dict(form))
            return render(request, user, "rule.html", ctx, status=422)
    return see_other(f"/rules/{row['id']}")


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def silence_body(form: Any, now: datetime, tz: str) -> dict[str, Any]:
    """The silence form as the API's body: from now until `to`, a local wall time of
    the scope's site (UTC for the whole account)."""
    body: dict[str, Any] = {"from": now.isoformat(), "reason": form.get("reason")}
    raw = str(form.get("to", ""))[:100]
    try:
        until = datetime.fromisoformat(raw)
        body["to"] = (until if until.tzinfo else until.replace(tzinfo=_zone(tz))).isoformat()
    except ValueError:
        body["to"] = raw  # the API says what it should be
    return body


@routes.post("/rules/silences")
async def add_silence(request: web.Request) -> web.Response:
    now = request.app[CONFIG].clock()
    async with request.app[POOL].connection() as conn:
        user, form = await posted(request, conn, MANAGER)
        acc = user.account_id
        await api.write_limit(request, conn, acc)
        scope = str(form.get("scope", ""))[:100]
        chans = await views.channels(conn, acc)
        tz = "UTC"
        target: dict[str, Any] = {}
        try:
            if scope.startswith("site:"):
                target["site_id"] = scope[5:]
                sites = await list_sites(conn, acc)
                tz = next((x["timezone"] for x in sites if x["id"] == scope[5:]), tz)
            elif scope.startswith("channel:"):
                target["channel_id"] = scope[8:]
                tz = next((c["timezone"] for c in chans if c["id"] == scope[8:]), tz)
            elif scope != "account":
                raise Refused({"scope": "scope must be the account, a site or a channel"})
            body = {**silence_body(form, now, tz), **target}
            await checked(SILENCE_FIELDS, api.add_silence(conn, request, acc, body, user.id))
        except Refused as r:
            ctx = await _rules_ctx(conn, user, now)
            ctx.update(errors=r.errors, values=dict(form))
            return render(request, user, "rules.html", ctx, status=422)
    return see_other("/rules#silences")


async def _rule_and_channel(
    conn: AsyncConnection[Any], acc: str, rule_id: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    rule = await api.rule_of(conn, acc, rule_id)
    if rule["kind"] not in RULE_KINDS:  # stored by an older or newer server
        raise ApiError(
            "invalid_rule",
            f"rule {rule_id} is of kind {str(rule['kind'])[:40]!r}, which this server does not"
            f" know (the engine skips it); known: {', '.join(RULE_KINDS)}",
        )
    return rule, await channel_row(conn, acc, rule["channel_id"])


async def _change(
    request: web.Request, conn: AsyncConnection[Any]
) -> tuple[User, Any, dict[str, Any], dict[str, Any]]:
    """A manager's change to the rule of the URL: the user, the form, the rule and its
    channel (counted against the API's write limit)."""
    user, form = await posted(request, conn, MANAGER)
    await api.write_limit(request, conn, user.account_id)
    rule, ch = await _rule_and_channel(conn, user.account_id, request.match_info["rule_id"])
    return user, form, rule, ch


@routes.get("/rules/{rule_id}")
async def rule_page(request: web.Request) -> web.Response:
    async with request.app[POOL].connection() as conn:
        user = await signed_in(request, conn)
        rule, ch = await _rule_and_channel(conn, user.account_id, request.match_info["rule_id"])
        ctx = await _editor_ctx(conn, user, ch, rule["kind"], rule)
    ctx["values"] = _values_of(rule)
    ctx["done"] = {"recompute": "Recompute queued: the last 24 h are judged again."}.get(
        request.query.get("done", "")
    )
    return render(request, user, "rule.html", ctx)


async def _again(
    request: web.Request,
    conn: AsyncConnection[Any],
    user: User,
    rule: dict[str, Any],
    ch: dict[str, Any],
    form: Any,
    errors: dict[str, str],
    which: str,
) -> web.Response:
    """The rule page again with the refused form's values and messages (422)."""
    ctx = await _editor_ctx(conn, user, ch, rule["kind"], rule)
    ctx["values"] = _values_of(rule)
    if which == "rule":
        ctx.update(errors=errors, values=dict(form))
    else:
        ctx.update(werrors=errors, wvalues={**dict(form), "days": form.getall("days", [])})
    return render(request, user, "rule.html", ctx, status=422)


@routes.post("/rules/{rule_id}")
async def save_rule(request: web.Request) -> web.Response:
    async with request.app[POOL].connection() as conn:
        user, form, rule, ch = await _change(request, conn)
        acc = user.account_id
        rk = RULE_KINDS[rule["kind"]]
        body = rule_body(form, rk)
        try:
            await checked(
                _names(rk, RULE_FIELDS), api.change_rule(conn, request, acc, rule, body, user.id)
            )
        except Refused as r:
            return await _again(request, conn, user, rule, ch, form, r.errors, "rule")
    return see_other(f"/rules/{rule['id']}")


def window_of(form: Any, rk: RuleKind) -> dict[str, Any]:
    """The window form as the API's window: days and a start time -> RRULE."""
    days = form.getall("days", [])
    if any(d not in DAY_LABEL for d in days) or len(set(days)) != len(days):
        raise Refused({"days": "days must be among Mon, Tue, Wed, Thu, Fri, Sat, Sun"})
    m = TIME_RE.match(str(form.get("start", "")).strip())
    if not m or int(m[1]) > 23 or int(m[2]) > 59:
        raise Refused({"start": "start must be a time of day such as 22:00"})
    w: dict[str, Any] = {
        "rrule": rrule_of(days, int(m[1]), int(m[2])),
        "duration_min": number(form.get("duration_min", "")),
        "params": None,
    }
    if form.get("during") == "limits":
        w["params"] = rule_body(form, rk)["params"]
    return w


@routes.post("/rules/{rule_id}/windows")
async def add_window(request: web.Request) -> web.Response:
    async with request.app[POOL].connection() as conn:
        user, form, rule, ch = await _change(request, conn)
        acc = user.account_id
        rk = RULE_KINDS[rule["kind"]]
        try:
            body = {"windows": [*(rule["windows"] or []), window_of(form, rk)]}
            names = _names(rk, WINDOW_FIELDS)
            await checked(names, api.change_rule(conn, request, acc, rule, body, user.id))
        except Refused as r:
            return await _again(request, conn, user, rule, ch, form, r.errors, "window")
    return see_other(f"/rules/{rule['id']}")


@routes.post("/rules/{rule_id}/windows/delete")
async def delete_window(request: web.Request) -> web.Response:
    async with request.app[POOL].connection() as conn:
        user, form, rule, ch = await _change(request, conn)
        acc = user.account_id
        windows = list(rule["windows"] or [])
        n = number(form.get("n", ""))
        if not isinstance(n, int) or not 0 <= n < len(windows):
            raise ApiError("invalid_request", f"n must be a window number, 0..{len(windows) - 1}")
        body = {"windows": windows[:n] + windows[n + 1 :]}
        await api.change_rule(conn, request, acc, rule, body, user.id)
    return see_other(f"/rules/{rule['id']}")


@routes.post("/rules/{rule_id}/recompute")
async def recompute(request: web.Request) -> web.Response:
    async with request.app[POOL].connection() as conn:
        user, _ = await posted(request, conn, MANAGER)
        rule = await api.rule_of(conn, user.account_id, request.match_info["rule_id"])
        await api.recompute_channel(conn, request, user.account_id, rule["channel_id"], user.id)
    return see_other(f"/rules/{rule['id']}?done=recompute")
