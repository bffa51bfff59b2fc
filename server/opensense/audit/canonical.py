"""Canonical JSON for audit rows: the RFC 8785 (JCS) rules for the JSON this trail
stores. Pure; no I/O.

- objects: members sorted by the UTF-16 code units of their names (RFC 8785 §3.2.3),
  no whitespace anywhere, `{"a":1,"b":[true,null]}`;
- strings: UTF-8, escaped only where JSON requires it: `"` and `\\` as `\\"` `\\\\`,
  U+0008/09/0A/0C/0D as `\\b \\t \\n \\f \\r`, other controls below U+0020 as `\\u00xx`
  (lower-case hex); everything else literally (no `\\u` for non-ASCII);
- numbers: integers as decimal digits; floats as ECMAScript's Number.toString
  (shortest round-trip digits; integral values below 1e21 without a fraction, so
  1.0 -> `1`; exponents as `1e+21`, `1e-7`); NaN and infinities are refused;
- true, false, null as themselves.

Only what PostgreSQL jsonb round-trips is allowed: NUL in strings is refused, and an
integer must fit what a float represents exactly or stay an int (jsonb keeps digits).
"""

from __future__ import annotations

import math
from typing import Any

_ESC = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


class NotCanonical(ValueError):
    """A value that has no canonical JSON form here (NaN, NUL, a set, …)."""


def _string(s: str) -> str:
    if "\x00" in s:
        raise NotCanonical("strings in the audit trail may not contain NUL (jsonb refuses it)")
    out = ['"']
    for ch in s:
        if ch in _ESC:
            out.append(_ESC[ch])
        elif ch < " ":
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _number(x: float) -> str:
    if not math.isfinite(x):
        raise NotCanonical("NaN and infinity have no JSON form")
    if x == 0:
        return "0"
    r = repr(x)  # shortest round-trip digits, like ECMAScript
    if "e" not in r:
        return str(int(x)) if x.is_integer() else r
    mant, exp = r.split("e")
    e = int(exp)
    if -7 < e < 21:  # ECMAScript writes these without an exponent
        sign = "-" if mant.startswith("-") else ""
        int_part, _, frac = mant.lstrip("-").partition(".")
        digits = (int_part + frac).rstrip("0") or "0"
        point = len(int_part) + e  # position of the decimal point within digits
        if point <= 0:
            return f"{sign}0.{'0' * -point}{digits}"
        if point >= len(digits):
            return sign + digits + "0" * (point - len(digits))
        return f"{sign}{digits[:point]}.{digits[point:]}"
    if mant.endswith(".0"):
        mant = mant[:-2]
    return f"{mant}e{'+' if e > 0 else '-'}{abs(e)}"


def _encode(v: Any, out: list[str]) -> None:
    if v is None:
        out.append("null")
    elif v is True:
        out.append("true")
    elif v is False:
        out.append("false")
    elif isinstance(v, int):
        out.append(str(v))
    elif isinstance(v, float):
        out.append(_number(v))
    elif isinstance(v, str):
        out.append(_string(v))
    elif isinstance(v, list | tuple):
        out.append("[")
        for i, item in enumerate(v):
            if i:
                out.append(",")
            _encode(item, out)
        out.append("]")
    elif isinstance(v, dict):
        for k in v:
            if not isinstance(k, str):
                raise NotCanonical(f"object member names must be strings, not {type(k).__name__}")
        out.append("{")
        for i, k in enumerate(sorted(v, key=lambda s: s.encode("utf-16-be"))):
            if i:
                out.append(",")
            out.append(_string(k))
            out.append(":")
            _encode(v[k], out)
        out.append("}")
    else:
        raise NotCanonical(f"{type(v).__name__} has no JSON form")


def canonical_json(value: Any) -> bytes:
    """The canonical UTF-8 bytes of `value`."""
    out: list[str] = []
    _encode(value, out)
    return "".join(out).encode("utf-8")
