"""Accounts, sites, devices, channels and tokens: the operations, used by both the
HTTP API and the `opensense` command. Every function takes the account it acts for
and never touches another account's rows."""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any, TypeVar, cast
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import psycopg.errors
from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from opensense_contract import topics

from .. import audit, tokens
from ..alarms.egress import email_problem
from ..errors import ApiError
from ..ids import new_id
from ..kinds import KINDS
from ..presets import DEFAULT_VERTICAL, VERTICALS

LOCAL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
Row = dict[str, Any]
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])
SYSTEM = "system"  # the actor when a caller names none


def _atomic(fn: F) -> F:
    """The change and its audit row commit together: a transaction of its own, or a
    savepoint inside the caller's."""

    @functools.wraps(fn)
    async def wrapper(conn: AsyncConnection[Any], *args: Any, **kwargs: Any) -> Any:
        async with conn.transaction():
            return await fn(conn, *args, **kwargs)

    return cast(F, wrapper)


def _plain(v: Any) -> Any:
    """A value as the audit trail stores it (datetimes as RFC 3339 text)."""
    if isinstance(v, datetime):
        return audit.trail.iso(v)
    if isinstance(v, Jsonb):
        return v.obj
    return v


def _check_str(
    value: Any, field: str, max_len: int = 200, allow_empty: bool = False, multiline: bool = False
) -> str:
    if (
        not isinstance(value, str)
        or len(value) > max_len
        or (not allow_empty and not value.strip())
    ):
        raise ApiError(
            "invalid_request",
            f"{field} must be a {'' if allow_empty else 'non-empty '}string of at most {max_len} characters",
        )
    # names end up in alarm mail subjects and pages: one line, no control characters
    # (a CR/LF there broke the whole alarm dispatch batch); a postal address may wrap
    allowed = "\n\r\t" if multiline else ""
    if any((ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F) and c not in allowed for c in value):
        raise ApiError(
            "invalid_request", f"{field} may not contain line breaks or control characters"
        )
    return value


REPORT_RECIPIENTS_MAX = 20


def check_report_recipients(r: Any) -> list[str]:
    """The addresses a site's monthly report is emailed to (docs/reports.md)."""
    if not isinstance(r, list) or len(r) > REPORT_RECIPIENTS_MAX:
        raise ApiError(
            "invalid_request",
            f"report_recipients must be a list of at most {REPORT_RECIPIENTS_MAX} email addresses",
        )
    for i, x in enumerate(r):
        why = email_problem(x) if isinstance(x, str) else "not a string"
        if why:
            raise ApiError("invalid_request", f"report_recipients[{i}] is not sendable: {why}")
    return list(dict.fromkeys(r))


def check_timezone(tz: Any) -> str:
    _check_str(tz, "timezone", 64)
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise ApiError(
            "invalid_request", f"timezone {tz!r} is not an IANA time zone (e.g. Europe/Berlin)"
        ) from None
    return str(tz)


def check_vertical(v: Any) -> str:
    if v not in VERTICALS:
        raise ApiError(
            "invalid_request",
            f"vertical must be one of {', '.join(VERTICALS)}, got {str(v)[:40]!r}",
        )
    return str(v)


def check_cadence(c: Any) -> int:
    """The contract's range, the one a node's firmware takes (firmware/sense/policy.py
    cadence_ok): a cadence the server sends (cmd/cadence) is one the node can take."""
    lo, hi = topics.CADENCE_MIN_S, topics.CADENCE_MAX_S
    if isinstance(c, bool) or not isinstance(c, int) or not lo <= c <= hi:
        raise ApiError("invalid_request", f"cadence_s must be an integer from {lo} to {hi} seconds")
    return c


# --- accounts -------------------------------------------------------------------


@_atomic
async def create_account(
    conn: AsyncConnection[Any], name: str, email: str, *, actor: str = SYSTEM
) -> str:
    acc = new_id("acc")
    await conn.execute(
        "INSERT INTO accounts (id, name, email) VALUES (%s, %s, %s)", (acc, name, email)
    )
    # the account's login email is its first owner (the dashboard's users, migration 0017)
    await conn.execute(
        "INSERT INTO users (id, account_id, email, role) VALUES (%s, %s, %s, 'owner')",
        (new_id("usr"), acc, email.strip().lower()),
    )
    await audit.record(
        conn,
        account_id=acc,
        actor=actor,
        action="account.create",
        subject=acc,
        data={"name": name, "email": email},
    )
    return acc


