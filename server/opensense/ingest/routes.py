"""HTTP ingest doors: POST /v1/ingest, GET /v1/ingest/shelly, POST /v1/ingest/lorawan."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

import msgspec
from aiohttp import web

from .. import db, ratelimit, tokens
from ..api import auth
from ..api.auth import bearer
from ..api.body import json_object
from ..api.jsonutil import response
from ..api.keys import AUTHS, CHANNELS, CONFIG, LOG_ACCOUNT, LOG_DEVICE, POOL, VERIFIER, WRITER
from ..errors import ApiError
from ..settings import Config
from . import lorawan, pipeline, tray
from .validate import (
    Batch,
    Entry,
    check_ts_window,
    make_entry,
    parse_json,
    parse_ts,
    read_payload,
)

routes = web.RouteTableDef()

_encode = msgspec.json.Encoder().encode


def answer_body(answer: dict[str, Any]) -> bytes:
    """The JSON of an ingest answer (product.md: accepted, deduplicated, channels).
    It holds only integers, strings and booleans, in lists and objects, which msgspec
    writes as `jsonutil.dumps` does, only without the spaces after `,` and `:` (and in
    a tenth of the time: tools/bench/decode); no float and no datetime, which it would
    write otherwise (NaN as null, a datetime in its own form)."""
    return _encode(answer)


def answer_response(answer: dict[str, Any]) -> web.Response:
    """`jsonutil.response(answer)` for an ingest answer: the same status and
    Content-Type (application/json; charset=utf-8), the body from `answer_body`."""
    return web.Response(body=answer_body(answer), content_type="application/json", charset="utf-8")


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
    dev = await pipeline.device_for_token(
        request.app[POOL],
        request.app[AUTHS].lookup,
        request.app[VERIFIER],
        token,
        now,
        cfg.ingest_rate_per_min,
        request.app[CHANNELS],
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
    batch = read_payload(
        raw,
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
    return answer_response(answer)


SHELLY_PARAMS = {"temp": "temperature", "hum": "humidity", "battery": "battery", "signal": "signal"}
# Shelly models whose URL action substitutes the battery in volts (the H&T Gen3's
# devicepower reports `battery.V`; docs/api.md). Others send percent. Matched on
# the device's `model` case-insensitively; `battery_unit=V|%` in the URL overrides.
SHELLY_VOLT_MODELS = frozenset({"s3sn-0u12a", "shelly_ht_gen3", "shelly-ht-gen3"})
SHELLY_BATTERY_UNITS = {"v": "V", "%": "%", "percent": "%", "pct": "%"}


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


def _absent(text: str | None) -> bool:
    """A value the device did not have: Gen2/Gen3 URL actions send `null` (or leave
    `${ev.x}` unsubstituted, or empty) when the triggering event lacks it."""
    if text is None:
        return True
    t = text.strip()
    return t in ("", "null", "undefined") or (t.startswith("${") and t.endswith("}"))


def shelly_battery_unit(q: Any, model: str) -> str:
    given = q.get("battery_unit")
    if given not in (None, ""):
        unit = SHELLY_BATTERY_UNITS.get(str(given).strip().lower())
        if unit is None:
            raise ApiError(
                "invalid_measurement",
                f"battery_unit must be V or % (%25 in a URL), got {given[:20]!r}",
            )
        return unit
    m = model.strip().lower()
    return "V" if m in SHELLY_VOLT_MODELS or m.endswith("gen3") else "%"


def shelly_batch(
    q: Any, now: datetime, oldest: datetime, model: str = ""
) -> tuple[Batch, list[str]]:
    """Shelly H&T GET parameters as a batch, and the parameters that came without a
    value (pure)."""
    ts = now
    ignored: list[str] = []
    if _absent(q.get("ts")):
        if q.get("ts") is not None:
            ignored.append("ts")
    else:
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
        if _absent(q.get(param)):
            if q.get(param) is not None:
                ignored.append(param)
            continue
        unit = shelly_battery_unit(q, model) if kind == "battery" else None
        entries.append(make_entry(kind, "", unit, _number(q[param], param), ts, param))
    if not any(e.kind in ("temperature", "humidity") for e in entries):
        raise ApiError(
            "invalid_measurement",
            "send at least one of temp or hum with a value"
            + (f" (without a value: {', '.join(ignored)})" if ignored else ""),
        )
    return Batch(q.get("device") or None, tuple(entries)), ignored


def _battery_channel(e: Entry, chans: dict[pipeline.ChannelKey, pipeline.Channel]) -> Entry:
    """A battery channel made in the other unit (a Gen3's volts read as percent before
    its model was set) keeps its history; this reading goes to the channel labelled
    with its unit (`battery V`), so nothing is lost and no unit is ever converted."""
    held = chans.get((e.kind, e.label))
    if e.kind == "battery" and held is not None and held.unit != e.unit:
        return Entry(e.kind, e.unit, e.unit, e.value, e.ts)
    return e


@routes.get("/v1/ingest/shelly")
async def ingest_shelly(request: web.Request) -> web.Response:
    cfg = request.app[CONFIG]
    now = cfg.clock()
    q = request.query
    token = q.get("token") or bearer(request)
    pool = request.app[POOL]
    dev = await _device(request, token, now)
    batch, ignored = shelly_batch(q, now, oldest_accepted(cfg, now), dev.model)
    entries = tuple(_battery_channel(e, dev.channels or {}) for e in batch.entries)
    await pipeline.check_named_device(pool, dev, batch.device)
    answer = await pipeline.store_fast(
        pool,
        request.app[WRITER],
        dev,
        entries,
        now=now,
        compact_after_days=cfg.compact_after_days,
    )
    if ignored:
        answer["ignored"] = ignored
    return response(answer)


async def _file_refusal(
    conn: Any, cfg: Config, account_id: str, raw: bytes, body: Any, exc: ApiError, now: datetime
) -> None:
    """Keep a refused uplink where the operator sees it (the tray, the device's
    health), within the account's own tray allowance: a flood costs only its sender."""
    try:
        await ratelimit.hit(
            conn, f"tray:{account_id}", cfg.ingest_rate_per_min, 60, now, "the LoRaWAN tray"
        )
    except ApiError:
        return  # over the allowance: the refusal is still answered, not filed
    eui = lorawan.dev_eui_of(body)
    dev = await pipeline.device_by_eui(conn, account_id, eui) if eui else None
    await tray.file(
        conn,
        account_id,
        dev_eui=eui,
        network=None,
        key=None,
        state="refused",
        reason=f"{exc.code}: {exc.message}",
        device_id=dev.id if dev else None,
        payload=body if body is not None else {"unparsed_bytes": len(raw)},
        now=now,
    )


