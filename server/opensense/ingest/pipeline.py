"""The ingest pipeline every door feeds (HTTP JSON, Shelly, LoRaWAN, MQTT and the
site gateway's batch door): authenticate the device, resolve or create its channels,
turn its readings into rows of those channels (`reading_row`, the one function every
door's readings pass through), store new readings once, answer with
accepted/deduplicated counts. All or nothing, in one transaction."""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from psycopg import AsyncConnection
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from .. import audit, ratelimit, tokens
from ..errors import ApiError
from ..ids import new_id
from ..kinds import KINDS
from ..presets import VERTICALS
from ..storage.batcher import BatchWriter
from ..storage.write import RowLike, insert_readings, packed_horizon
from .validate import Entry

IDEMPOTENCY_TTL = timedelta(hours=24)


class Channel(NamedTuple):
    """A device's channel as the ingest needs it: where its readings go."""

    id: str
    num: int
    unit: str
    offset: float  # the calibration offset added to every reading


ChannelKey = tuple[str, str]  # (kind, label)


def reading_row(channel: Channel, ts: datetime, value: float) -> RowLike:
    """A reading of `channel` as stored: every door's readings end here (HTTP, Shelly
    and LoRaWAN through `store`/`store_fast`, MQTT through `store_fast`, both by
    `_rows`; the gateway's batch door through gateway/store.py, by `channel_rows`), so
    the calibration offset is applied one way (tests/test_pipeline_doors.py). Each
    door checks the unit with `check_unit` first."""
    # a plain tuple, which the writers take as a `Row`: making a NamedTuple is most of
    # what a row costs (0.8 of 1.4 µs a reading of 32, measured beside this loop)
    return (channel.num, ts, value + channel.offset)


def check_unit(channel: Channel, unit: str, field: str) -> None:
    """Units are never converted: a unit other than the channel's refuses the readings
    (invalid_measurement, naming `field`)."""
    if channel.unit != unit:
        raise ApiError(
            "invalid_measurement",
            f"{field} {unit!r} differs from channel {channel.id}'s unit {channel.unit!r}; "
            "units are never converted",
        )


def channel_rows(
    channel: Channel, unit: str, readings: Iterable[tuple[datetime, float]], field: str
) -> list[RowLike]:
    """The rows of `readings` (ts, value) on `channel`, their unit checked."""
    check_unit(channel, unit, field)
    return [reading_row(channel, ts, value) for ts, value in readings]


@dataclass(frozen=True)
class Device:
    id: str
    account_id: str
    local_id: str
    vertical: str
    # (kind, label) -> its channel, as read with the token
    channels: dict[ChannelKey, Channel] | None = None
    model: str = ""  # the device's model (Shelly: which unit its battery reports in)


class AuthRow(NamedTuple):
    """The authentication statement's row for one request (ingest/authbatch.py): the
    token, its device and site, the channels' revision and (when it changed) the
    channels, the rate count."""

    id: str  # the token's
    kind: str
    account_id: str
    device_id: str | None
    hash: str
    revoked_at: datetime | None
    local_id: str | None  # None: the token has no device
    deleted_at: datetime | None  # the device's
    vertical: str | None
    fast_check: bytes | None
    model: str | None
    rev: int  # the sum of the device's channel revisions (0: none)
    channels: list[list[Any]] | None  # None: unchanged since `rev` was sent
    rate_count: int | None  # None: not counted (not a live token of a live device)


def read_channels(rows: list[list[Any]]) -> dict[ChannelKey, Channel]:
    """The channels aggregated as JSON arrays [kind, label, id, num, unit, offset]."""
    return {
        (k, lbl): Channel(cid, int(num), unit, float(off)) for k, lbl, cid, num, unit, off in rows
    }


Held = tuple[int, dict[ChannelKey, Channel]]  # (revision, channels)


