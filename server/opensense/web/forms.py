"""The management pages' forms (web/devices.py, web/account.py): the signed-in user of
a POST with its CSRF token checked and its role required, and an API refusal placed
next to the field it names, in the API's own words (the pages call the API's
validation, they never word a refusal of their own)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from aiohttp import web
from psycopg import AsyncConnection

from ..errors import ApiError
from .routes import SESSION_COOKIE, check_csrf, form_of
from .session import require, signed_in
from .store import User

# refusals that name no field in their message: the field whose id was not found
NOT_FOUND_FIELD = {"site_not_found": "site_id"}
MAX_FIELD = 4096  # characters of any one form value read at all; the API bounds each less


async def posted(request: web.Request, conn: AsyncConnection[Any], role: str) -> tuple[User, Any]:
    """(user, form) of a page's POST: signed in, the CSRF token this session's, the
    role at least `role`; each refusal before anything is read or changed."""
    form = await form_of(request)
    user = await signed_in(request, conn)
    check_csrf(request.cookies.get(SESSION_COOKIE), form)
    require(user, role)
    return user, form


def text(form: Any, key: str) -> Any:
    """A form value as the API would get it in JSON: the string, or None when absent
    (a wrong type there is the API's to refuse); over-long values pass through for the
    API to refuse with its message, cut to MAX_FIELD."""
    v = form.get(key)
    return v[:MAX_FIELD] if isinstance(v, str) else None


def field_of(err: ApiError, fields: Sequence[str]) -> str:
    """The form field an API refusal is about: the one its message starts with or
    names, the field of a not-found id, else "form" (shown above the form)."""
    if err.code in NOT_FOUND_FIELD and NOT_FOUND_FIELD[err.code] in fields:
        return NOT_FOUND_FIELD[err.code]
    for f in fields:
        if err.message.startswith(f + " ") or err.message.startswith(f + ":"):
            return f
    for f in fields:
        if re.search(rf"\b{re.escape(f)}\b", err.message):
            return f
    return "form"


def errors_of(err: ApiError, fields: Sequence[str]) -> dict[str, str]:
    return {field_of(err, fields): err.message}
