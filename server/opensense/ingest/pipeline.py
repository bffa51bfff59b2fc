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

from .. import tokens
from ..errors import ApiError
from ..ids import new_id
from ..kinds import KINDS
from ..presets import VERTICALS
from ..storage.write import insert_readings
from .validate import Entry

IDEMPOTENCY_TTL = timedelta(hours=24)


@dataclass(frozen=True)
class Device:
    id: str
    account_id: str
    local_id: str
    vertical: str


async def device_for_token(
    conn: AsyncConnection[Any], verifier: tokens.Verifier, token: str | None, now: datetime
) -> Device:
    row = await tokens.authenticate(conn, verifier, token, ("ds_live",), now)
    cur = await conn.execute(
        "SELECT d.id, d.local_id, d.deleted_at, s.vertical FROM devices d"
        " JOIN sites s ON s.id = d.site_id WHERE d.id = %s",
        (row.device_id,),
    )
    d = await cur.fetchone()
    if d is None or d[2] is not None:
        raise ApiError("token_invalid", "the token's device was deleted")
    return Device(d[0], row.account_id, d[1], d[3])


async def check_named_device(conn: AsyncConnection[Any], dev: Device, named: str | None) -> None:
    """The payload may only speak for the token's own device."""
    if named is None or named in (dev.local_id, dev.id):
        return
    cur = await conn.execute(
        "SELECT 1 FROM devices WHERE account_id = %s AND deleted_at IS NULL AND (local_id = %s OR id = %s)",
        (dev.account_id, named, named),
    )
    if await cur.fetchone() is None:
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
        known[key] = (got[0], got[1], got[2], got[3])
    return known


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
        inserted = await insert_readings(conn, rows, now=now, compact_after_days=compact_after_days)
        await conn.execute(
            "UPDATE devices SET last_seen_at = %s WHERE id = %s"
            " AND (last_seen_at IS NULL OR last_seen_at < %s)",
            (now, dev.id, now - timedelta(seconds=5)),
        )
        seen: dict[tuple[str, str], None] = {}
        for e in entries:
            seen.setdefault((e.kind, e.label), None)
        answer = {
            "accepted": inserted,
            "deduplicated": len(entries) - inserted,
            "channels": [
                {"type": k, "label": lbl, "channel_id": channels[(k, lbl)][0]} for k, lbl in seen
            ],
        }
        if idempotency_key is not None:
            await conn.execute(
                "UPDATE idempotency_keys SET response = %s WHERE device_id = %s AND key = %s",
                (Jsonb(answer), dev.id, idempotency_key),
            )
        return answer
