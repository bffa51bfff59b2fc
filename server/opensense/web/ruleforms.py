"""Forms of the configuration pages (rules, notifications; `posted` is web/forms.py's): a posted form becomes the
JSON-like body the alarm API takes, the API's own function checks and stores it, and
its message is shown next to the field it names (docs/dashboard.md, "Forms").

A form field is named as the API's key (grace_min, ok_max, reason, address, ...), so
the field an API message is about is the first field name the message mentions."""

from __future__ import annotations

import math
import re
from collections.abc import Awaitable, Iterable
from typing import Any, TypeVar

from ..errors import ApiError

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


def field_of(message: str, names: Iterable[str]) -> str:
    """The field whose name the message mentions first (FORM if none)."""
    best, at = FORM, len(message) + 1
    for name in names:
        m = re.search(rf"(?<![\w]){re.escape(name)}(?![\w])", message)
        if m and m.start() < at:
            best, at = name, m.start()
    return best


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


def text(raw: Any) -> str | None:
    """ "" -> None (left out), else the text as typed."""
    return raw if isinstance(raw, str) and raw != "" else None
