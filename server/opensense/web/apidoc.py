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
        **live_and_channel_paths(),
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
