"""The dashboard's part of the OpenAPI document (merged by opensense.openapi): the
sign-in request of the API, and the pages, so the document holds every route."""

from __future__ import annotations

from typing import Any

from ..api.spec import body, err, obj, ok, op, path_param, q

S = dict[str, Any]
HTML = {"content": {"text/html": {"schema": {"type": "string"}}}}
EMAIL = {"type": "string", "format": "email", "maxLength": 254}


def html(status: int, description: str) -> S:
    return {str(status): {"description": description, **HTML}}


def see_other(description: str) -> S:
    return {"303": {"description": description}}


def form(props: S, required: tuple[str, ...]) -> S:
    return {
        "required": True,
        "content": {"application/x-www-form-urlencoded": {"schema": obj(props, required)}},
    }


CSRF = {"csrf": {"type": "string"}}
NO_TOKEN: list[S] = []  # the pages use the session cookie, or nothing before sign-in


def paths() -> S:
    return {**sign_in_paths(), **manage_paths()}


def sign_in_paths() -> S:
    return {
        "/v1/auth/request": {
            "post": op(
                "Ask for a sign-in code and link by email (200 whether or not the email is a user's)",
                {**ok(200, obj({"ok": {"type": "boolean"}}, ("ok",))), **err(400, 413, 429)},
                security=NO_TOKEN,
                requestBody=body(obj({"email": EMAIL}, ("email",)), {"email": "owner@example.com"}),
                description="docs/dashboard.md, Sign-in. Limited per IP (OPENSENSE_AUTH_RATE_PER_MIN).",
            )
        },
        "/": {
            "get": op(
                "Dashboard: the overview of the signed-in user's account (HTML)",
                {**html(200, "The overview"), **see_other("Not signed in: to /auth/login")},
                security=NO_TOKEN,
            )
        },
        "/static/dashboard.css": {
            "get": op(
                "Dashboard: the stylesheet",
                {
                    "200": {
                        "description": "OK",
                        "content": {"text/css": {"schema": {"type": "string"}}},
                    }
                },
                security=NO_TOKEN,
                uses_db=False,
            )
        },
        "/auth/login": {
            "get": op(
                "Dashboard: the sign-in form (HTML)",
                {**html(200, "The form"), **err(429)},
                security=NO_TOKEN,
            ),
            "post": op(
                "Dashboard: send a sign-in code and link to an email address",
                {
                    **html(200, "The code entry form"),
                    **html(422, "Not an email address: the form again, saying so"),
                    **err(403, 413, 429),
                },
                security=NO_TOKEN,
                requestBody=form({**CSRF, "email": EMAIL}, ("csrf", "email")),
            ),
        },
        "/auth/code": {
            "post": op(
                "Dashboard: sign in with the mailed code",
                {
                    **see_other("Signed in (session cookie set): to /"),
                    **html(422, "Wrong, used or expired code: the form again, saying so"),
                    **err(403, 413, 429),
                },
                security=NO_TOKEN,
                requestBody=form(
                    {**CSRF, "email": EMAIL, "code": {"type": "string", "maxLength": 32}},
                    ("csrf", "email", "code"),
                ),
            )
        },
        "/auth/link": {
            "get": op(
                "Dashboard: the mailed link's page, a button that signs in (HTML)",
                {**html(200, "The page"), **err(429)},
                security=NO_TOKEN,
                parameters=[q("t", {"type": "string", "maxLength": 128}, "the link's token")],
            ),
            "post": op(
                "Dashboard: sign in with the mailed link",
                {
                    **see_other("Signed in (session cookie set): to /"),
                    **html(422, "Used, replaced or expired link"),
                    **err(403, 413, 429),
                },
                security=NO_TOKEN,
                requestBody=form({**CSRF, "t": {"type": "string"}}, ("csrf", "t")),
            ),
        },
        "/auth/logout": {
            "post": op(
                "Dashboard: sign out (this session)",
                {**see_other("Signed out: to /auth/login"), **err(403, 413, 429)},
                security=NO_TOKEN,
                requestBody=form(CSRF, ("csrf",)),
            )
        },
        "/auth/logout-all": {
            "post": op(
                "Dashboard: sign out everywhere (every session of the user)",
                {**see_other("Signed out: to /auth/login"), **err(403, 413, 429)},
                security=NO_TOKEN,
                requestBody=form(CSRF, ("csrf",)),
            )
        },
        **config_pages(),
        **live_and_channel_paths(),
        **report_pages(),
    }


# --- rules, notifications, audit (web/rules.py, web/notify.py, web/audit.py) ---------

FIELD = {"type": "string"}
SIGNED_OUT = see_other("Not signed in: to /auth/login")
REFUSED = html(422, "Refused: the form again with the API's message next to the field")
FORM_ERRORS = err(403, 404, 413, 429)  # CSRF or role, another account's id, size, rate


