"""LoRaWAN network webhooks as the networks send them (pure: body and time in,
an `Uplink` or an "ignored" answer out; no I/O).

Two networks through one door, told apart by the body:
- The Things Stack v3 (TTS/TTN) webhook: one JSON object per message, the message
  type named by its key (`uplink_message`, `join_accept`, `downlink_ack`, ...).
  https://www.thethingsindustries.com/docs/the-things-stack/concepts/data-formats/
- ChirpStack v4 HTTP integration, JSON marshaler: the event type in the `event`
  query parameter, the `up` event's body an `integration.UplinkEvent` in the
  Protocol Buffers JSON mapping (`deviceInfo.devEui`, `fCnt`, `object`, `rxInfo`).
  https://www.chirpstack.io/docs/chirpstack/integrations/events.html

The decoded payload (TTS `decoded_payload`, ChirpStack `object`) is what the user's
payload formatter returns. Two shapes are read, anything else is refused naming the
key, because a key we drop silently is a fridge without alarms:
- `{"measurements": [{"type", "value", "label"?, "unit"?}, ...], "battery"?: n}`
- flat: `{"temperature": 3.5, "humidity": 61, "temperature_probe": -18.2}`, a key
  being a kind name (kinds.py) or `<kind>_<label>` (label: lower-case letters, digits
  and `_`, up to 64); a `null` value is absent (listed in `ignored`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from opensense_contract.payload import MAX_LABEL, MAX_MEASUREMENTS

from ..errors import ApiError
from ..kinds import KINDS
from .validate import Entry, check_ts_window, make_entry, parse_ts

# TTS message types other than an uplink: answered 200 "ignored", never an error
# (TTS counts a 4xx against the webhook and may disable it).
TTS_OTHER = (
    "join_accept",
    "downlink_ack",
    "downlink_nack",
    "downlink_sent",
    "downlink_failed",
    "downlink_queued",
    "downlink_queue_invalidated",
    "location_solved",
    "service_data",
    "uplink_normalized",
)
# a key of the flat shape: a kind, or a kind and a label joined by "_"
FLAT_KEY = re.compile(rf"^([a-z0-9]+)(?:_([a-z0-9_]{{1,{MAX_LABEL}}}))?$")
HEX16 = re.compile(r"^[0-9A-Fa-f]{16}$")
MAX_KEY = 200


@dataclass(frozen=True)
class Uplink:
    network: str  # "tts" | "chirpstack"
    dev_eui: str  # upper-case hex
    key: str | None  # the network's identity of this uplink (dedupe), if it gave one
    simulated: bool
    entries: tuple[Entry, ...]
    ignored: tuple[str, ...]  # fields present but without a value (null)


@dataclass(frozen=True)
class Ignored:
    network: str
    event: str


def _eui(value: Any, field: str) -> str:
    if not isinstance(value, str) or not HEX16.match(value):
        raise ApiError("invalid_measurement", f"{field} is missing or not 16 hex digits")
    return value.upper()


def _flat_kind(key: str) -> tuple[str, str] | None:
    """(kind, label) a flat key names, or None. The longest kind prefix wins, so a
    kind with "_" in its name could never be shadowed (none has one today)."""
    m = FLAT_KEY.match(key)
    if not m:
        return None
    if key in KINDS:
        return key, ""
    kind, label = m.group(1), m.group(2)
    if kind in KINDS and label:
        return kind, label
    return None


def decoded_entries(decoded: Any, ts: datetime, where: str) -> tuple[list[Entry], list[str]]:
    """Entries of a decoded payload in either shape; (entries, ignored keys)."""
    if not isinstance(decoded, dict):
        raise ApiError(
            "invalid_measurement",
            f"{where} is missing: set a payload formatter (decoder) on the network",
        )
    entries: list[Entry] = []
    ignored: list[str] = []
    for key in decoded:
        if key in ("measurements", "battery"):
            continue
        if _flat_kind(key) is None:
            raise ApiError(
                "invalid_measurement",
                f"{where} has unknown field {key[:40]!r}: use a measurement kind "
                f"({', '.join(KINDS)}), <kind>_<label>, or measurements[] (docs/api.md)",
            )
    ms = decoded.get("measurements", [])
    if not isinstance(ms, list) or len(ms) > MAX_MEASUREMENTS:
        raise ApiError(
            "invalid_measurement",
            f"{where}.measurements must be an array of at most {MAX_MEASUREMENTS}",
        )
    for i, m in enumerate(ms):
        field = f"{where}.measurements[{i}]"
        if not isinstance(m, dict) or "type" not in m or "value" not in m:
            raise ApiError("invalid_measurement", f"{field} must be an object with type and value")
        unknown = sorted(set(m) - {"type", "value", "label", "unit"})
        if unknown:
            raise ApiError(
                "invalid_measurement",
                f"{field} has unknown field {unknown[0][:40]!r} (allowed: label, type, unit, value)",
            )
        if m["value"] is None:
            ignored.append(field)
            continue
        entries.append(make_entry(m["type"], m.get("label"), m.get("unit"), m["value"], ts, field))
    for key, value in decoded.items():
        if key == "measurements":
            continue
        kind, label = ("battery", "") if key == "battery" else (_flat_kind(key) or ("", ""))
        field = f"{where}.{key}"
        if value is None:
            ignored.append(field)
            continue
        entries.append(make_entry(kind, label, None, value, ts, field))
    if len(entries) > MAX_MEASUREMENTS:
        raise ApiError(
            "invalid_measurement", f"{where} holds more than {MAX_MEASUREMENTS} measurements"
        )
    return entries, ignored


def _signal(rx: Any, rssi: str, snr: str, ts: datetime, where: str) -> list[Entry]:
    """RSSI and SNR of the first gateway that heard the uplink, as auxiliary channels."""
    out: list[Entry] = []
    if isinstance(rx, list) and rx and isinstance(rx[0], dict):
        g = rx[0]
        for name, kind in ((rssi, "signal"), (snr, "snr")):
            v = g.get(name)
            if isinstance(v, int | float) and not isinstance(v, bool):
                out.append(make_entry(kind, "", None, v, ts, f"{where}[0].{name}"))
    return out


def _when(value: Any, field: str, now: datetime, oldest: datetime) -> datetime:
    """The network's reception time of the uplink: the reading's time, so a replay or
    a re-delivery lands on the same instant. Absent: the time we received it."""
    if value is None:
        return now
    ts = parse_ts(value, field)
    check_ts_window(ts, field, now, oldest)
    return ts


def _finish(
    network: str,
    dev_eui: str,
    key: str | None,
    simulated: bool,
    entries: list[Entry],
    ignored: list[str],
) -> Uplink:
    keys = [(e.kind, e.label) for e in entries]
    if len(set(keys)) != len(keys):
        raise ApiError("invalid_measurement", "the decoded payload repeats a (type, label)")
    if not any(e.kind not in ("signal", "snr") for e in entries):
        raise ApiError(
            "invalid_measurement",
            "the uplink carries no measurement (only radio signal): check the payload formatter",
        )
    if key is not None and len(key) > MAX_KEY:
        key = key[:MAX_KEY]
    return Uplink(network, dev_eui, key, simulated, tuple(entries), tuple(ignored))


def tts_uplink(body: dict[str, Any], now: datetime, oldest: datetime) -> Uplink | Ignored:
    up = body.get("uplink_message")
    if up is None:
        for other in TTS_OTHER:
            if other in body:
                return Ignored("tts", other)
    ids = body.get("end_device_ids")
    dev_eui = _eui(ids.get("dev_eui") if isinstance(ids, dict) else None, "end_device_ids.dev_eui")
    if not isinstance(up, dict):
        raise ApiError("invalid_measurement", "uplink_message is missing")
    ts = _when(
        up.get("received_at", body.get("received_at")), "uplink_message.received_at", now, oldest
    )
    entries, ignored = decoded_entries(
        up.get("decoded_payload"), ts, "uplink_message.decoded_payload"
    )
    entries += _signal(up.get("rx_metadata"), "rssi", "snr", ts, "uplink_message.rx_metadata")
    # Identity: the session and frame counter (TTS omits a zero f_cnt), else the
    # application server's correlation id of this uplink.
    key = None
    f_cnt = up.get("f_cnt", 0)
    session = up.get("session_key_id")
    if isinstance(session, str) and isinstance(f_cnt, int) and not isinstance(f_cnt, bool):
        key = f"tts:{dev_eui}:{session}:{f_cnt}"
    else:
        cids = body.get("correlation_ids") or up.get("correlation_ids") or []
        if isinstance(cids, list):
            for c in cids:
                if isinstance(c, str) and c.startswith("as:up:"):
                    key = f"tts:{c}"
                    break
    return _finish("tts", dev_eui, key, body.get("simulated") is True, entries, ignored)


def chirpstack_uplink(
    body: dict[str, Any], event: str | None, now: datetime, oldest: datetime
) -> Uplink | Ignored:
    if event is not None and event != "up":
        return Ignored("chirpstack", event[:40])
    info = body.get("deviceInfo")
    dev_eui = _eui(info.get("devEui") if isinstance(info, dict) else None, "deviceInfo.devEui")
    ts = _when(body.get("time"), "time", now, oldest)
    entries, ignored = decoded_entries(body.get("object"), ts, "object")
    entries += _signal(body.get("rxInfo"), "rssi", "snr", ts, "rxInfo")
    key = None
    dedup = body.get("deduplicationId")
    f_cnt = body.get("fCnt", 0)
    if isinstance(dedup, str) and dedup:
        key = f"cs:{dedup}"
    elif isinstance(body.get("devAddr"), str) and isinstance(f_cnt, int):
        key = f"cs:{dev_eui}:{body['devAddr']}:{f_cnt}"
    return _finish("chirpstack", dev_eui, key, False, entries, ignored)


def parse(body: Any, event: str | None, now: datetime, oldest: datetime) -> Uplink | Ignored:
    """Which network sent this, and what it says. Raises ApiError naming the field."""
    if not isinstance(body, dict):
        raise ApiError(
            "invalid_measurement",
            "the body must be a JSON object (a The Things Stack or ChirpStack webhook message)",
        )
    if "deviceInfo" in body or (event is not None and "end_device_ids" not in body):
        return chirpstack_uplink(body, event, now, oldest)
    return tts_uplink(body, now, oldest)


def dev_eui_of(body: Any) -> str | None:
    """The DevEUI a body names, if any, for filing a refused uplink (never raises)."""
    if not isinstance(body, dict):
        return None
    for outer, inner in (("end_device_ids", "dev_eui"), ("deviceInfo", "devEui")):
        ids = body.get(outer)
        if isinstance(ids, dict) and isinstance(ids.get(inner), str) and HEX16.match(ids[inner]):
            return str(ids[inner]).upper()
    return None
