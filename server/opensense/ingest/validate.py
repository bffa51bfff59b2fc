"""Pure validation of an ingest payload: a function of the body and the time, no I/O.

Every refusal names the field and says why, so an installer reading the error can
fix the node. A payload is accepted or refused whole: nothing of a refused payload
is stored.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from ..errors import ApiError
from ..kinds import KINDS

MAX_MEASUREMENTS = 32
MAX_BODY_BYTES = 64 * 1024
MAX_FUTURE = timedelta(minutes=5)
MAX_LABEL = 64
ENTRY_KEYS = {"type", "value", "label", "ts", "unit", "seq"}
TOP_KEYS = {"device", "ts", "measurements"}


@dataclass(frozen=True)
class Entry:
    kind: str
    label: str
    unit: str
    value: float
    ts: datetime


@dataclass(frozen=True)
class Batch:
    device: str | None  # local_id or dev_ id named by the payload (or X-Device-Id)
    entries: tuple[Entry, ...]


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number (JSON has no NaN or Infinity)")


def parse_json(raw: bytes) -> Any:
    """Strict JSON: refuses NaN/Infinity, which Python's json would otherwise accept."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError("bad_json", f"the body is not UTF-8 text (byte {exc.start})") from None
    try:
        body = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise ApiError("bad_json", "the body nests arrays or objects too deeply") from None
    except ValueError as exc:
        raise ApiError("bad_json", f"the body is not valid JSON: {exc}") from None
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
                raise ApiError(
                    "bad_json", f"{where} holds a NUL character (\\u0000), which no text may"
                )
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ApiError(
                    "bad_json",
                    f"{where} holds an unpaired UTF-16 surrogate: it is not valid Unicode",
                ) from None


def parse_ts(value: Any, field: str) -> datetime:
    """RFC 3339 with an explicit offset (or Z)."""
    if not isinstance(value, str):
        raise ApiError(
            "invalid_measurement", f"{field} must be an RFC 3339 string, got {_type(value)}"
        )
    try:
        ts = datetime.fromisoformat(value)
    except ValueError:
        raise ApiError(
            "invalid_measurement", f"{field} is not an RFC 3339 timestamp: {value[:40]!r}"
        ) from None
    if ts.tzinfo is None or "T" not in value.upper():
        raise ApiError(
            "invalid_measurement",
            f"{field} must be a full RFC 3339 date-time with an offset (e.g. 2026-11-24T10:00:00Z), got {value[:40]!r}",
        )
    try:
        return ts.astimezone(UTC)
    except OverflowError:  # e.g. 0001-01-01T00:00:00+01:00 has no UTC equivalent
        raise ApiError("invalid_measurement", f"{field} {value[:40]!r} is out of range") from None


def _type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int | float):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "an array"
    return "an object"


def check_ts_window(ts: datetime, field: str, now: datetime, oldest: datetime) -> None:
    if ts > now + MAX_FUTURE:
        raise ApiError(
            "out_of_range",
            f"{field} {ts.isoformat()} is more than 5 minutes in the future (server time "
            f"{now.isoformat(timespec='seconds')}); is the node's clock set?",
        )
    if ts < oldest:
        raise ApiError(
            "out_of_range",
            f"{field} {ts.isoformat()} is older than the raw-data retention "
            f"(oldest accepted {oldest.isoformat(timespec='seconds')})",
        )