def _page(summary: str, *params: S, answers: S | None = None) -> S:
    extra: S = {"parameters": list(params)} if params else {}
    return op(
        f"Dashboard: {summary} (HTML)",
        {**html(200, "The page"), **SIGNED_OUT, **err(404), **(answers or {})},
        security=NO_TOKEN,
        **extra,
    )


def _post(summary: str, fields: S, answers: S, *params: str) -> S:
    extra: S = {"parameters": [path_param(p) for p in params]} if params else {}
    return op(
        f"Dashboard: {summary}",
        {**answers, **SIGNED_OUT, **REFUSED, **FORM_ERRORS},
        security=NO_TOKEN,
        requestBody=form({**CSRF, **fields}, ("csrf",)),
        **extra,
    )


def config_pages() -> S:
    redirect = see_other("Done: to the page that shows it")
    rule = {k: FIELD for k in ("grace_min", "clear_min", "renotify_min", "severity", "enabled")}
    window = {k: FIELD for k in ("days", "start", "duration_min", "during")}
    before = q("before", {"type": "string", "maxLength": 18}, "the next page: rows below this")
    return {
        "/rules": {"get": _page("the account's alarm rules and silences")},
        "/rules/new": {
            "get": _page(
                "the rule editor, filled from a preset or empty for a kind",
                q("channel_id", FIELD, "the channel"),
                q("start", FIELD, "preset:<vertical>:<measurement> or kind:<rule kind>"),
                answers=html(422, "Not a start for this channel: /rules, saying so at the field"),
            ),
            "post": _post(
                "create a rule (manager)",
                {"channel_id": FIELD, "kind": FIELD, **rule},
                see_other("Created: to the rule's page"),
            ),
        },
        "/rules/silences": {
            "post": _post(
                "silence notifications from now until a time (manager)",
                {"scope": FIELD, "to": FIELD, "reason": FIELD},
                redirect,
            )
        },
        "/rules/{rule_id}": {
            "get": _page("one rule: editor, windows in words, recompute", path_param("rule_id")),
            "post": _post("save a rule (manager)", rule, redirect, "rule_id"),
        },
        "/rules/{rule_id}/windows": {
            "post": _post("add a time window to a rule (manager)", window, redirect, "rule_id")
        },
        "/rules/{rule_id}/windows/delete": {
            "post": _post(
                "remove a rule's time window (manager)", {"n": FIELD}, redirect, "rule_id"
            )
        },
        "/rules/{rule_id}/recompute": {
            "post": _post(
                "recompute the rule's channel, last 24 h (manager)", {}, redirect, "rule_id"
            )
        },
        "/notifications": {
            "get": _page("recipients, Telegram linking, escalation, the outbound log", before)
        },
        "/notifications/recipients": {
            "post": _post(
                "add a recipient (manager)",
                {k: FIELD for k in ("path", "address", "name", "site_id", "roles")},
                html(201, "Added: the page, with a webhook's secret shown once"),
            )
        },
        "/notifications/recipients/{target_id}/delete": {
            "post": _post("remove a recipient (manager)", {}, redirect, "target_id")
        },
        "/notifications/telegram": {
            "post": _post(
                "a one-time code that links a Telegram chat (manager)",
                {"site_id": FIELD, "roles": FIELD},
                html(201, "The page with the code to send to the bot"),
            )
        },
        "/notifications/escalation/{site_id}": {
            "post": _post(
                "save a site's escalation steps (manager)",
                {"delay_min_0": FIELD, "to_0": FIELD},
                redirect,
                "site_id",
            )
        },
        "/audit": {"get": _page("the account's audit trail and its verification", before)},
        "/audit/verify": {
            "post": _post(
                "verify this account's audit trail now",
                {},
                html(200, "The audit page with the result"),
            )
        },
    }


# --- devices and account (web/devices.py, web/account.py) ------------------------------

SIGN_IN = see_other("Not signed in: to /auth/login")
REFUSED = err(403, 404, 413)  # CSRF or role (403), another account's id (404)


def page_post(summary: str, fields: S, required: tuple[str, ...], *params: str, **ok: S) -> S:
    """A POST of a management page: the page again (200/201, or 4xx with the API's
    message next to the field), or the refusals of the envelope."""
    responses: S = {**SIGN_IN, **REFUSED, **html(200, "The page, saying what was done")}
    for status, description in (
        ("404", "Another account's id (a form's field): the page, saying so"),
        ("409", "Conflict (e.g. a local id in use, the last owner): the page, saying so"),
        ("422", "Refused by the API's checks: the page, the message next to the field"),
    ):
        responses[status] = {
            "description": description,
            "content": {**HTML["content"], **err(int(status))[status]["content"]},
        }
    responses["400"] = {
        "description": "Refused by the API's checks: the page, the message next to the field",
        "content": {**HTML["content"], **err(400)["400"]["content"]},
    }
    responses.update(ok)
    return op(
        summary,
        responses,
        security=NO_TOKEN,
        requestBody=form({**CSRF, **fields}, ("csrf", *required)),
        parameters=[path_param(p) for p in params],
    )


