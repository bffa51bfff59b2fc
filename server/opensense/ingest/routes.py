"""HTTP ingest doors: POST /v1/ingest, GET /v1/ingest/shelly, POST /v1/ingest/lorawan."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from psycopg.types.json import Jsonb

from .. import db, ratelimit, tokens
from ..api.auth import bearer
from ..api.jsonutil import response
from ..api.keys import CONFIG, LOG_ACCOUNT, LOG_DEVICE, POOL, VERIFIER, WRITER
from ..errors import ApiError
from ..settings import Config
from . import pipeline
from .validate import (
    Batch,
    Entry,
    check_ts_window,
    make_entry,
    parse_json,
    parse_ts,
    validate_payload,
)

routes = web.RouteTableDef()


def oldest_accepted(cfg: Config, now: datetime) -> datetime:
    """Readings older than raw retention would be dropped at once: refuse them."""
    first = db.add_months(db.month_start(now.date()), -cfg.retention_raw_months + 1)
    return datetime(first.year, first.month, 1, tzinfo=UTC)


async def _rate(conn: Any, cfg: Config, dev: pipeline.Device, now: datetime) -> None:
    await ratelimit.hit(
        conn, f"ingest:{dev.id}", cfg.ingest_rate_per_min, 60, now, "ingest for this device"
    )


async def _device(request: web.Request, token: str | None, now: datetime) -> pipeline.Device:
    """The token's device, its rate limit counted; noted for the request log."""
    cfg = request.app[CONFIG]
    async with request.app[POOL].connection() as conn:
        dev = await pipeline.device_for_token(
            conn, request.app[VERIFIER], token, now, cfg.ingest_rate_per_min
        )
    request[LOG_ACCOUNT], request[LOG_DEVICE] = dev.account_id, dev.id
    return dev


@routes.post("/v1/ingest")
async def ingest(request: web.Request) -> web.Response:
    cfg = request.app[CONFIG]
    now = cfg.clock()
    raw = await request.read()
    key = request.headers.get("Idempotency-Key")
    pool = request.app[POOL]
    dev = await _device(request, bearer(request), now)
    if key is not None and not 1 <= len(key) <= 200:
        raise ApiError("invalid_request", "Idempotency-Key must be 1 to 200 characters")
    batch = validate_payload(
        parse_json(raw),
        now=now,
        oldest=oldest_accepted(cfg, now),
        header_device=request.headers.get("X-Device-Id"),
    )
    await pipeline.check_named_device(pool, dev, batch.device)
    if key is not None:  # the key and the readings commit together: the one-by-one path
        async with pool.connection() as conn:
            answer = await pipeline.store(
                conn,
                dev,
                batch.entries,
                now=now,
                compact_after_days=cfg.compact_after_days,
                idempotency_key=key,
                digest=pipeline.body_digest(raw),
            )
    else:
        answer = await pipeline.store_fast(
            pool,
            request.app[WRITER],
            dev,
            batch.entries,
            now=now,
            compact_after_days=cfg.compact_after_days,
        )
    return response(answer)


SHELLY_PARAMS = {"temp": "temperature", "hum": "humidity", "battery": "battery", "signal": "signal"}