class ChannelCache:
    """A server process's copy of each device's channels as HTTP ingest last read
    them, keyed by the token's key id, with the revision they were read at (the sum of
    the channels' revisions, migration 0027). The authentication statement compares
    that revision with the database's in the same snapshot as the token's row, so a
    channel made or recalibrated by any process is read again on the device's very
    next request; the cache only saves sending and parsing what did not change.
    Bounded: past `size` keys, the oldest half is dropped (read again when used)."""

    def __init__(self, size: int = 65_536) -> None:
        self.size = size
        self._held: dict[str, Held] = {}
        self.reads = 0  # statements that sent the channels (tests, benches)

    def get(self, key_id: str) -> Held | None:
        return self._held.get(key_id)

    def channels(self, key_id: str, row: AuthRow, held: Held | None) -> dict[ChannelKey, Channel]:
        """The device's channels: `held` (what `get` gave before the statement, whose
        revision it sent) when the statement did not send them, else the ones sent."""
        if row.channels is None:
            assert held is not None and held[0] == row.rev, "sent unless the revision was held"
            return held[1]
        self.reads += 1
        channels = read_channels(row.channels)
        if len(self._held) >= self.size:
            for k in list(self._held)[: self.size // 2]:  # insertion order: the oldest
                del self._held[k]
        self._held[key_id] = (row.rev, channels)
        return channels


async def device_for_token(
    pool: AsyncConnectionPool,
    lookup: Callable[[str, int | None, datetime], Awaitable[AuthRow | None]],
    verifier: tokens.Verifier,
    token: str | None,
    now: datetime,
    rate_per_min: int,
    cache: ChannelCache,
) -> Device:
    """Authenticate a ds_live_ token and count the device's rate limit (401/429); the
    device's channels from `cache` unless they changed. The token's row comes from
    `lookup` (`AuthBatcher.lookup`, ingest/authbatch.py: one statement read after the
    request arrived, shared with concurrent requests); a connection is taken from
    `pool` only when the check needs one: a secret this process has not checked yet,
    or the token's last_used_at due (once a minute)."""
    kind, key_id, secret = tokens.parse_or_raise(token, ("ds_live",))
    held = cache.get(key_id)
    window = ratelimit.window_start(now, 60)
    row = await lookup(key_id, held[0] if held is not None else None, window)
    if row is None:
        raise ApiError("token_invalid", "the token is not known (wrong, or deleted)")
    touch = None  # not known yet: check_row asks once the secret is found good
    if row.kind == kind and row.revoked_at is None and verifier.remembers(key_id, secret, row.hash):
        touch = verifier.due_for_touch(row.id, now)  # (a good secret: as check_row would)
    if touch is not False:
        async with pool.connection() as conn:
            await tokens.check_row(
                conn,
                verifier,
                kind,
                key_id,
                secret,
                row.id,
                row.kind,
                row.hash,
                row.revoked_at,
                now,
                fast=row.fast_check,
                touch=touch,
            )
    return _device_of(row, key_id, held, now, window, rate_per_min, cache)


def _device_of(
    row: AuthRow,
    key_id: str,
    held: Held | None,
    now: datetime,
    window: datetime,
    rate_per_min: int,
    cache: ChannelCache,
) -> Device:
    """The device of a checked token row (401 if deleted, 429 past its rate)."""
    if row.deleted_at is not None or row.local_id is None:
        raise ApiError("token_invalid", "the token's device was deleted")
    if row.rate_count is not None and row.rate_count > rate_per_min:
        raise ratelimit.limited(rate_per_min, 60, window, now, "ingest for this device")
    assert row.device_id is not None and row.vertical is not None
    return Device(
        row.device_id,
        row.account_id,
        row.local_id,
        row.vertical,
        cache.channels(key_id, row, held),
        row.model or "",
    )


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
    found = await cur.fetchone()
    if found is None:
        return None
    device_id, local_id, vertical = found
    return Device(device_id, account_id, local_id, vertical)


async def channels_for(
    conn: AsyncConnection[Any], dev: Device, entries: tuple[Entry, ...]
) -> dict[ChannelKey, Channel]:
    """(kind, label) -> its channel, creating what is missing with the site
    vertical's default rule."""
    cur = await conn.execute(
        'SELECT kind, label, id, num, unit, "offset" FROM channels WHERE device_id = %s', (dev.id,)
    )
    known = {(kind, label): Channel(*ch) for kind, label, *ch in await cur.fetchall()}
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
        row = await cur.fetchone()
        if row is None:  # created meanwhile by a concurrent request for this device
            cur = await conn.execute(
                'SELECT id, num, unit, "offset" FROM channels WHERE device_id = %s AND kind = %s AND label = %s',
                (dev.id, kind, label),
            )
            row = await cur.fetchone()
            assert row is not None
            got = Channel(*row)
        else:
            got = Channel(*row)
            # The rule engine's state row, made with the channel: a rule edit from
            # now on finds it for its `meta_rev` trigger, so the engine's first pass
            # over the channel may keep its rules (alarms/evaluator.py `MetaCache`;
            # a pass that makes the row itself keeps nothing of it)
            await conn.execute(
                "INSERT INTO alarm_state (channel_num, channel_id) VALUES (%s, %s)"
                " ON CONFLICT DO NOTHING",
                (got.num, got.id),
            )
            preset = VERTICALS[dev.vertical].rules.get(kind)
            if preset and not KINDS[kind].auxiliary:
                await conn.execute(
                    "INSERT INTO rules (id, channel_id, kind, params, grace_min, is_default)"
                    " VALUES (%s, %s, %s, %s, %s, true)",
                    (new_id("rul"), got.id, preset.kind, Jsonb(preset.params), preset.grace_min),
                )
            await audit.record(
                conn,
                account_id=dev.account_id,
                actor=f"device:{dev.id}",
                action="channel.create",
                subject=got.id,
                data={"device_id": dev.id, "kind": kind, "label": label, "unit": wanted[key]},
            )
        known[key] = got
    return known


def _rows(entries: tuple[Entry, ...], channels: dict[ChannelKey, Channel]) -> list[RowLike]:
    """The rows of a batch's entries: one loop, the unit compared in it (`check_unit`
    words a refusal: its field name is made only then) and each row made by
    `reading_row` (a call of `channel_rows` an entry, with its generator, list and
    field name and a `Row` each, cost 2.5 µs a reading of 32; this 0.6: tools/bench/decode)."""
    rows: list[RowLike] = []
    append = rows.append
    for i, e in enumerate(entries):
        ch = channels[(e.kind, e.label)]
        if ch.unit != e.unit:
            check_unit(ch, e.unit, f"measurements[{i}].unit")
        append(reading_row(ch, e.ts, e.value))
    return rows


def _answer(
    entries: tuple[Entry, ...],
    channels: dict[ChannelKey, Channel],
    inserted: int,
) -> dict[str, Any]:
    seen: dict[tuple[str, str], None] = {}
    for e in entries:
        seen.setdefault((e.kind, e.label), None)
    return {
        "accepted": inserted,
        "deduplicated": len(entries) - inserted,
        "channels": [
            {"type": k, "label": lbl, "channel_id": channels[(k, lbl)].id} for k, lbl in seen
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
    listed: bool = True,
) -> dict[str, Any]:
    """The common case: known channels, recent readings, no idempotency key. The
    readings ride in the group-commit writer; anything else takes `store`. Not
    `listed`: the answer without its `channels` (MQTT, which answers nothing on
    success, counts only: 1.2 µs a 3-reading message less), unless `store` made it."""
    channels = dev.channels or {}
    oldest_open = packed_horizon(now, compact_after_days) + timedelta(days=1)
    for e in entries:  # (a loop, not two any() generators: 0.7 -> 0.3 µs, 3 readings)
        if (e.kind, e.label) not in channels or e.ts.date() < oldest_open:
            async with pool.connection() as conn:
                return await store(
                    conn, dev, entries, now=now, compact_after_days=compact_after_days
                )
    rows = _rows(entries, channels)
    inserted = await writer.write(rows, dev.id, now)
    if not listed:
        return {"accepted": inserted, "deduplicated": len(entries) - inserted}
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
                body_sha256, response = prev
                if bytes(body_sha256) != digest:
                    raise ApiError(
                        "idempotency_conflict",
                        "this Idempotency-Key was used in the last 24 h with a different body",
                    )
                return dict(response)
        channels = await channels_for(conn, dev, entries)
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
