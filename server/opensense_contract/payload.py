"""The ingest payload's shape and limits, and the rules for its values and times.

    {"device": "fridge01", "ts": "2026-11-24T10:00:00Z",
     "measurements": [{"type": "temperature", "value": 4.2, "label": "front",
                       "unit": "°C", "ts": "…", "seq": 17}, …]}

The same body over HTTP (`POST /v1/ingest`, the gateway's local door) and MQTT (the
topic names the device, so `device` is left out). The server judges kinds, units and
physical ranges (`server/opensense/kinds.py`); a gateway checks the shape only and
leaves the rest to the server. Both read it with these rules.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

from .errors import WireError

MAX_BODY_BYTES = 64 * 1024  # one request or MQTT packet
MAX_MEASUREMENTS = 32  # entries in one payload
MAX_LABEL = 64  # characters of a label
MAX_DEVICE = 64  # characters of a device name (local_id or dev_ id)
MAX_KIND = 32  # characters of a measurement kind's name
MAX_FUTURE_S = 300  # a ts at most this far ahead of the receiver's clock

INGEST_PATH = "/v1/ingest"  # the HTTP door (the server's and a gateway's)
DEVICE_HEADER = "X-Device-Id"  # names the device when the body does not

# the body's keys
KEY_DEVICE = "device"
KEY_TS = "ts"
KEY_MEASUREMENTS = "measurements"
# an entry's keys
KEY_TYPE = "type"
KEY_VALUE = "value"
KEY_LABEL = "label"
KEY_UNIT = "unit"
KEY_SEQ = "seq"

TOP_KEYS = frozenset({KEY_DEVICE, KEY_TS, KEY_MEASUREMENTS})
ENTRY_KEYS = frozenset({KEY_TYPE, KEY_VALUE, KEY_LABEL, KEY_TS, KEY_UNIT, KEY_SEQ})


def json_type(v: Any) -> str:
    """What a JSON value is, for a message."""
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


def finite_number(value: Any, field: str) -> float:
    """A measurement's value: a JSON number (not a boolean) that is finite as a
    double; an integer literal too large for one is not. Raises WireError."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise WireError(
            "invalid_measurement", f"{field}.value must be a number, got {json_type(value)}"
        )
    try:
        v = float(value)
    except OverflowError:  # an integer literal too large for a double
        v = math.inf
    if not math.isfinite(v):
        raise WireError("invalid_measurement", f"{field}.value is not a finite number")
    return v


def parse_ts(value: Any, field: str) -> datetime:
    """An RFC 3339 date-time with an explicit offset (or Z), in UTC. Raises WireError."""
    if not isinstance(value, str):
        raise WireError(
            "invalid_measurement", f"{field} must be an RFC 3339 string, got {json_type(value)}"
        )
    try:
        ts = datetime.fromisoformat(value)
    except ValueError:
        raise WireError(
            "invalid_measurement", f"{field} is not an RFC 3339 timestamp: {value[:40]!r}"
        ) from None
    if ts.tzinfo is None or "T" not in value.upper():
        raise WireError(
            "invalid_measurement",
            f"{field} must be a full RFC 3339 date-time with an offset (e.g. 2026-11-24T10:00:00Z), got {value[:40]!r}",
        )
    try:
        return ts.astimezone(UTC)
    except OverflowError:  # e.g. 0001-01-01T00:00:00+01:00 has no UTC equivalent
        raise WireError("invalid_measurement", f"{field} {value[:40]!r} is out of range") from None