@_atomic
async def create_token(
    conn: AsyncConnection[Any],
    account_id: str,
    kind: str,
    rounds: int,
    name: str = "",
    device_id: str | None = None,
    gateway_id: str | None = None,
    *,
    actor: str = SYSTEM,
    action: str = "token.create",
) -> tuple[str, str]:
    """(token id, plaintext). The plaintext exists only in this return value (the
    audit row names the token, never its secret)."""
    t = tokens.generate(kind, rounds)
    await conn.execute(
        "INSERT INTO tokens (id, kind, key_id, hash, account_id, device_id, name, site_hash,"
        " gateway_id) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (t.id, kind, t.key_id, t.hash, account_id, device_id, name, t.site_hash, gateway_id),
    )
    await audit.record(
        conn,
        account_id=account_id,
        actor=actor,
        action=action,
        subject=t.id,
        data={"kind": kind, "name": name, "device_id": device_id, "key_id": t.key_id},
    )
    return t.id, t.plaintext


TOKEN_KINDS = ("ua_live", "whk")  # made on request; device tokens come with the device


def check_token_request(body: dict[str, Any]) -> tuple[str, str]:
    """(kind, name) of a request for a new user or webhook token."""
    kind = body.get("kind", "ua_live")
    if kind not in TOKEN_KINDS:
        raise ApiError(
            "invalid_request",
            "kind must be ua_live or whk (device tokens come with the device)",
        )
    name = body.get("name", "")
    if not isinstance(name, str) or len(name) > 200:
        raise ApiError("invalid_request", "name must be a string of at most 200 characters")
    return str(kind), name


def token_public(row: Row, now: datetime) -> Row:
    return {
        "id": row["id"],
        "kind": row["kind"],
        "name": row["name"],
        "device_id": row["device_id"],
        "created_at": row["created_at"],
        "last_used_at": row["last_used_at"],
        "revoked_at": row["revoked_at"],
        "rotate_recommended": row["revoked_at"] is None
        and now - row["created_at"] > timedelta(days=tokens.ROTATE_AFTER_DAYS),
    }


async def list_tokens(conn: AsyncConnection[Any], account_id: str, now: datetime) -> list[Row]:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(
        "SELECT * FROM tokens WHERE account_id = %s AND revoked_at IS NULL ORDER BY created_at, id",
        (account_id,),
    )
    return [token_public(r, now) for r in await cur.fetchall()]


@_atomic
async def revoke_token(
    conn: AsyncConnection[Any],
    account_id: str,
    token_id: str,
    now: datetime,
    *,
    actor: str = SYSTEM,
) -> None:
    cur = await conn.execute(
        "UPDATE tokens SET revoked_at = %s WHERE id = %s AND account_id = %s AND revoked_at IS NULL"
        " RETURNING kind, device_id",
        (now, token_id, account_id),
    )
    row = await cur.fetchone()
    if row is None:
        raise ApiError("token_not_found", f"no live token {token_id[:40]!r} in this account")
    await audit.record(
        conn,
        account_id=account_id,
        actor=actor,
        action="token.revoke",
        subject=token_id,
        data={"kind": row[0], "device_id": row[1], "revoked_at": _plain(now)},
    )


# --- sites ------------------------------------------------------------------------

SITE_FIELDS = (
    "id",
    "name",
    "address",
    "timezone",
    "vertical",
    "opening_hours",
    "report_options",
    "report_recipients",
    "created_at",
)


def site_public(row: Row) -> Row:
    return {k: row[k] for k in SITE_FIELDS}


