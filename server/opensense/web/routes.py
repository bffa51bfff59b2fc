"""The dashboard's pages and its sign-in (docs/dashboard.md): server-rendered HTML
that works without JavaScript, and `POST /v1/auth/request` for clients of the API.

Sign-in is by magic link only: an email gets a 6-character code and a link, each
good once for 10 minutes. Every answer to a request for one is the same whether or
not the email belongs to a user (no enumeration). Every state-changing form carries a
CSRF token bound to the browser: to the session id once signed in, before that to a
random pre-session cookie (`os_pre`), so a token copied from another browser, or kept
from a session that has ended, is refused."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp_jinja2
from aiohttp import web
from psycopg import AsyncConnection

from .. import audit, ratelimit
from ..api.body import json_object
from ..api.keys import CONFIG, LOGIN_MAILER, POOL, PRE_SESSION
from ..errors import ApiError
from . import store
from .store import User

routes = web.RouteTableDef()

SESSION_COOKIE = "os_session"
PRE_COOKIE = "os_pre"
SESSION_MAX_AGE = int(store.SESSION_IDLE.total_seconds())
EMAIL_RE = re.compile(r"^[^@\s]{1,64}@[^@\s]+\.[^@\s]+$")
EMAIL_MAX = 254

# What every page answers with (docs/dashboard.md, "Security"): scripts only from this
# server and never inline, fetches and event streams to this server only, no framing,
# no referrer (a sign-in link's token is in its URL), forms only to this server.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self';"
        " connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


# --- cookies and CSRF ---------------------------------------------------------------


def tls(request: web.Request) -> bool:
    return request.secure or request.app[CONFIG].public_url.startswith("https://")


def csrf_token(binding: str) -> str:
    return hmac.new(binding.encode(), b"opensense-csrf", hashlib.sha256).hexdigest()


def check_csrf(binding: str | None, form: Any) -> None:
    sent = form.get("csrf")
    if (
        not binding
        or not isinstance(sent, str)
        or not hmac.compare_digest(sent, csrf_token(binding))
    ):
        raise ApiError(
            "forbidden", "the form's CSRF token is missing or not this browser's: reload the page"
        )


async def form_of(request: web.Request) -> Any:
    """The posted form: urlencoded, as the pages send it (no files anywhere)."""
    if request.content_type not in (
        "application/x-www-form-urlencoded",
        "application/octet-stream",
    ):
        raise ApiError("invalid_request", "a form is sent as application/x-www-form-urlencoded")
    try:
        return await request.post()
    except ValueError as exc:
        raise ApiError("invalid_request", f"the form cannot be read: {exc}") from exc


def pre_binding(request: web.Request) -> str:
    """The browser's pre-session cookie value, made if it has none yet (set by `page`)."""
    value = request.cookies.get(PRE_COOKIE)
    if not value:
        value = request.get(PRE_SESSION) or secrets.token_urlsafe(32)
        request[PRE_SESSION] = value
    return value


def set_cookie(
    request: web.Request,
    resp: web.StreamResponse,
    name: str,
    value: str,
    *,
    max_age: int | None,
    samesite: str,
) -> None:
    resp.set_cookie(
        name,
        value,
        max_age=max_age,
        path="/",
        httponly=True,
        secure=tls(request),
        samesite=samesite,
    )


def page(
    request: web.Request, template: str, context: dict[str, Any], status: int = 200
) -> web.Response:
    resp = aiohttp_jinja2.render_template(template, request, context, status=status)
    if PRE_SESSION in request:
        set_cookie(request, resp, PRE_COOKIE, request[PRE_SESSION], max_age=None, samesite="Strict")
    return resp


def see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


LOOPBACK = ("127.0.0.1", "::1")


