"""Pure validation of an ingest payload: a function of the body and the time, no I/O.

Every refusal names the field and says why, so an installer reading the error can
fix the node. A payload is accepted or refused whole: nothing of a refused payload
is stored.

Speed (issue 14; tools/bench/decode): the doors call `read_payload`, which reads a
plain body with msgspec straight into typed structs and takes it when every check
passes at its first look. Otherwise a body is read by msgspec's JSON decoder into
dicts when it is sure to read it as the reference reader
(`opensense_contract.strictjson`) does, and each measurement is taken on a short path
when it is plainly valid. Any doubt goes the reference way, so every refusal is the
reference's, word for word: see `read_payload`, `parse_json` and `validate_payload`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import msgspec

from opensense_contract import strictjson
from opensense_contract.errors import WireError
from opensense_contract.payload import (
    ENTRY_KEYS,
    MAX_DEVICE,
    MAX_FUTURE_S,
    MAX_LABEL,
    MAX_MEASUREMENTS,
    TOP_KEYS,
    finite_number,
)
from opensense_contract.payload import json_type as _type
from opensense_contract.payload import parse_ts as _contract_parse_ts

from ..errors import ApiError
from ..kinds import KINDS, Unit

# The payload's shape, limits and value/time rules are the wire contract's
# (opensense_contract.payload); this module adds what only the server judges:
# kinds, units, physical ranges and the accepted time window.
MAX_FUTURE = timedelta(seconds=MAX_FUTURE_S)


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


# The fast reader takes a body only when it cannot read it otherwise than the
# reference one: at most this many `[` and `{` bytes (so it nests at most this deep,
# far from the reference reader's bound, the interpreter's recursion limit; a valid
# ingest body has at most 34), and no `\u0000` or `\ud…` escape: the reference
# refuses a NUL and a lone surrogate by a walk over every string, which is most of
# its cost; msgspec takes a NUL, and surrogate escapes are left to the walk too.
FAST_MAX_BRACKETS = 256
_decode = msgspec.json.Decoder().decode


def _fast_candidate(raw: bytes) -> bool:
    return (
        raw.count(b"[") + raw.count(b"{") <= FAST_MAX_BRACKETS
        and b"\\u0000" not in raw
        and b"\\ud" not in raw
        and b"\\uD" not in raw
    )


def parse_json(raw: bytes) -> Any:
    """Strict JSON (opensense_contract.strictjson), refused as the envelope's bad_json.

    msgspec reads a candidate body (see `_fast_candidate`) to the same value: it
    keeps integers of any size as int and duplicate keys' last value, refuses
    NaN/Infinity, invalid UTF-8 (a BOM too) and what JSON refuses. Whatever it
    refuses, and every other body, the reference reader reads: its value, or its
    refusal and message (tests/test_decode.py pins both readers to each other)."""
    if _fast_candidate(raw):
        try:
            return _decode(raw)
        except msgspec.DecodeError:  # ValidationError too (an integer past 4300 digits)
            pass  # the reference reader decides, and words the refusal
    try:
        return strictjson.loads(raw)
    except WireError as e:
        raise ApiError(e.code, e.message) from None


def parse_ts(value: Any, field: str) -> datetime:
    """RFC 3339 with an explicit offset (or Z), by the contract's rule."""
    try:
        return _contract_parse_ts(value, field)
    except WireError as e:
        raise ApiError(e.code, e.message) from None


def check_ts_window(ts: datetime, field: str, now: datetime, oldest: datetime) -> None:
    if ts > now + MAX_FUTURE:
        raise ApiError(
            "out_of_range",
            f"{field} {ts.isoformat()} is more than {MAX_FUTURE_S // 60} minutes in the future (server time "
            f"{now.isoformat(timespec='seconds')}); is the node's clock set?",
        )
    if ts < oldest:
        raise ApiError(
            "out_of_range",
            f"{field} {ts.isoformat()} is older than the raw-data retention "
            f"(oldest accepted {oldest.isoformat(timespec='seconds')})",
        )


def check_value(kind_name: str, unit_symbol: str, value: Any, field: str) -> float:
    try:
        v = finite_number(value, field)
    except WireError as e:
        raise ApiError(e.code, e.message) from None
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


