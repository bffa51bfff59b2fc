"""Reading a node's payload (MQTT or HTTP), as a pure function of the bytes and the
receive time. The gateway checks shape only; the server remains the judge of kinds,
units and ranges (what it refuses lands in the dead-letter table). The shape, the
limits and the JSON, value and timestamp rules are the wire contract's
(opensense_contract), read exactly as the server reads them."""

from __future__ import annotations

from dataclasses import dataclass

from opensense_contract import strictjson
from opensense_contract.errors import WireError
from opensense_contract.payload import (
    ENTRY_KEYS,
    MAX_KIND,
    MAX_LABEL,
    MAX_MEASUREMENTS,
    TOP_KEYS,
    finite_number,
)
from opensense_contract.payload import parse_ts as contract_parse_ts


class PayloadError(ValueError):
    """The payload is not a reading the gateway can keep; the message says why and
    `code` is the error code the server gives the same refusal (the contract's)."""

    def __init__(self, message: str, code: str = "invalid_measurement") -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Reading:
    device: str  # the node's local_id
    kind: str
    label: str
    unit: str  # "" = the kind's default unit (the server fills it in)
    ts: float  # Unix seconds
    value: float


def parse_ts(v: object, field: str) -> float:
    try:
        return contract_parse_ts(v, field).timestamp()
    except WireError as e:
        raise PayloadError(e.message, e.code) from None


def parse(raw: bytes, device: str | None, received: float) -> list[Reading]:
    """Readings of one ingest payload. `device` is the node the transport vouches for
    (MQTT topic / HTTP token); a payload naming another device is refused."""
    try:
        body = strictjson.loads(raw)
    except WireError as e:
        raise PayloadError(e.message, e.code) from None
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
        kind = m.get("type")
        if not isinstance(kind, str) or not 0 < len(kind) <= MAX_KIND:
            raise PayloadError(f"{f}.type must be a measurement kind")
        try:
            value = finite_number(m.get("value"), f)
        except WireError as e:
            raise PayloadError(e.message, e.code) from None
        label = m.get("label") or ""
        unit = m.get("unit") or ""
        if not isinstance(label, str) or len(label) > MAX_LABEL or not isinstance(unit, str):
            raise PayloadError(f"{f}.label and unit must be short strings")
        ts = parse_ts(m["ts"], f"{f}.ts") if m.get("ts") is not None else batch_ts
        out.append(Reading(device, kind, label, unit, ts, value))
    return out