@routes.post("/v1/ingest/lorawan")
@routes.post("/v1/ingest/lorawan/{suffix:[A-Za-z0-9_.-]{1,64}}")
async def ingest_lorawan(request: web.Request) -> web.Response:
    """The Things Stack v3 webhook (any message type; a per-type path suffix is fine)
    and the ChirpStack v4 HTTP integration (`?event=up|join|...`)."""
    cfg = request.app[CONFIG]
    now = cfg.clock()
    raw = await request.read()
    token = request.query.get("token") or bearer(request)
    event = request.query.get("event")
    async with request.app[POOL].connection() as conn:
        tok = await tokens.authenticate(conn, request.app[VERIFIER], token, ("whk",), now)
        acc = tok.account_id
        request[LOG_ACCOUNT] = acc
        body: Any = None
        try:
            body = parse_json(raw)
            got = lorawan.parse(body, event, now, oldest_accepted(cfg, now))
            if isinstance(got, lorawan.Ignored):
                # not an uplink: answered 2xx, or the network counts it against the webhook
                return response(
                    {
                        "accepted": 0,
                        "deduplicated": 0,
                        "channels": [],
                        "ignored_event": got.event,
                    }
                )
            dev = await pipeline.device_by_eui(conn, acc, got.dev_eui)
            if dev is None or got.simulated:
                await ratelimit.hit(
                    conn, f"tray:{acc}", cfg.ingest_rate_per_min, 60, now, "the LoRaWAN tray"
                )
                rid = await tray.file(
                    conn,
                    acc,
                    dev_eui=got.dev_eui,
                    network=got.network,
                    key=got.key,
                    state="simulated" if got.simulated else "unassigned",
                    reason="simulated uplink: a test, not a reading" if got.simulated else None,
                    device_id=dev.id if dev else None,
                    payload=body,
                    now=now,
                )
                answer: dict[str, Any] = {
                    "accepted": 0,
                    "deduplicated": 0 if rid is not None else len(got.entries),
                    "channels": [],
                }
                if got.simulated:
                    return response({**answer, "simulated": True})
                return response({**answer, "unassigned": True}, status=202)
            request[LOG_DEVICE] = dev.id
            await _rate(conn, cfg, dev, now)
            async with conn.transaction():  # the uplink's identity and its readings, or neither
                if await tray.claim_key(conn, acc, got.key, dev.id, now):
                    answer = await pipeline.store(
                        conn, dev, got.entries, now=now, compact_after_days=cfg.compact_after_days
                    )
                    if got.ignored:
                        await tray.file(
                            conn,
                            acc,
                            dev_eui=got.dev_eui,
                            network=got.network,
                            key=got.key,
                            state="partial",
                            reason="no value (null): " + ", ".join(got.ignored),
                            device_id=dev.id,
                            payload=body,
                            now=now,
                        )
                else:
                    answer = {
                        "accepted": 0,
                        "deduplicated": len(got.entries),
                        "channels": [],
                        "duplicate": True,
                    }
            if got.ignored:
                answer["ignored"] = list(got.ignored)
            return response(answer)
        except ApiError as exc:
            if exc.status in (400, 422):
                await _file_refusal(conn, cfg, acc, raw, body, exc, now)
            raise