def _number(text: str, name: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise ApiError(
            "invalid_measurement", f"{name} must be a number, got {text[:40]!r}"
        ) from None
    if not math.isfinite(v):
        raise ApiError("invalid_measurement", f"{name} is not a finite number")
    return v


def shelly_batch(q: Any, now: datetime, oldest: datetime) -> Batch:
    """Shelly H&T GET parameters as a batch (pure)."""
    ts = now
    if q.get("ts"):
        t = q["ts"]
        if t.isdigit():
            if len(t) > 11:
                raise ApiError(
                    "out_of_range", f"ts {t[:20]} is not a plausible Unix time in seconds"
                )
            ts = datetime.fromtimestamp(int(t), UTC)
        else:
            ts = parse_ts(t, "ts")
        check_ts_window(ts, "ts", now, oldest)
    entries: list[Entry] = []
    for param, kind in SHELLY_PARAMS.items():
        if q.get(param) not in (None, ""):
            entries.append(make_entry(kind, "", None, _number(q[param], param), ts, param))
    if not any(e.kind in ("temperature", "humidity") for e in entries):
        raise ApiError("invalid_measurement", "send at least one of temp or hum")
    return Batch(q.get("device") or None, tuple(entries))


@routes.get("/v1/ingest/shelly")
async def ingest_shelly(request: web.Request) -> web.Response:
    cfg = request.app[CONFIG]
    now = cfg.clock()
    q = request.query
    token = q.get("token") or bearer(request)
    pool = request.app[POOL]
    dev = await _device(request, token, now)
    batch = shelly_batch(q, now, oldest_accepted(cfg, now))
    await pipeline.check_named_device(pool, dev, batch.device)
    answer = await pipeline.store_fast(
        pool,
        request.app[WRITER],
        dev,
        batch.entries,
        now=now,
        compact_after_days=cfg.compact_after_days,
    )
    return response(answer)


def lorawan_entries(body: Any, now: datetime) -> tuple[str, tuple[Entry, ...]]:
    """(dev_eui, entries) from a TTN v3 uplink webhook body (pure)."""
    if not isinstance(body, dict):
        raise ApiError("invalid_measurement", "the body must be a TTN uplink JSON object")
    ids = body.get("end_device_ids")
    dev_eui = ids.get("dev_eui") if isinstance(ids, dict) else None
    if not isinstance(dev_eui, str) or len(dev_eui) != 16:
        raise ApiError(
            "invalid_measurement", "end_device_ids.dev_eui is missing or not 16 hex digits"
        )
    up = body.get("uplink_message")
    if not isinstance(up, dict):
        raise ApiError("invalid_measurement", "uplink_message is missing")
    decoded = up.get("decoded_payload")
    if not isinstance(decoded, dict):
        raise ApiError(
            "invalid_measurement",
            "uplink_message.decoded_payload is missing: set a payload formatter in TTN",
        )
    entries: list[Entry] = []
    ms = decoded.get("measurements", [])
    if not isinstance(ms, list) or len(ms) > 32:
        raise ApiError(
            "invalid_measurement", "decoded_payload.measurements must be an array of at most 32"
        )
    for i, m in enumerate(ms):
        field = f"decoded_payload.measurements[{i}]"
        if not isinstance(m, dict) or "type" not in m or "value" not in m:
            raise ApiError("invalid_measurement", f"{field} must be an object with type and value")
        entries.append(make_entry(m["type"], m.get("label"), m.get("unit"), m["value"], now, field))
    if decoded.get("battery") is not None:
        entries.append(
            make_entry("battery", "", None, decoded["battery"], now, "decoded_payload.battery")
        )
    rx = up.get("rx_metadata")
    if isinstance(rx, list) and rx and isinstance(rx[0], dict):
        if isinstance(rx[0].get("rssi"), int | float):
            entries.append(
                make_entry("signal", "", None, rx[0]["rssi"], now, "rx_metadata[0].rssi")
            )
        if isinstance(rx[0].get("snr"), int | float):
            entries.append(make_entry("snr", "", None, rx[0]["snr"], now, "rx_metadata[0].snr"))
    keys = [(e.kind, e.label) for e in entries]
    if len(set(keys)) != len(keys):
        raise ApiError("invalid_measurement", "decoded_payload repeats a (type, label)")
    if not entries:
        raise ApiError("invalid_measurement", "the uplink carries no measurement")
    return dev_eui.upper(), tuple(entries)


@routes.post("/v1/ingest/lorawan")
async def ingest_lorawan(request: web.Request) -> web.Response:
    cfg = request.app[CONFIG]
    now = cfg.clock()
    raw = await request.read()
    token = request.query.get("token") or bearer(request)
    async with request.app[POOL].connection() as conn:
        tok = await tokens.authenticate(conn, request.app[VERIFIER], token, ("whk",), now)
        request[LOG_ACCOUNT] = tok.account_id
        body = parse_json(raw)
        dev_eui, entries = lorawan_entries(body, now)
        dev = await pipeline.device_by_eui(conn, tok.account_id, dev_eui)
        if dev is None:
            await conn.execute(
                "INSERT INTO unassigned_uplinks (account_id, dev_eui, received_at, payload)"
                " VALUES (%s, %s, %s, %s)",
                (tok.account_id, dev_eui, now, Jsonb(body)),
            )
            return response(
                {"accepted": 0, "deduplicated": 0, "channels": [], "unassigned": True}, status=202
            )
        request[LOG_DEVICE] = dev.id
        await _rate(conn, cfg, dev, now)
        answer = await pipeline.store(
            conn, dev, entries, now=now, compact_after_days=cfg.compact_after_days
        )
    return response(answer)