def client_ip(request: web.Request) -> str:
    """The client's address: the peer's, or behind the reverse proxy on this host
    (deploy/Caddyfile: a loopback peer) the last X-Forwarded-For entry, the one the
    proxy added (Caddy replaces what an untrusted client sent)."""
    peer = request.remote or ""
    forwarded = request.headers.get("X-Forwarded-For", "")
    if forwarded and peer in LOOPBACK:
        last = forwarded.split(",")[-1].strip()
        if last:
            return last[:64]
    return peer


async def limit(request: web.Request, conn: AsyncConnection[Any]) -> None:
    """/auth/* and /v1/auth/*: OPENSENSE_AUTH_RATE_PER_MIN requests a minute per IP."""
    cfg = request.app[CONFIG]
    await ratelimit.hit(
        conn, f"auth:{client_ip(request)}", cfg.auth_rate_per_min, 60, cfg.clock(), "Sign-in"
    )


async def current_user(request: web.Request, conn: AsyncConnection[Any]) -> User | None:
    sid = request.cookies.get(SESSION_COOKIE)
    if not sid:
        return None
    return await store.session_user(conn, sid, request.app[CONFIG].clock())


EMAIL_INVALID = "email: an email address of at most 254 characters"


def check_email(raw: Any) -> str:
    """`clean_email`, or the API's refusal (invalid_request) naming the field."""
    email = clean_email(raw)
    if email is None:
        raise ApiError("invalid_request", EMAIL_INVALID)
    return email


def clean_email(raw: Any) -> str | None:
    if not isinstance(raw, str):
        return None
    email = raw.strip().lower()
    return email if len(email) <= EMAIL_MAX and EMAIL_RE.match(email) else None


# --- sign-in ------------------------------------------------------------------------


async def request_sign_in(request: web.Request, conn: AsyncConnection[Any], email: str) -> None:
    """Issue a code and link for a user's email and mail them; nothing for an unknown
    email, and the caller answers the same either way."""
    now = request.app[CONFIG].clock()
    async with conn.transaction():
        user = await store.user_for_email(conn, email)
        if user is None:
            return
        code, link = await store.issue_sign_in(conn, user, now, {"ip": client_ip(request)})
    request.app[LOGIN_MAILER].send(email, code, link)


async def sign_in(
    request: web.Request, conn: AsyncConnection[Any], email: str, via: str, now: datetime
) -> web.Response | None:
    """The session of a redeemed code or link: audited, set as the cookie, and the
    browser sent to the overview."""
    user = await store.user_for_email(conn, email)
    if user is None:  # removed since the code was issued
        return None
    sid = await store.create_session(conn, user.id, now)
    await audit.record(
        conn,
        account_id=user.account_id,
        actor=user.id,
        action="auth.login",
        subject=user.id,
        data={"via": via, "ip": client_ip(request)},
        at=now,
    )
    resp = see_other("/")
    set_cookie(request, resp, SESSION_COOKIE, sid, max_age=SESSION_MAX_AGE, samesite="Lax")
    return resp


@routes.post("/v1/auth/request")
async def api_request(request: web.Request) -> web.Response:
    body = await json_object(request)
    email = clean_email(body.get("email"))
    async with request.app[POOL].connection() as conn:
        await limit(request, conn)
        if email is None:
            raise ApiError("invalid_request", EMAIL_INVALID)
        await request_sign_in(request, conn, email)
    return web.json_response({"ok": True})


@routes.get("/auth/login")
async def login_form(request: web.Request) -> web.Response:
    async with request.app[POOL].connection() as conn:
        await limit(request, conn)
    return page(request, "login.html", {"csrf": csrf_token(pre_binding(request))})


@routes.post("/auth/login")
async def login_submit(request: web.Request) -> web.Response:
    form = await form_of(request)
    async with request.app[POOL].connection() as conn:
        await limit(request, conn)
        check_csrf(request.cookies.get(PRE_COOKIE), form)
        csrf = csrf_token(request.cookies[PRE_COOKIE])
        email = clean_email(form.get("email"))
        if email is None:
            ctx = {"csrf": csrf, "error": EMAIL_INVALID}
            return page(request, "login.html", ctx, status=422)
        await request_sign_in(request, conn, email)
    return page(request, "code.html", {"csrf": csrf, "email": email})


