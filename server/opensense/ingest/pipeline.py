"""The ingest pipeline every door feeds (HTTP JSON, Shelly, LoRaWAN; MQTT later):
authenticate the device, resolve or create its channels, store new readings once,
answer with accepted/deduplicated counts. All or nothing, in one transaction."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from psycopg import AsyncConnection
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from .. import audit, ratelimit, tokens
from ..errors import ApiError
from ..ids import new_id
from ..kinds import KINDS
from ..presets import VERTICALS
from ..storage.batcher import BatchWriter
from ..storage.write import insert_readings, packed_horizon
from .validate import Entry

IDEMPOTENCY_TTL = timedelta(hours=24)


@dataclass(frozen=True)
class Device:
    id: str
    account_id: str
    local_id: str
    vertical: str
    # (kind, label) -> (channel id, num, unit, offset), as read with the token
    channels: dict[tuple[str, str], tuple[str, int, str, float]] | None = None
    model: str = ""  # the device's model (Shelly: which unit its battery reports in)


# One round trip per request: the token's row, its device and site, the device's
# channels, and the device's rate-limit counter (counted only for a live token of a
# live device; the secret is checked right after, so a caller needs the token's
# public key id to spend a device's allowance).
AUTH_SQL = """
WITH t AS (
  SELECT t.id, t.kind, t.account_id, t.device_id, t.hash, t.revoked_at,
         d.local_id, d.deleted_at, s.vertical, t.fast_check, d.model
  FROM tokens t LEFT JOIN devices d ON d.id = t.device_id LEFT JOIN sites s ON s.id = d.site_id
  WHERE t.key_id = %(key_id)s
), rl AS (
  INSERT INTO rate_counters (key, window_start, count)
  SELECT 'ingest:' || device_id, %(window)s, 1 FROM t
  WHERE kind = 'ds_live' AND revoked_at IS NULL AND deleted_at IS NULL
  ON CONFLICT (key, window_start) DO UPDATE SET count = rate_counters.count + 1
  RETURNING count
)
SELECT t.id, t.kind, t.account_id, t.device_id, t.hash, t.revoked_at, t.local_id,
       t.deleted_at, t.vertical, (SELECT count FROM rl),
       (SELECT coalesce(jsonb_agg(jsonb_build_array(c.kind, c.label, c.id, c.num, c.unit, c."offset")),
                        '[]'::jsonb)
        FROM channels c WHERE c.device_id = t.device_id),
       t.fast_check, t.model
FROM t
"""


async def device_for_token(
    conn: AsyncConnection[Any],
    verifier: tokens.Verifier,
    token: str | None,
    now: datetime,
    rate_per_min: int,
) -> Device:
    """Authenticate a ds_live_ token and count the device's rate limit (401/429)."""
    kind, key_id, secret = tokens.parse_or_raise(token, ("ds_live",))
    window = ratelimit.window_start(now, 60)
    cur = await conn.execute(AUTH_SQL, {"key_id": key_id, "window": window})
    row = await cur.fetchone()
    if row is None:
        raise ApiError("token_invalid", "the token is not known (wrong, or deleted)")
    await tokens.check_row(
        conn, verifier, kind, key_id, secret, row[0], row[1], row[4], row[5], now, fast=row[11]
    )
    if row[7] is not None or row[6] is None:
        raise ApiError("token_invalid", "the token's device was deleted")
    if row[9] is not None and row[9] > rate_per_min:
        raise ratelimit.limited(rate_per_min, 60, window, now, "ingest for this device")
    channels = {(c[0], c[1]): (c[2], int(c[3]), c[4], float(c[5])) for c in row[10]}
    return Device(row[3], row[2], row[6], row[8], channels, row[12] or "")


async def check_named_device(pool: AsyncConnectionPool, dev: Device, named: str | None) -> None:
    """The payload may only speak for the token's own device (the common case costs
    no query: the database is asked only to tell 403 from 404)."""
    if named is None or named in (dev.local_id, dev.id):
        return
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT 1 FROM devices WHERE account_id = %s AND deleted_at IS NULL"
            " AND (local_id = %s OR id = %s)",
            (dev.account_id, named, named),
        )
        found = await cur.fetchone()
    if found is None:
        raise ApiError("device_not_found", f"no device {named[:64]!r} in this account")
    raise ApiError(
        "forbidden",
        f"this token belongs to device {dev.local_id!r} and cannot send for {named[:64]!r}",
    )


async def device_by_eui(conn: AsyncConnection[Any], account_id: str, dev_eui: str) -> Device | None:
    cur = await conn.execute(
        "SELECT d.id, d.local_id, s.vertical FROM devices d JOIN sites s ON s.id = d.site_id"
        " WHERE d.account_id = %s AND d.dev_eui = %s AND d.deleted_at IS NULL",
        (account_id, dev_eui.upper()),
    )
    d = await cur.fetchone()
    return Device(d[0], account_id, d[1], d[2]) if d else None


