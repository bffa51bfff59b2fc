"""Strict JSON for every body that crosses the wire (HTTP, MQTT, the gateway's doors).

Python's `json` accepts NaN and Infinity, which JSON has not; it raises
RecursionError (not ValueError) on deep nesting; and it lets through strings that
PostgreSQL cannot store (a NUL, an unpaired UTF-16 surrogate). `loads` refuses all of
these with a `WireError("bad_json", why)`, so a server door and a gateway door read
the same bytes the same way. Duplicate keys keep the last value, as `json` does
(all three doors always did; changing it would refuse bodies accepted today).

The size bound is the transport's (`payload.MAX_BODY_BYTES`: aiohttp's
client_max_size, the broker's packet size, the gateway door's Content-Length check);
the depth bound is the interpreter's recursion limit, reported as bad_json.
"""

from __future__ import annotations

import json
from typing import Any

from .errors import WireError


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number (JSON has no NaN or Infinity)")


def loads(raw: bytes) -> Any:
    """The JSON value of `raw`, strictly; raises WireError("bad_json", why)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WireError("bad_json", f"the body is not UTF-8 text (byte {exc.start})") from None
    try:
        body = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise WireError("bad_json", "the body nests arrays or objects too deeply") from None
    except ValueError as exc:
        raise WireError("bad_json", f"the body is not valid JSON: {exc}") from None
    check_text(body)
    return body


def check_text(body: Any) -> None:
    """Every string in a JSON body is text PostgreSQL can store: no NUL character and
    no unpaired UTF-16 surrogate (JSON's \\ud800 escapes allow one; UTF-8 does not)."""
    stack: list[tuple[str, Any]] = [("", body)]
    while stack:
        field, value = stack.pop()
        where = field or "the body"
        if isinstance(value, dict):
            for k, v in value.items():
                stack.append((f"a key of {where}", k))
                stack.append((f"{field}.{k[:40]}" if field else k[:40], v))
        elif isinstance(value, list):
            stack.extend((f"{where}[{i}]", v) for i, v in enumerate(value))
        elif isinstance(value, str):
            if "\x00" in value:
                raise WireError(
                    "bad_json", f"{where} holds a NUL character (\\u0000), which no text may"
                )
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise WireError(
                    "bad_json",
                    f"{where} holds an unpaired UTF-16 surrogate: it is not valid Unicode",
                ) from None