def _check_object(v: Any, not_object: str, where: str, allowed: frozenset[str]) -> None:
    """`v` is a JSON object with only `allowed` keys, or the refusal says which key
    is not (the body and each of its measurements alike)."""
    if not isinstance(v, dict):
        raise ApiError("invalid_measurement", f"{not_object}, got {_type(v)}")
    if v.keys() <= allowed:
        return
    unknown = sorted(set(v) - allowed)
    if unknown:
        raise ApiError(
            "invalid_measurement",
            f"{where}unknown field {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})",
        )


def validate_payload(
    body: Any,
    *,
    now: datetime,
    oldest: datetime,
    header_device: str | None = None,
    require_device: bool = True,
) -> Batch:
    """Check an ingest body (docs/product.md#ingest). Raises ApiError naming the first bad field."""
    _check_object(body, "the body must be a JSON object", "", TOP_KEYS)
    device = body.get("device", header_device)
    if header_device is not None and "device" in body and body["device"] != header_device:
        raise ApiError(
            "invalid_measurement",
            "device in the body and X-Device-Id header disagree; send one of them",
        )
    if device is not None and (not isinstance(device, str) or not 0 < len(device) <= MAX_DEVICE):
        raise ApiError(
            "invalid_measurement",
            f"device must be a non-empty string of at most {MAX_DEVICE} characters",
        )
    if require_device and device is None:
        raise ApiError(
            "invalid_measurement", "device is missing: name it in the body or in X-Device-Id"
        )

    batch_ts = now
    times: dict[str, datetime] = {}  # a ts text already taken (parsed, in the window)
    if "ts" in body and body["ts"] is not None:
        batch_ts = parse_ts(body["ts"], "ts")
        check_ts_window(batch_ts, "ts", now, oldest)
        times[body["ts"]] = batch_ts

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
    latest = now + MAX_FUTURE
    for i, m in enumerate(ms):
        e = _plain_entry(m, batch_ts, times, latest, oldest)
        if e is None:  # not plainly valid: the full checks, in their order, with their words
            e = _entry(m, f"measurements[{i}]", batch_ts, now, oldest)
        key = (e.kind, e.label, e.ts)
        if key in seen:
            raise ApiError(
                "invalid_measurement",
                f"measurements[{i}] repeats measurements[{seen[key]}] (same type, label and ts)",
            )
        seen[key] = i
        entries.append(e)
    return Batch(device, tuple(entries))


# (kind, unit symbol or None for the kind's default) -> (unit symbol, Unit)
_UNITS: dict[tuple[str, str | None], tuple[str, Unit]] = {
    (k.name, sym): (u.symbol, u)
    for k in KINDS.values()
    for sym, u in [(None, k.units[0]), *((u.symbol, u) for u in k.units)]
}


def _plain_entry(
    m: Any, batch_ts: datetime, times: dict[str, datetime], latest: datetime, oldest: datetime
) -> Entry | None:
    """The entry `_entry` makes of `m` when `m` is plainly valid (each check passes at
    its first look), else None: then `_entry` judges it. Every condition here implies
    `_entry`'s, so no refusal can be skipped. `times` keeps each ts text taken (parsed,
    in the window): the readings of one instant share one."""
    if type(m) is not dict or not m.keys() <= ENTRY_KEYS:
        return None
    kind = m.get("type")
    value = m.get("value")
    unit = m.get("unit")
    label = m.get("label")
    t = m.get("ts")
    if type(kind) is not str or (type(value) is not float and type(value) is not int):
        return None
    if "seq" in m and type(m["seq"]) is not int:
        return None
    if t is not None and type(t) is not str:
        return None
    if label is not None and type(label) is not str:
        return None
    if unit is not None and type(unit) is not str:
        return None
    ts = _plain_ts(t, batch_ts, times, latest, oldest)
    return None if ts is None else _plain_made(kind, label, unit, value, ts)


def _plain_ts(
    t: str | None,
    batch_ts: datetime,
    times: dict[str, datetime],
    latest: datetime,
    oldest: datetime,
) -> datetime | None:
    """An entry's time when plainly in the window: the batch's (no ts), one already
    taken for the same text, or the text parsed; else None."""
    if t is None:
        return batch_ts
    ts = times.get(t)
    if ts is None:
        try:
            ts = _contract_parse_ts(t, "ts")
        except WireError:
            return None
        if not oldest <= ts <= latest:
            return None
        times[t] = ts
    return ts


