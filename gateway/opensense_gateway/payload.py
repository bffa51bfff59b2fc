"""Reading a node's payload (MQTT or HTTP), as a pure function of the bytes and the
receive time. The gateway checks shape only; the server remains the judge of kinds,
units and ranges (what it refuses lands in the dead-letter table)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime

MAX_MEASUREMENTS = 32
ENTRY_KEYS = {"type", "value", "label", "ts", "unit", "seq"}
TOP_KEYS = {"device", "ts", "measurements"}


class PayloadError(ValueError):
    """The payload is not a reading the gateway can keep; the message says why."""


@dataclass(frozen=True)
class Reading:
    device: str  # the node's local_id
    kind: str
    label: str
    unit: str  # "" = the kind's default unit (the server fills it in)
    ts: float  # Unix seconds
    value: float


def _reject(name: str) -> float:
    raise PayloadError(f"{name} is not a JSON number")


def parse_ts(v: object, field: str) -> float:
    if not isinstance(v, str):
        raise PayloadError(f"{field} must be an RFC 3339 string")
    try:
        ts = datetime.fromisoformat(v)
    except ValueError:
        raise PayloadError(f"{field} is not an RFC 3339 timestamp: {v[:40]!r}") from None
    if ts.tzinfo is None:
        raise PayloadError(f"{field} must carry an offset (e.g. Z)")
    return ts.astimezone(UTC).timestamp()


def parse(raw: bytes, device: str | None, received: float) -> list[Reading]:
    """Readings of one ingest payload. `device` is the node the transport vouches for
    (MQTT topic / HTTP token); a payload naming another device is refused."""
    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=_reject)
    except (UnicodeDecodeError, ValueError) as exc:
        raise PayloadError(f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise PayloadError("the body must be a JSON object")
    unknown = sorted(set(body) - TOP_KEYS)
    if unknown:
        raise PayloadError(f"unknown field {unknown[0]!r}")
    named = body.get("device")
    if device is None:
        if not isinstance(named, str) or not named:
            raise PayloadError("device is missing")
        device = named
    elif named is not None and named != device:
        raise PayloadError(f"this node is {device!r} and cannot send for {str(named)[:64]!r}")
    batch_ts = received
    if body.get("ts") is not None:
        batch_ts = parse_ts(body["ts"], "ts")
    ms = body.get("measurements")
    if not isinstance(ms, list) or not 1 <= len(ms) <= MAX_MEASUREMENTS:
        raise PayloadError(f"measurements must be an array of 1 to {MAX_MEASUREMENTS} entries")
    out = []
    for i, m in enumerate(ms):
        f = f"measurements[{i}]"
        if not isinstance(m, dict) or set(m) - ENTRY_KEYS:
            raise PayloadError(f"{f} must be an object of {', '.join(sorted(ENTRY_KEYS))}")
        kind, value = m.get("type"), m.get("value")
        if not isinstance(kind, str) or not 0 < len(kind) <= 32:
            raise PayloadError(f"{f}.type must be a measurement kind")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise PayloadError(f"{f}.value must be a number")
        if not math.isfinite(float(value)):
            raise PayloadError(f"{f}.value is not finite")
        label = m.get("label") or ""
        unit = m.get("unit") or ""
        if not isinstance(label, str) or len(label) > 64 or not isinstance(unit, str):
            raise PayloadError(f"{f}.label and unit must be short strings")
        ts = parse_ts(m["ts"], f"{f}.ts") if m.get("ts") is not None else batch_ts
        out.append(Reading(device, kind, label, unit, ts, float(value)))
    return out


def topic_device(topic: str, account: str) -> str | None:
    """The node's local_id from a measurement topic opensense/<account>/<local_id>
    (the site broker's ACL lets a node publish only under its own name)."""
    parts = topic.split("/")
    if len(parts) == 3 and parts[0] == "opensense" and parts[1] == account and parts[2]:
        return parts[2]
    return None