async def _channels(
    conn: AsyncConnection[Any], dev: Device, entries: tuple[Entry, ...]
) -> dict[tuple[str, str], tuple[str, int, str, float]]:
    """(kind, label) -> (channel id, num, unit, offset), creating what is missing
    with the site vertical's default rule."""
    cur = await conn.execute(
        'SELECT kind, label, id, num, unit, "offset" FROM channels WHERE device_id = %s', (dev.id,)
    )
    known = {(r[0], r[1]): (r[2], r[3], r[4], r[5]) for r in await cur.fetchall()}
    wanted: dict[tuple[str, str], str] = {}
    for e in entries:
        wanted.setdefault((e.kind, e.label), e.unit)
    for key in sorted(set(wanted) - set(known)):
        kind, label = key
        name = f"{kind} {label}".strip()
        cur = await conn.execute(
            "INSERT INTO channels (id, sensor_id, account_id, device_id, kind, label, unit, name)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
            ' ON CONFLICT (device_id, kind, label) DO NOTHING RETURNING id, num, unit, "offset"',
            (new_id("chn"), new_id("snr"), dev.account_id, dev.id, kind, label, wanted[key], name),
        )
        got = await cur.fetchone()
        if got is None:  # created meanwhile by a concurrent request for this device
            cur = await conn.execute(
                'SELECT id, num, unit, "offset" FROM channels WHERE device_id = %s AND kind = %s AND label = %s',
                (dev.id, kind, label),
            )
            got = await cur.fetchone()
            assert got is not None
        else:
            preset = VERTICALS[dev.vertical].rules.get(kind)
            if preset and not KINDS[kind].auxiliary:
                await conn.execute(
                    "INSERT INTO rules (id, channel_id, kind, params, grace_min, is_default)"
                    " VALUES (%s, %s, %s, %s, %s, true)",
                    (new_id("rul"), got[0], preset.kind, Jsonb(preset.params), preset.grace_min),
                )
            await audit.record(
                conn,
                account_id=dev.account_id,
                actor=f"device:{dev.id}",
                action="channel.create",
                subject=got[0],
                data={"device_id": dev.id, "kind": kind, "label": label, "unit": wanted[key]},
            )
        known[key] = (got[0], got[1], got[2], got[3])
    return known


def _rows(
    entries: tuple[Entry, ...], channels: dict[tuple[str, str], tuple[str, int, str, float]]
) -> list[tuple[int, datetime, float]]:
    rows = []
    for i, e in enumerate(entries):
        cid, num, unit, offset = channels[(e.kind, e.label)]
        if unit != e.unit:
            raise ApiError(
                "invalid_measurement",
                f"measurements[{i}].unit {e.unit!r} differs from channel {cid}'s unit {unit!r}; "
                "units are never converted",
            )
        rows.append((num, e.ts, e.value + offset))
    return rows


def _answer(
    entries: tuple[Entry, ...],
    channels: dict[tuple[str, str], tuple[str, int, str, float]],
    inserted: int,
) -> dict[str, Any]:
    seen: dict[tuple[str, str], None] = {}
    for e in entries:
        seen.setdefault((e.kind, e.label), None)
    return {
        "accepted": inserted,
        "deduplicated": len(entries) - inserted,
        "channels": [
            {"type": k, "label": lbl, "channel_id": channels[(k, lbl)][0]} for k, lbl in seen
        ],
    }


async def store_fast(
    pool: AsyncConnectionPool,
    writer: BatchWriter,
    dev: Device,
    entries: tuple[Entry, ...],
    *,
    now: datetime,
    compact_after_days: int,
) -> dict[str, Any]:
    """The common case: known channels, recent readings, no idempotency key. The
    readings ride in the group-commit writer; anything else takes `store`."""
    channels = dev.channels or {}
    oldest_open = packed_horizon(now, compact_after_days) + timedelta(days=1)
    if any((e.kind, e.label) not in channels for e in entries) or any(
        e.ts.date() < oldest_open for e in entries
    ):
        async with pool.connection() as conn:
            return await store(conn, dev, entries, now=now, compact_after_days=compact_after_days)
    rows = _rows(entries, channels)
    inserted = await writer.write(rows, dev.id, now)
    return _answer(entries, channels, inserted)


def body_digest(raw: bytes) -> bytes:
    return hashlib.sha256(raw).digest()


async def store(
    conn: AsyncConnection[Any],
    dev: Device,
    entries: tuple[Entry, ...],
    *,
    now: datetime,
    compact_after_days: int,
    idempotency_key: str | None = None,
    digest: bytes = b"",
) -> dict[str, Any]:
    """Store a validated batch for `dev`; returns the 200 answer. One transaction."""
    async with conn.transaction():
        if idempotency_key is not None:
            cur = await conn.execute(
                "INSERT INTO idempotency_keys (device_id, key, body_sha256, response, created_at)"
                " VALUES (%s, %s, %s, '{}', %s)"
                " ON CONFLICT (device_id, key) DO UPDATE SET body_sha256 = excluded.body_sha256,"
                "  response = '{}', created_at = excluded.created_at"
                "  WHERE idempotency_keys.created_at < %s"
                " RETURNING 1",
                (dev.id, idempotency_key, digest, now, now - IDEMPOTENCY_TTL),
            )
            if await cur.fetchone() is None:
                cur = await conn.execute(
                    "SELECT body_sha256, response FROM idempotency_keys WHERE device_id = %s AND key = %s",
                    (dev.id, idempotency_key),
                )
                prev = await cur.fetchone()
                assert prev is not None
                if bytes(prev[0]) != digest:
                    raise ApiError(
                        "idempotency_conflict",
                        "this Idempotency-Key was used in the last 24 h with a different body",
                    )
                return dict(prev[1])
        channels = await _channels(conn, dev, entries)
        rows = _rows(entries, channels)
        inserted = await insert_readings(conn, rows, now=now, compact_after_days=compact_after_days)
        await conn.execute(
            "UPDATE devices SET last_seen_at = %s WHERE id = %s"
            " AND (last_seen_at IS NULL OR last_seen_at < %s)",
            (now, dev.id, now - timedelta(seconds=5)),
        )
        answer = _answer(entries, channels, inserted)
        if idempotency_key is not None:
            await conn.execute(
                "UPDATE idempotency_keys SET response = %s WHERE device_id = %s AND key = %s",
                (Jsonb(answer), dev.id, idempotency_key),
            )
        return answer