@_atomic
async def create_site(
    conn: AsyncConnection[Any], account_id: str, body: dict[str, Any], *, actor: str = SYSTEM
) -> Row:
    name = _check_str(body.get("name"), "name")
    tz = check_timezone(body.get("timezone", "UTC"))
    vertical = check_vertical(body.get("vertical", DEFAULT_VERTICAL))
    address = _check_str(body.get("address", ""), "address", 500, allow_empty=True, multiline=True)
    sid = new_id("site")
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(
        "INSERT INTO sites (id, account_id, name, address, timezone, vertical)"
        " VALUES (%s, %s, %s, %s, %s, %s) RETURNING *",
        (sid, account_id, name, address, tz, vertical),
    )
    row = await cur.fetchone()
    assert row is not None
    await audit.record(
        conn,
        account_id=account_id,
        actor=actor,
        action="site.create",
        subject=sid,
        data={"name": name, "timezone": tz, "vertical": vertical, "address": address},
    )
    return site_public(row)


async def get_site(conn: AsyncConnection[Any], account_id: str, site_id: str) -> Row:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(
        "SELECT * FROM sites WHERE id = %s AND account_id = %s", (site_id, account_id)
    )
    row = await cur.fetchone()
    if row is None:
        raise ApiError("site_not_found", f"no site {site_id[:40]!r} in this account")
    return site_public(row)


async def list_sites(conn: AsyncConnection[Any], account_id: str) -> list[Row]:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(
        "SELECT * FROM sites WHERE account_id = %s ORDER BY created_at, id", (account_id,)
    )
    return [site_public(r) for r in await cur.fetchall()]


@_atomic
async def patch_site(
    conn: AsyncConnection[Any],
    account_id: str,
    site_id: str,
    body: dict[str, Any],
    *,
    actor: str = SYSTEM,
) -> Row:
    before = await get_site(conn, account_id, site_id)
    sets: dict[str, Any] = {}
    if "name" in body:
        sets["name"] = _check_str(body["name"], "name")
    if "address" in body:
        sets["address"] = _check_str(
            body["address"], "address", 500, allow_empty=True, multiline=True
        )
    if "timezone" in body:
        sets["timezone"] = check_timezone(body["timezone"])
    if "vertical" in body:
        sets["vertical"] = check_vertical(body["vertical"])
    for key in ("opening_hours", "report_options"):
        if key in body:
            if not isinstance(body[key], dict):
                raise ApiError("invalid_request", f"{key} must be an object")
            sets[key] = Jsonb(body[key])
    if "report_recipients" in body:
        sets["report_recipients"] = Jsonb(check_report_recipients(body["report_recipients"]))
    for k, v in sets.items():
        await conn.execute(f"UPDATE sites SET {k} = %s WHERE id = %s", (v, site_id))
    if sets:
        await audit.record(
            conn,
            account_id=account_id,
            actor=actor,
            action="site.update",
            subject=site_id,
            data={k: {"from": _plain(before[k]), "to": _plain(v)} for k, v in sets.items()},
        )
    return await get_site(conn, account_id, site_id)


# --- devices ----------------------------------------------------------------------


def check_dev_eui(v: Any) -> str | None:
    """A LoRaWAN DevEUI as stored (upper-case hex), or None for none."""
    if v is None:
        return None
    if not isinstance(v, str) or not re.fullmatch(r"[0-9A-Fa-f]{16}", v):
        raise ApiError("invalid_request", "dev_eui must be 16 hexadecimal digits (or null)")
    return v.upper()


async def _dev_eui_free(
    conn: AsyncConnection[Any], account_id: str, dev_eui: str, device_id: str | None = None
) -> None:
    """Within this account only: another account's DevEUIs are none of its business
    (a global check was an existence oracle; the uplink door matches per account)."""
    cur = await conn.execute(
        "SELECT 1 FROM devices WHERE account_id = %s AND dev_eui = %s AND deleted_at IS NULL"
        " AND id IS DISTINCT FROM %s",
        (account_id, dev_eui, device_id),
    )
    if await cur.fetchone():
        raise ApiError(
            "conflict", f"dev_eui {dev_eui} is already assigned to a device in this account"
        )


async def _device_row(conn: AsyncConnection[Any], account_id: str, device_id: str) -> Row:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(
        "SELECT * FROM devices WHERE account_id = %s AND deleted_at IS NULL"
        " AND (id = %s OR local_id = %s)",
        (account_id, device_id, device_id),
    )
    row = await cur.fetchone()
    if row is None:
        raise ApiError("device_not_found", f"no device {device_id[:64]!r} in this account")
    return row