@routes.post("/auth/code")
async def code_submit(request: web.Request) -> web.Response:
    form = await form_of(request)
    now = request.app[CONFIG].clock()
    async with request.app[POOL].connection() as conn:
        await limit(request, conn)
        check_csrf(request.cookies.get(PRE_COOKIE), form)
        email = clean_email(form.get("email"))
        code = form.get("code")
        if email is not None and isinstance(code, str) and len(code) <= 32:
            async with conn.transaction():
                if await store.redeem_code(conn, email, code, now):
                    resp = await sign_in(request, conn, email, "code", now)
                    if resp is not None:
                        return resp
    ctx = {
        "csrf": csrf_token(request.cookies[PRE_COOKIE]),
        "email": email or "",
        "error": "code: wrong, already used or expired; ask for a new one if it keeps failing",
    }
    return page(request, "code.html", ctx, status=422)


@routes.get("/auth/link")
async def link_form(request: web.Request) -> web.Response:
    """A link opens a page with a button, not a session: mail scanners that fetch
    links would otherwise use up the link before its owner does."""
    t = request.query.get("t", "")
    async with request.app[POOL].connection() as conn:
        await limit(request, conn)
        ok = 0 < len(t) <= 128 and await store.link_pending(conn, t, request.app[CONFIG].clock())
    ctx = {"csrf": csrf_token(pre_binding(request)), "t": t, "ok": ok}
    return page(request, "link.html", ctx)


@routes.post("/auth/link")
async def link_submit(request: web.Request) -> web.Response:
    form = await form_of(request)
    now = request.app[CONFIG].clock()
    t = form.get("t")
    async with request.app[POOL].connection() as conn:
        await limit(request, conn)
        check_csrf(request.cookies.get(PRE_COOKIE), form)
        if isinstance(t, str) and 0 < len(t) <= 128:
            async with conn.transaction():
                email = await store.redeem_link(conn, t, now)
                if email is not None:
                    resp = await sign_in(request, conn, email, "link", now)
                    if resp is not None:
                        return resp
    ctx = {"csrf": csrf_token(request.cookies[PRE_COOKIE]), "t": "", "ok": False}
    return page(request, "link.html", ctx, status=422)


@routes.post("/auth/logout")
async def logout(request: web.Request) -> web.Response:
    form = await form_of(request)
    sid = request.cookies.get(SESSION_COOKIE)
    async with request.app[POOL].connection() as conn:
        await limit(request, conn)
        check_csrf(sid, form)
        assert sid is not None
        await store.end_session(conn, sid)
    resp = see_other("/auth/login")
    resp.del_cookie(SESSION_COOKIE, path="/")
    return resp


@routes.post("/auth/logout-all")
async def logout_all(request: web.Request) -> web.Response:
    """Sign out everywhere: every session of this user ends."""
    form = await form_of(request)
    sid = request.cookies.get(SESSION_COOKIE)
    now = request.app[CONFIG].clock()
    async with request.app[POOL].connection() as conn:
        await limit(request, conn)
        check_csrf(sid, form)
        async with conn.transaction():
            user = await current_user(request, conn)
            if user is not None:
                n = await store.end_all_sessions(conn, user.id)
                await audit.record(
                    conn,
                    account_id=user.account_id,
                    actor=user.id,
                    action="auth.logout_all",
                    subject=user.id,
                    data={"sessions": n},
                    at=now,
                )
    resp = see_other("/auth/login")
    resp.del_cookie(SESSION_COOKIE, path="/")
    return resp


CSS = (Path(__file__).parent / "static" / "dashboard.css").read_bytes()


@routes.get("/static/dashboard.css")
async def stylesheet(request: web.Request) -> web.Response:
    return web.Response(
        body=CSS, content_type="text/css", headers={"Cache-Control": "public, max-age=3600"}
    )
