"""The pages' forms: the signed-in user of a POST with its CSRF token checked and its
role required, a posted form turned into the body the API takes, and an API refusal
placed next to the field it names, in the API's own words (the pages call the API's
validation, they never word a refusal of their own; docs/dashboard.md, "Forms").

A form field is named as the API's key (grace_min, ok_max, site_id, ...), so the
field an API message is about is the first field name the message mentions."""

from __future__ import annotations

import math
import re
from collections.abc import Awaitable, Iterable, Sequence
from typing import Any, TypeVar

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


def field_of(message: str, names: Iterable[str]) -> str:
    """The field whose name the message mentions first ("form": none, shown above the
    form)."""
    best, at = FORM, len(message) + 1
    for name in names:
        m = re.search(rf"(?<![\w]){re.escape(name)}(?![\w])", message)
        if m and m.start() < at:
            best, at = name, m.start()
    return best


def errors_of(err: ApiError, fields: Sequence[str]) -> dict[str, str]:
    """The refusal by field; a not-found id's message names no field: its field."""
    if err.code in NOT_FOUND_FIELD and NOT_FOUND_FIELD[err.code] in fields:
        return {NOT_FOUND_FIELD[err.code]: err.message}
    return {field_of(err.message, fields): err.message}


T = TypeVar("T")

# Refusals shown next to a field (the form again, 422). Any other code (not found,
# forbidden, too many requests) leaves as the API's error envelope.
FIELD_CODES = ("invalid_request", "invalid_rule", "conflict")
INT_RE = re.compile(r"^[+-]?\d{1,15}$")
FORM = "form"  # an error about the form as a whole


class Refused(Exception):
    """The form again, with these messages by field."""

    def __init__(self, errors: dict[str, str]) -> None:
        super().__init__(errors)
        self.errors = errors


async def checked(names: Iterable[str], work: Awaitable[T]) -> T:
    """Run an API function; its refusal becomes Refused with the message at its field."""
    try:
        return await work
    except ApiError as err:
        if err.code not in FIELD_CODES:
            raise
        raise Refused({field_of(err.message, names): err.message}) from None


def number(raw: Any) -> Any:
    """A form value as the API's JSON would carry it: "" -> None (left out), a whole
    number -> int, a finite decimal -> float, anything else as it was (so the API
    says what it should be)."""
    if not isinstance(raw, str):
        return raw
    v = raw.strip()
    if not v:
        return None
    if INT_RE.match(v):
        return int(v)
    try:
        f = float(v.replace(",", "."))
    except ValueError:
        return raw
    return f if math.isfinite(f) and len(v) <= 32 else raw


def given(raw: Any) -> str | None:
    """ "" -> None (left out), else the text as typed."""
    return raw if isinstance(raw, str) and raw != "" else None