async def device_public(conn: AsyncConnection[Any], row: Row, now: datetime) -> Row:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(
        "SELECT * FROM tokens WHERE device_id = %s AND revoked_at IS NULL ORDER BY created_at DESC LIMIT 1",
        (row["id"],),
    )
    tok = await cur.fetchone()
    # the newest uplink of this device still in the LoRaWAN tray (refused, used in
    # part, simulated): the device's health shows it until it is discarded
    await cur.execute(
        "SELECT id, state, reason, received_at FROM unassigned_uplinks"
        " WHERE device_id = %s AND resolved_at IS NULL ORDER BY id DESC LIMIT 1",
        (row["id"],),
    )
    problem = await cur.fetchone()
    last = row["last_seen_at"]
    return {
        "id": row["id"],
        "local_id": row["local_id"],
        "name": row["name"],
        "model": row["model"],
        "site_id": row["site_id"],
        "fw_version": row["fw_version"],
        "dev_eui": row["dev_eui"],
        "cadence_s": row["cadence_s"],
        "last_seen_at": last,
        "online": last is not None and now - last <= timedelta(seconds=2 * row["cadence_s"]),
        "token": token_public(tok, now) if tok else None,
        "uplink_problem": problem,
        "created_at": row["created_at"],
    }


@_atomic
async def create_device(
    conn: AsyncConnection[Any],
    account_id: str,
    body: dict[str, Any],
    rounds: int,
    now: datetime,
    *,
    actor: str = SYSTEM,
) -> tuple[Row, str]:
    """Create a device and its first ingest token. Returns (device, token plaintext)."""
    site_id = _check_str(body.get("site_id"), "site_id", 64)
    await get_site(conn, account_id, site_id)
    local_id = body.get("local_id")
    if not isinstance(local_id, str) or not LOCAL_ID.match(local_id):
        raise ApiError(
            "invalid_request",
            "local_id must be 1-64 characters of letters, digits, '_', '.', '-' (e.g. fridge01)",
        )
    name = _check_str(body.get("name", local_id), "name")
    model = _check_str(body.get("model", "diy_esp32"), "model", 64)
    cadence = check_cadence(body.get("cadence_s", 60))
    dev_eui = check_dev_eui(body.get("dev_eui"))
    cur = await conn.execute(
        "SELECT 1 FROM devices WHERE account_id = %s AND local_id = %s AND deleted_at IS NULL",
        (account_id, local_id),
    )
    if await cur.fetchone():
        raise ApiError(
            "conflict", f"a device with local_id {local_id!r} already exists in this account"
        )
    if dev_eui:
        await _dev_eui_free(conn, account_id, dev_eui)
    did = new_id("dev")
    try:
        await conn.execute(
            "INSERT INTO devices (id, account_id, site_id, local_id, name, model, cadence_s,"
            " dev_eui) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
            (did, account_id, site_id, local_id, name, model, cadence, dev_eui),
        )
    except psycopg.errors.UniqueViolation as exc:
        # two concurrent creates passed the checks above: the indexes decide, the
        # loser gets the same clear answer (its transaction rolls back with the raise)
        raise ApiError(
            "conflict", "a device with this local_id or dev_eui already exists in this account"
        ) from exc
    await conn.execute(
        "INSERT INTO device_placements (device_id, site_id, effective_from) VALUES (%s, %s, %s)",
        (did, site_id, now),
    )
    await audit.record(
        conn,
        account_id=account_id,
        actor=actor,
        action="device.create",
        subject=did,
        data={
            "site_id": site_id,
            "local_id": local_id,
            "name": name,
            "model": model,
            "cadence_s": cadence,
            "dev_eui": dev_eui,
        },
    )
    _, plaintext = await create_token(
        conn, account_id, "ds_live", rounds, local_id, did, actor=actor
    )
    row = await _device_row(conn, account_id, did)
    return await device_public(conn, row, now), plaintext


async def get_device(
    conn: AsyncConnection[Any], account_id: str, device_id: str, now: datetime
) -> Row:
    return await device_public(conn, await _device_row(conn, account_id, device_id), now)