# --- the tray: uplinks an operator must look at (ingest/tray.py) -------------------


@routes.get("/v1/lorawan/unassigned")
async def list_unassigned(request: web.Request) -> web.Response:
    q = request.query
    try:
        limit = int(q.get("limit", "100"))
    except ValueError:
        raise ApiError("invalid_request", "limit must be an integer") from None
    async with request.app[POOL].connection() as conn:
        acc = await auth.account(request, conn)
        rows = await tray.list_tray(
            conn, acc, state=q.get("state") or None, dev_eui=q.get("dev_eui") or None, limit=limit
        )
    return response({"data": rows})


@routes.post("/v1/lorawan/unassigned/{uplink_id}/assign")
async def assign_unassigned(request: web.Request) -> web.Response:
    cfg = request.app[CONFIG]
    now = cfg.clock()
    async with request.app[POOL].connection() as conn:
        acc = await auth.account(request, conn)
        body = await json_object(request)
        extra = sorted(set(body) - {"device_id"})
        if extra:
            raise ApiError(
                "invalid_request", f"unknown field {extra[0][:40]!r} (allowed: device_id)"
            )
        answer = await tray.assign(
            conn,
            acc,
            request.match_info["uplink_id"],
            body.get("device_id"),
            now=now,
            oldest=oldest_accepted(cfg, now),
            compact_after_days=cfg.compact_after_days,
            actor=auth.actor(request),
        )
    return response(answer)


@routes.delete("/v1/lorawan/unassigned/{uplink_id}")
async def discard_unassigned(request: web.Request) -> web.Response:
    now = request.app[CONFIG].clock()
    async with request.app[POOL].connection() as conn:
        acc = await auth.account(request, conn)
        await tray.discard(
            conn, acc, request.match_info["uplink_id"], now, actor=auth.actor(request)
        )
    return web.Response(status=204)