def page_get(summary: str, *params: str, roles: bool = False) -> S:
    responses: S = {**html(200, "The page"), **SIGN_IN}
    if params:
        responses.update(err(404))
    if roles:
        responses.update(err(403))
    extra: S = {"parameters": [path_param(p) for p in params]} if params else {}
    return op(summary, responses, security=NO_TOKEN, **extra)


TEXT = {"type": "string", "maxLength": 4096}


def manage_paths() -> S:
    return {
        "/devices": {"get": page_get("Dashboard: sites and their devices (HTML)")},
        "/devices/new": {
            "get": page_get("Dashboard: the add-a-device form (HTML; manager)", roles=True),
            "post": page_post(
                "Dashboard: add a device; the answer holds what to paste (shown once)",
                {
                    "site_id": TEXT,
                    "name": TEXT,
                    "local_id": TEXT,
                    "kind": {
                        "type": "string",
                        "enum": ["node", "shelly", "shelly_gen3", "lorawan"],
                    },
                    "dev_eui": TEXT,
                },
                ("site_id", "name", "local_id", "kind"),
                **html(201, "Added: the node config, Shelly URL or TTN webhook to paste"),
            ),
        },
        "/devices/{device_id}": {
            "get": page_get("Dashboard: a device's health and actions (HTML)", "device_id")
        },
        "/devices/{device_id}/rotate-token": {
            "post": page_post(
                "Dashboard: rotate a device's ingest token (manager); the new one shown once",
                {},
                (),
                "device_id",
            )
        },
        "/devices/{device_id}/move": {
            "post": page_post(
                "Dashboard: move a device to another site of the account, from now (manager)",
                {"site_id": TEXT},
                ("site_id",),
                "device_id",
            )
        },
        "/devices/{device_id}/identify": {
            "post": page_post(
                "Dashboard: blink the node's LED (cmd/identify; operator)",
                {},
                (),
                "device_id",
            )
        },
        "/account": {"get": page_get("Dashboard: users and roles, API tokens, export (HTML)")},
        "/account/users": {
            "post": page_post(
                "Dashboard: invite a user by email with a role (owner); mails a sign-in link",
                {
                    "email": TEXT,
                    "role": {"type": "string", "enum": ["viewer", "operator", "manager", "owner"]},
                },
                ("email", "role"),
                **err(429),
            )
        },
        "/account/users/{user_id}/role": {
            "post": page_post(
                "Dashboard: change a user's role (owner; an account keeps one owner)",
                {"role": TEXT},
                ("role",),
                "user_id",
                **see_other("Demoted yourself: to /account"),
            )
        },
        "/account/users/{user_id}/remove": {
            "post": page_post(
                "Dashboard: remove a user (owner; an account keeps one owner)",
                {},
                (),
                "user_id",
                **see_other("Removed yourself: to /auth/login"),
            )
        },
        "/account/tokens": {
            "post": page_post(
                "Dashboard: create an API (ua_live) or webhook (whk) token (owner), shown once",
                {"kind": {"type": "string", "enum": ["ua_live", "whk"]}, "name": TEXT},
                ("kind",),
            )
        },
        "/account/tokens/{token_id}/revoke": {
            "post": page_post(
                "Dashboard: revoke an API or webhook token (owner)", {}, (), "token_id"
            )
        },
        "/account/export": {
            "get": op(
                "Dashboard: a ZIP of CSV and JSON of everything the account owns (owner)",
                {
                    "200": {
                        "description": "The ZIP, streamed",
                        "content": {"application/zip": {"schema": {"type": "string"}}},
                    },
                    **SIGN_IN,
                    **err(403),
                },
                security=NO_TOKEN,
            )
        },
    }


# --- live updates and the channel page (web/live.py, web/channel.py) ------------------

RANGE = q("range", {"type": "string", "enum": ["24h", "7d", "30d", "13m"]}, "the chart's range")
NOTE_TEXT = {"type": "string", "maxLength": 2000}
SERIES = {"type": "array", "items": {"type": ["number", "null"]}}


def asset(summary: str, ctype: str) -> S:
    return op(
        summary,
        {"200": {"description": "OK", "content": {ctype: {"schema": {"type": "string"}}}}},
        security=NO_TOKEN,
        uses_db=False,
    )