async def list_devices(
    conn: AsyncConnection[Any],
    account_id: str,
    now: datetime,
    site_id: str | None = None,
    at: datetime | None = None,
) -> list[Row]:
    cur = conn.cursor(row_factory=dict_row)
    if site_id is not None and at is not None:
        # Devices that stood at this site at `at` (history survives moves).
        await cur.execute(
            "SELECT d.* FROM devices d WHERE d.account_id = %s AND %s = ("
            " SELECT p.site_id FROM device_placements p WHERE p.device_id = d.id"
            " AND p.effective_from <= %s ORDER BY p.effective_from DESC LIMIT 1)"
            " ORDER BY d.created_at, d.id",
            (account_id, site_id, at),
        )
    elif site_id is not None:
        await cur.execute(
            "SELECT * FROM devices WHERE account_id = %s AND site_id = %s AND deleted_at IS NULL"
            " ORDER BY created_at, id",
            (account_id, site_id),
        )
    else:
        await cur.execute(
            "SELECT * FROM devices WHERE account_id = %s AND deleted_at IS NULL ORDER BY created_at, id",
            (account_id,),
        )
    return [await device_public(conn, r, now) for r in await cur.fetchall()]


@_atomic
async def patch_device(
    conn: AsyncConnection[Any],
    account_id: str,
    device_id: str,
    body: dict[str, Any],
    now: datetime,
    *,
    actor: str = SYSTEM,
) -> Row:
    row = await _device_row(conn, account_id, device_id)
    sets: dict[str, Any] = {}
    if "name" in body:
        sets["name"] = _check_str(body["name"], "name")
    if "model" in body:
        sets["model"] = _check_str(body["model"], "model", 64)
    if "cadence_s" in body:
        sets["cadence_s"] = check_cadence(body["cadence_s"])
    if "dev_eui" in body:
        sets["dev_eui"] = check_dev_eui(body["dev_eui"])
        if sets["dev_eui"] == row["dev_eui"]:
            del sets["dev_eui"]
        elif sets["dev_eui"] is not None:
            await _dev_eui_free(conn, account_id, sets["dev_eui"], row["id"])
    for k, v in sets.items():
        try:
            async with conn.transaction():
                await conn.execute(f"UPDATE devices SET {k} = %s WHERE id = %s", (v, row["id"]))
        except psycopg.errors.UniqueViolation as exc:  # a concurrent claim of this DevEUI
            raise ApiError(
                "conflict", f"dev_eui {v} is already assigned to a device in this account"
            ) from exc
    if sets:
        await audit.record(
            conn,
            account_id=account_id,
            actor=actor,
            action="device.update",
            subject=row["id"],
            data={k: {"from": row[k], "to": v} for k, v in sets.items()},
        )
    return await get_device(conn, account_id, row["id"], now)


@_atomic
async def rotate_device_token(
    conn: AsyncConnection[Any],
    account_id: str,
    device_id: str,
    rounds: int,
    now: datetime,
    *,
    actor: str = SYSTEM,
) -> tuple[Row, str]:
    """Revoke the device's live tokens and issue a new one; the old one fails next time."""
    row = await _device_row(conn, account_id, device_id)
    cur = await conn.execute(
        "UPDATE tokens SET revoked_at = %s WHERE device_id = %s AND revoked_at IS NULL RETURNING id",
        (now, row["id"]),
    )
    revoked = sorted(r[0] for r in await cur.fetchall())
    tid, plaintext = await create_token(
        conn,
        account_id,
        "ds_live",
        rounds,
        row["local_id"],
        row["id"],
        actor=actor,
        action="token.rotate",
    )
    await audit.record(
        conn,
        account_id=account_id,
        actor=actor,
        action="device.rotate_token",
        subject=row["id"],
        data={"revoked": revoked, "new_token": tid},
    )
    return await device_public(conn, row, now), plaintext