def _plain_made(
    kind: str, label: str | None, unit: str | None, value: int | float, ts: datetime
) -> Entry | None:
    """The Entry of a measurement whose fields have their JSON types already, when its
    label, kind, unit and value pass at their first look; else None."""
    if label is None:
        label = ""
    elif len(label) > MAX_LABEL:
        return None
    found = _UNITS.get((kind, unit))
    if found is None or (type(value) is int and not -(2**53) <= value <= 2**53):
        return None
    symbol, u = found
    v = float(value)
    if not u.min <= v <= u.max or (u.integral and v not in (0.0, 1.0)):
        return None  # NaN is never in a range (and JSON has none)
    e = _new(Entry)
    _set(e, "__dict__", {"kind": kind, "label": label, "unit": symbol, "value": v, "ts": ts})
    return e


class _PlainEntry(msgspec.Struct, forbid_unknown_fields=True):
    """A measurement as the typed reader takes it: each field of its JSON type (a
    `bool` is not an `int` here), no other key."""

    type: str
    value: int | float
    label: str | None = None
    unit: str | None = None
    ts: str | None = None
    seq: int | msgspec.UnsetType = msgspec.UNSET  # present, an integer (null is refused)


class _PlainBody(msgspec.Struct, forbid_unknown_fields=True):
    measurements: list[_PlainEntry]
    device: str | None | msgspec.UnsetType = msgspec.UNSET  # UNSET: no `device` key
    ts: str | None = None


_decode_plain = msgspec.json.Decoder(_PlainBody).decode


def read_payload(
    raw: bytes,
    now: datetime,
    oldest: datetime,
    *,
    header_device: str | None = None,
    require_device: bool = True,
) -> Batch:
    """`validate_payload(parse_json(raw), ...)`, the same Batch or the same refusal.

    A plain body is read by msgspec straight into typed structs (a third of the time
    of reading it into dicts, and the type checks done in C: tools/bench/decode) and
    taken when every check passes at its first look (`_plain_batch`). Anything else,
    a body the typed reader refuses or one with any doubt, goes the general way,
    which words every refusal (tests/test_decode.py holds the two to each other)."""
    if _fast_candidate(raw):
        try:
            body = _decode_plain(raw)
        except msgspec.DecodeError:  # ValidationError too: not of the plain shape
            body = None
        if body is not None:
            batch = _plain_batch(body, now, oldest, header_device, require_device)
            if batch is not None:
                return batch
    return validate_payload(
        parse_json(raw),
        now=now,
        oldest=oldest,
        header_device=header_device,
        require_device=require_device,
    )


def _plain_batch(
    body: _PlainBody,
    now: datetime,
    oldest: datetime,
    header_device: str | None,
    require_device: bool,
) -> Batch | None:
    """The Batch `validate_payload` makes of `body` when each of its checks passes at
    its first look (as `_plain_entry`, entry by entry), else None. Every condition
    here implies the general path's, so no refusal can be skipped."""
    named = body.device
    if named is msgspec.UNSET:
        device = header_device
    elif header_device is not None and named != header_device:
        return None
    else:
        device = named
    if device is None:
        if require_device:
            return None
    elif not 0 < len(device) <= MAX_DEVICE:
        return None
    latest = now + MAX_FUTURE
    times: dict[str, datetime] = {}
    batch_ts = _plain_ts(body.ts, now, times, latest, oldest)
    if batch_ts is None:
        return None
    ms = body.measurements
    if not 1 <= len(ms) <= MAX_MEASUREMENTS:
        return None
    entries: list[Entry] = []
    seen: set[tuple[str, str, datetime]] = set()
    for m in ms:
        ts = _plain_ts(m.ts, batch_ts, times, latest, oldest)
        e = None if ts is None else _plain_made(m.type, m.label, m.unit, m.value, ts)
        if e is None:
            return None
        key = (e.kind, e.label, e.ts)
        if key in seen:
            return None  # the general path names the repeat
        seen.add(key)
        entries.append(e)
    return Batch(device, tuple(entries))


# Entry(...) without its __init__: a frozen dataclass's sets each of the five fields
# through object.__setattr__; its __dict__ set at once is the same object (equal, same
# hash; Entry has no __post_init__ and no slots) in under half the time, a third of
# what is left of a plain reading's cost (tools/bench/decode; tests/test_decode.py).
_new = object.__new__
_set = object.__setattr__


def _entry(m: Any, field: str, batch_ts: datetime, now: datetime, oldest: datetime) -> Entry:
    """One measurement by every rule, in order; raises ApiError naming the first bad field."""
    _check_object(m, f"{field} must be an object", f"{field} has ", ENTRY_KEYS)
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
    return make_entry(m["type"], m.get("label"), m.get("unit"), m["value"], ts, field)