def person_step(what: str) -> S:
    return op(
        f"Dashboard: {what} one of the channel's events with a note (operator role or above)",
        {
            **see_other("Done: back to the channel page (or not signed in: to /auth/login)"),
            **html(
                422, "A field is wrong or the event's state forbids it: the page again, saying so"
            ),
            **err(403, 404, 413),
        },
        security=NO_TOKEN,
        parameters=[path_param("channel_id"), path_param("event_id")],
        requestBody=form(
            {
                **CSRF,
                "note": NOTE_TEXT,
                "cause": NOTE_TEXT,
                "action": NOTE_TEXT,
                "product": NOTE_TEXT,
            },
            ("csrf", "note"),
        ),
        description="docs/dashboard.md, Channel. The same validation as POST /v1/events/{id}/ack.",
    )


def live_and_channel_paths() -> S:
    chart = obj(
        {
            "channel": obj({"id": {"type": "string"}, "unit": {"type": "string"}}),
            "range": {"type": "string"},
            "agg": {"type": "string", "enum": ["5m", "1h", "1d"]},
            "from": {"type": "integer"},
            "to": {"type": "integer"},
            "x": {"type": "array", "items": {"type": "integer"}},
            "mean": SERIES,
            "min": SERIES,
            "max": SERIES,
            "bands": {"type": "array", "items": {"type": "object"}},
            "thresholds": {"type": "array", "items": {"type": "object"}},
        },
        ("range", "agg", "x", "mean", "min", "max", "bands", "thresholds"),
    )
    return {
        "/live": {
            "get": op(
                "Dashboard: live changes of the account's overview (Server-Sent Events)",
                {
                    "200": {
                        "description": "An event stream: `board` events (JSON: devices, cards)",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    },
                    **see_other("Not signed in: to /auth/login"),
                },
                security=NO_TOKEN,
                description="docs/dashboard.md, Live updates.",
            )
        },
        "/channels/{channel_id}": {
            "get": op(
                "Dashboard: a channel's chart, data table and events (HTML)",
                {**html(200, "The page"), **see_other("Not signed in: to /auth/login"), **err(404)},
                security=NO_TOKEN,
                parameters=[path_param("channel_id"), RANGE],
            )
        },
        "/channels/{channel_id}/data": {
            "get": op(
                "Dashboard: a channel's chart data (rollup buckets, alarm bands, thresholds)",
                {**ok(200, chart), **see_other("Not signed in: to /auth/login"), **err(404)},
                security=NO_TOKEN,
                parameters=[path_param("channel_id"), RANGE],
            )
        },
        "/channels/{channel_id}/events/{event_id}/ack": {"post": person_step("acknowledge")},
        "/channels/{channel_id}/events/{event_id}/clear": {"post": person_step("clear")},
        "/static/live.js": {
            "get": asset("Dashboard: the overview's live script", "text/javascript")
        },
        "/static/channel.js": {
            "get": asset("Dashboard: the channel chart's script", "text/javascript")
        },
        "/static/vendor/uplot/uPlot.iife.min.js": {
            "get": asset("Dashboard: uPlot (vendored, MIT)", "text/javascript")
        },
        "/static/vendor/uplot/uPlot.min.css": {
            "get": asset("Dashboard: uPlot's stylesheet", "text/css")
        },
        "/static/vendor/uplot/LICENSE": {"get": asset("Dashboard: uPlot's licence", "text/plain")},
    }


# --- reports (web/reports.py) ----------------------------------------------------------


def report_pages() -> S:
    refused = {
        str(status): {
            "description": f"Refused ({why}): the page, the API's message next to the field",
            "content": {**HTML["content"], **err(status)[str(status)]["content"]},
        }
        for status, why in (
            (400, "a field"),
            (404, "another account's site"),
            (422, "a month not over yet"),
            (429, "the account's queue is full"),
        )
    }
    month = {"type": "string", "maxLength": 20, "description": "YYYY-MM"}
    return {
        "/reports": {
            "get": _page(
                "the account's reports, newest first, and the form to ask for one",
                q("before", {"type": "string", "maxLength": 64}, "the next page: older reports"),
            ),
            "post": op(
                "Dashboard: ask for a report of a site's month (operator)",
                {
                    **see_other("Queued: to /reports"),
                    **SIGNED_OUT,
                    **err(403, 413),
                    **refused,
                },
                security=NO_TOKEN,
                requestBody=form(
                    {
                        **CSRF,
                        "site_id": FIELD,
                        "template": FIELD,
                        "month": month,
                        "language": FIELD,
                    },
                    ("csrf", "site_id", "month"),
                ),
            ),
        },
        "/reports/{report_id}/file": {
            "get": op(
                "Dashboard: a ready report's PDF, rendered again with its recorded SHA-256",
                {
                    "200": {
                        "description": "The PDF",
                        "content": {"application/pdf": {"schema": {"type": "string"}}},
                    },
                    **SIGNED_OUT,
                    **err(404, 409),
                },
                security=NO_TOKEN,
                parameters=[path_param("report_id")],
            )
        },
    }
