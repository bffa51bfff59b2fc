"""The dashboard's part of the OpenAPI document (merged by opensense.openapi): the
sign-in request of the API, and the pages, so the document holds every route."""

from __future__ import annotations

from typing import Any

from ..api.spec import body, err, obj, ok, op, q

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
    }