@_atomic
async def move_device(
    conn: AsyncConnection[Any],
    account_id: str,
    device_id: str,
    site_id: Any,
    effective_at: datetime,
    now: datetime,
    *,
    actor: str = SYSTEM,
) -> Row:
    row = await _device_row(conn, account_id, device_id)
    site = await get_site(conn, account_id, _check_str(site_id, "site_id", 64))
    if effective_at > now + timedelta(minutes=5):
        raise ApiError("invalid_range", "effective_at may not be in the future")
    cur = await conn.execute(
        "SELECT max(effective_from) FROM device_placements WHERE device_id = %s", (row["id"],)
    )
    last = (await cur.fetchone() or [None])[0]
    if last is not None and effective_at <= last:
        raise ApiError(
            "invalid_range",
            f"effective_at must be after the device's last move ({last.isoformat()}); history is never rewritten",
        )
    await conn.execute(
        "INSERT INTO device_placements (device_id, site_id, effective_from) VALUES (%s, %s, %s)",
        (row["id"], site["id"], effective_at),
    )
    await conn.execute("UPDATE devices SET site_id = %s WHERE id = %s", (site["id"], row["id"]))
    # at commit, every process's MQTT side reads the device again (mqtt/ctx.py): a live
    # session, or the external consumer's cache, holds the old site's vertical
    await conn.execute("SELECT pg_notify('opensense_channels_changed', %s)", (row["id"],))
    await audit.record(
        conn,
        account_id=account_id,
        actor=actor,
        action="device.move",
        subject=row["id"],
        data={"from": row["site_id"], "to": site["id"], "effective_at": _plain(effective_at)},
    )
    return await get_device(conn, account_id, row["id"], now)


async def placements(conn: AsyncConnection[Any], account_id: str, device_id: str) -> list[Row]:
    row = await _device_row(conn, account_id, device_id)
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(
        "SELECT site_id, effective_from FROM device_placements WHERE device_id = %s ORDER BY effective_from",
        (row["id"],),
    )
    return list(await cur.fetchall())


@_atomic
async def delete_device(
    conn: AsyncConnection[Any],
    account_id: str,
    device_id: str,
    now: datetime,
    *,
    actor: str = SYSTEM,
) -> None:
    """Revoke the token and retire the device; its measurements stay."""
    row = await _device_row(conn, account_id, device_id)
    await conn.execute("UPDATE devices SET deleted_at = %s WHERE id = %s", (now, row["id"]))
    cur = await conn.execute(
        "UPDATE tokens SET revoked_at = %s WHERE device_id = %s AND revoked_at IS NULL RETURNING id",
        (now, row["id"]),
    )
    revoked = sorted(r[0] for r in await cur.fetchall())
    await audit.record(
        conn,
        account_id=account_id,
        actor=actor,
        action="device.delete",
        subject=row["id"],
        data={"local_id": row["local_id"], "revoked_tokens": revoked, "at": _plain(now)},
    )


# --- channels ---------------------------------------------------------------------

CHANNEL_SELECT = (
    "SELECT c.*, coalesce((SELECT jsonb_agg(jsonb_build_object('id', r.id, 'kind', r.kind,"
    " 'params', r.params, 'grace_min', r.grace_min, 'severity', r.severity, 'enabled', r.enabled)"
    " ORDER BY r.created_at) FROM rules r WHERE r.channel_id = c.id), '[]'::jsonb) AS rules"
    " FROM channels c"
)


def channel_public(row: Row) -> Row:
    return {
        "id": row["id"],
        "sensor_id": row["sensor_id"],
        "device_id": row["device_id"],
        "kind": row["kind"],
        "label": row["label"],
        "unit": row["unit"],
        "name": row["name"],
        "offset": row["offset"],
        "auxiliary": KINDS[row["kind"]].auxiliary if row["kind"] in KINDS else False,
        "rules": row["rules"],
        "created_at": row["created_at"],
    }


async def channel_row(conn: AsyncConnection[Any], account_id: str, channel_id: str) -> Row:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(
        CHANNEL_SELECT + " WHERE c.account_id = %s AND (c.id = %s OR c.sensor_id = %s)",
        (account_id, channel_id, channel_id),
    )
    row = await cur.fetchone()
    if row is None:
        code = "sensor_not_found" if channel_id.startswith("snr_") else "channel_not_found"
        raise ApiError(code, f"no channel or sensor {channel_id[:40]!r} in this account")
    return row


async def list_channels(
    conn: AsyncConnection[Any], account_id: str, device_id: str | None = None
) -> list[Row]:
    cur = conn.cursor(row_factory=dict_row)
    if device_id:
        dev = await _device_row(conn, account_id, device_id)
        await cur.execute(
            CHANNEL_SELECT + " WHERE c.account_id = %s AND c.device_id = %s"
            " ORDER BY c.created_at, c.id",
            (account_id, dev["id"]),
        )
    else:
        await cur.execute(
            CHANNEL_SELECT + " WHERE c.account_id = %s ORDER BY c.created_at, c.id", (account_id,)
        )
    return [channel_public(r) for r in await cur.fetchall()]