def check_value(kind_name: str, unit_symbol: str, value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ApiError("invalid_measurement", f"{field}.value must be a number, got {_type(value)}")
    try:
        v = float(value)
    except OverflowError:  # an integer literal too large for a double
        v = math.inf
    if not math.isfinite(v):
        raise ApiError("invalid_measurement", f"{field}.value is not a finite number")
    unit = KINDS[kind_name].unit(unit_symbol)
    assert unit is not None
    if not unit.min <= v <= unit.max:
        raise ApiError(
            "out_of_range",
            f"{field}.value {v:g} {unit.symbol} is outside the physical range of {kind_name} "
            f"({unit.min:g}..{unit.max:g} {unit.symbol})",
        )
    if unit.integral and v not in (0.0, 1.0):
        raise ApiError("out_of_range", f"{field}.value must be 0 or 1 for {kind_name}, got {v:g}")
    return v


def make_entry(kind: Any, label: Any, unit: Any, value: Any, ts: datetime, field: str) -> Entry:
    if not isinstance(kind, str):
        raise ApiError("invalid_measurement", f"{field}.type must be a string, got {_type(kind)}")
    if kind not in KINDS:
        raise ApiError(
            "unknown_kind",
            f"{field}.type {kind[:40]!r} is not a known measurement kind "
            f"(known: {', '.join(KINDS)})",
        )
    if label is None:
        label = ""
    if not isinstance(label, str) or len(label) > MAX_LABEL:
        raise ApiError(
            "invalid_measurement",
            f"{field}.label must be a string of at most {MAX_LABEL} characters",
        )
    k = KINDS[kind]
    if unit is None:
        unit = k.default_unit
    if not isinstance(unit, str) or k.unit(unit) is None:
        raise ApiError(
            "invalid_measurement",
            f"{field}.unit {unit!r} is not a unit of {kind} "
            f"(allowed: {', '.join(u.symbol for u in k.units)})",
        )
    v = check_value(kind, unit, value, field)
    return Entry(kind, label, unit, v, ts)


def validate_payload(
    body: Any,
    *,
    now: datetime,
    oldest: datetime,
    header_device: str | None = None,
    require_device: bool = True,
) -> Batch:
    """Check an ingest body (docs/product.md#ingest). Raises ApiError naming the first bad field."""
    if not isinstance(body, dict):
        raise ApiError("invalid_measurement", f"the body must be a JSON object, got {_type(body)}")
    unknown = sorted(set(body) - TOP_KEYS)
    if unknown:
        raise ApiError(
            "invalid_measurement",
            f"unknown field {unknown[0]!r} (allowed: {', '.join(sorted(TOP_KEYS))})",
        )
    device = body.get("device", header_device)
    if header_device is not None and "device" in body and body["device"] != header_device:
        raise ApiError(
            "invalid_measurement",
            "device in the body and X-Device-Id header disagree; send one of them",
        )
    if device is not None and (not isinstance(device, str) or not 0 < len(device) <= 64):
        raise ApiError(
            "invalid_measurement", "device must be a non-empty string of at most 64 characters"
        )
    if require_device and device is None:
        raise ApiError(
            "invalid_measurement", "device is missing: name it in the body or in X-Device-Id"
        )

    batch_ts = now
    if "ts" in body and body["ts"] is not None:
        batch_ts = parse_ts(body["ts"], "ts")
        check_ts_window(batch_ts, "ts", now, oldest)

    ms = body.get("measurements")
    if not isinstance(ms, list):
        raise ApiError("invalid_measurement", f"measurements must be an array, got {_type(ms)}")
    if not 1 <= len(ms) <= MAX_MEASUREMENTS:
        raise ApiError(
            "invalid_measurement",
            f"measurements must hold 1 to {MAX_MEASUREMENTS} entries, got {len(ms)}",
        )
    entries: list[Entry] = []
    seen: dict[tuple[str, str, datetime], int] = {}
    for i, m in enumerate(ms):
        field = f"measurements[{i}]"
        if not isinstance(m, dict):
            raise ApiError("invalid_measurement", f"{field} must be an object, got {_type(m)}")
        unknown = sorted(set(m) - ENTRY_KEYS)
        if unknown:
            raise ApiError(
                "invalid_measurement",
                f"{field} has unknown field {unknown[0]!r} (allowed: {', '.join(sorted(ENTRY_KEYS))})",
            )
        if "type" not in m:
            raise ApiError("invalid_measurement", f"{field}.type is missing")
        if "value" not in m:
            raise ApiError("invalid_measurement", f"{field}.value is missing")
        if "seq" in m and (isinstance(m["seq"], bool) or not isinstance(m["seq"], int)):
            raise ApiError("invalid_measurement", f"{field}.seq must be an integer")
        ts = batch_ts
        if m.get("ts") is not None:
            ts = parse_ts(m["ts"], f"{field}.ts")
            check_ts_window(ts, f"{field}.ts", now, oldest)
        e = make_entry(m["type"], m.get("label"), m.get("unit"), m["value"], ts, field)
        key = (e.kind, e.label, e.ts)
        if key in seen:
            raise ApiError(
                "invalid_measurement",
                f"{field} repeats measurements[{seen[key]}] (same type, label and ts)",
            )
        seen[key] = i
        entries.append(e)
    return Batch(device, tuple(entries))
