"""What every signed-in page shares: the signed-in user, the role a page or form
needs, and rendering a page with the navigation, the CSRF token and the refreshed
session cookie (docs/dashboard.md, "Roles").

Pages live in modules of their own (`web/<area>.py`, templates `<area>*.html`), each
with a `RouteTableDef` named `routes` listed in `web/__init__.py`; they use these
helpers and nothing of one another."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from psycopg import AsyncConnection

from ..api.keys import CONFIG
from ..errors import ApiError
from . import store
from .routes import SESSION_COOKIE, SESSION_MAX_AGE, csrf_token, page, set_cookie
from .store import User

# Roles grow in rights: each has every right of the ones before it.
ROLES = ("viewer", "operator", "manager", "owner")
RANK = {r: i for i, r in enumerate(ROLES)}

# The navigation, as data: (path, label). A page appears in it once its route exists.
NAV = (
    ("/", "Overview"),
    ("/devices", "Devices"),
    ("/reports", "Reports"),
    ("/rules", "Rules"),
    ("/notifications", "Notifications"),
    ("/audit", "Audit"),
    ("/account", "Account"),
)


class SignIn(web.HTTPSeeOther):
    """No session (or an ended one): the browser is sent to the sign-in page."""

    def __init__(self) -> None:
        super().__init__("/auth/login")


async def signed_in(request: web.Request, conn: AsyncConnection[Any]) -> User:
    """The signed-in user, or a redirect to the sign-in page."""
    sid = request.cookies.get(SESSION_COOKIE)
    user = None if not sid else await store.session_user(conn, sid, request.app[CONFIG].clock())
    if user is None:
        raise SignIn()
    return user


def allowed(user: User, role: str) -> bool:
    return RANK[user.role] >= RANK[role]


def require(user: User, role: str) -> None:
    """Refuse (403, the error envelope) a user whose role is below `role`."""
    if not allowed(user, role):
        raise ApiError("forbidden", f"this needs the {role} role; you are {user.role}")


def nav(request: web.Request) -> list[dict[str, Any]]:
    served = {
        r.canonical for r in request.app.router.resources() if isinstance(r, web.PlainResource)
    }
    here = request.path
    return [
        {
            "href": href,
            "label": label,
            "current": here == href or (href != "/" and here.startswith(href + "/")),
        }
        for href, label in NAV
        if href in served
    ]


def render(
    request: web.Request,
    user: User,
    template: str,
    context: dict[str, Any],
    status: int = 200,
) -> web.Response:
    """A signed-in page: its template with `user`, `csrf`, `nav` and `can` (role checks
    for showing forms) added, and the session's 30 days of inactivity restarted in the
    browser too."""
    sid = request.cookies[SESSION_COOKIE]
    ctx = {
        "user": user,
        "csrf": csrf_token(sid),
        "nav": nav(request),
        "can": {r: allowed(user, r) for r in ROLES},
        **context,
    }
    resp = page(request, template, ctx, status=status)
    set_cookie(request, resp, SESSION_COOKIE, sid, max_age=SESSION_MAX_AGE, samesite="Lax")
    return resp