def _num(body: dict[str, Any], key: str) -> float:
    v = body[key]
    try:
        f = float(v) if isinstance(v, int | float) and not isinstance(v, bool) else math.nan
    except OverflowError:  # an integer literal too large for a float
        f = math.inf
    if not math.isfinite(f):
        raise ApiError("invalid_request", f"{key} must be a finite number")
    return f


@_atomic
async def patch_channel(
    conn: AsyncConnection[Any],
    account_id: str,
    channel_id: str,
    body: dict[str, Any],
    now: datetime,
    *,
    actor: str = SYSTEM,
) -> Row:
    """Name, calibration offset and the default range rule's thresholds."""
    row = await channel_row(conn, account_id, channel_id)
    changes: dict[str, Any] = {}
    if "name" in body:
        changes["name"] = {"from": row["name"], "to": body["name"]}
        await conn.execute(
            "UPDATE channels SET name = %s WHERE id = %s",
            (_check_str(body["name"], "name"), row["id"]),
        )
    if "offset" in body:
        off = _num(body, "offset")
        if abs(off) > 50:
            raise ApiError("invalid_range", "offset must be within ±50 (a calibration correction)")
        await conn.execute('UPDATE channels SET "offset" = %s WHERE id = %s', (off, row["id"]))
        changes["offset"] = {"from": row["offset"], "to": off}
        await conn.execute(
            'INSERT INTO channel_offsets (channel_id, "offset", effective_from) VALUES (%s, %s, %s)'
            ' ON CONFLICT (channel_id, effective_from) DO UPDATE SET "offset" = excluded."offset"',
            (row["id"], off, now),
        )
        # at commit, every process's MQTT side reads the device's channels again
        # (mqtt/ctx.py): a live session must not go on adding the old offset
        await conn.execute(
            "SELECT pg_notify('opensense_channels_changed', %s)", (row["device_id"],)
        )
    if any(k in body for k in ("ok_min", "ok_max", "grace_min")):
        cur = conn.cursor(row_factory=dict_row)
        await cur.execute(
            "SELECT * FROM rules WHERE channel_id = %s AND kind = 'range' ORDER BY is_default DESC, created_at LIMIT 1",
            (row["id"],),
        )
        rule = await cur.fetchone()
        params = dict(rule["params"]) if rule else {}
        grace = rule["grace_min"] if rule else 0
        for k in ("ok_min", "ok_max"):
            if k in body:
                params[k] = None if body[k] is None else _num(body, k)
        if "grace_min" in body:
            g = body["grace_min"]
            if isinstance(g, bool) or not isinstance(g, int) or not 0 <= g <= 10080:
                raise ApiError(
                    "invalid_request", "grace_min must be an integer from 0 to 10080 minutes"
                )
            grace = g
        lo, hi = params.get("ok_min"), params.get("ok_max")
        if lo is not None and hi is not None and lo > hi:
            raise ApiError("invalid_range", f"ok_min {lo:g} is above ok_max {hi:g}")
        rule_id = rule["id"] if rule else new_id("rul")
        if rule:
            await conn.execute(
                "UPDATE rules SET params = %s, grace_min = %s WHERE id = %s",
                (Jsonb(params), grace, rule["id"]),
            )
        else:
            await conn.execute(
                "INSERT INTO rules (id, channel_id, kind, params, grace_min) VALUES (%s, %s, 'range', %s, %s)",
                (rule_id, row["id"], Jsonb(params), grace),
            )
        changes["rule"] = {
            "id": rule_id,
            "from": {"params": rule["params"], "grace_min": rule["grace_min"]} if rule else None,
            "to": {"params": params, "grace_min": grace},
        }
    if changes:
        await audit.record(
            conn,
            account_id=account_id,
            actor=actor,
            action="channel.update",
            subject=row["id"],
            data=changes,
            at=now,  # the server's clock, as the rule routes' rows (the limits' history)
        )
    return channel_public(await channel_row(conn, account_id, row["id"]))
