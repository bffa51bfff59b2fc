"""The LoRaWAN tray (`unassigned_uplinks`) and exact dedupe of uplinks (`lorawan_seen`).

The tray holds what an operator must look at, because nobody reads a network's
webhook log: uplinks from a DevEUI no device claims (`unassigned`), uplinks the door
refused (`refused`) or used in part (`partial`), and console-simulated ones
(`simulated`, never a reading). An unassigned uplink is assigned to a device (its
readings replayed, exactly once) or discarded; every other row is discarded once
read. Each assignment and discard is in the audit trail.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from .. import audit
from ..errors import ApiError
from . import lorawan, pipeline

OPEN_STATES = ("unassigned", "refused", "partial", "simulated")
STATES = (*OPEN_STATES, "assigned", "discarded")
MAX_LIST = 500
# uplinks replayed by one assign: bounds its transaction's time; the rest stay
# unassigned and the answer says how many (assign again to continue)
MAX_REPLAY = 500
Row = dict[str, Any]


async def file(
    conn: AsyncConnection[Any],
    account_id: str,
    *,
    dev_eui: str | None,
    network: str | None,
    key: str | None,
    state: str,
    reason: str | None,
    device_id: str | None,
    payload: Any,
    now: datetime,
) -> int | None:
    """Put an uplink in the tray; None when the same uplink (network identity) is
    already there in this state (a re-delivery is filed once)."""
    assert state in OPEN_STATES, state
    cur = await conn.execute(
        "INSERT INTO unassigned_uplinks (account_id, dev_eui, received_at, payload, network,"
        " uplink_key, state, reason, device_id) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
        " ON CONFLICT (account_id, uplink_key, state)"
        " WHERE uplink_key IS NOT NULL AND state IN ('unassigned', 'simulated') DO NOTHING"
        " RETURNING id",
        (
            account_id,
            dev_eui or "",
            now,
            Jsonb(payload),
            network,
            key,
            state,
            reason[:500] if reason else None,
            device_id,
        ),
    )
    row = await cur.fetchone()
    return int(row[0]) if row else None


async def claim_key(
    conn: AsyncConnection[Any], account_id: str, key: str | None, device_id: str, now: datetime
) -> bool:
    """Record that this uplink's readings are being stored; False if they were already
    (the network delivered it again). Commits or rolls back with the readings."""
    if key is None:
        return True
    cur = await conn.execute(
        "INSERT INTO lorawan_seen (account_id, uplink_key, device_id, received_at)"
        " VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING RETURNING 1",
        (account_id, key, device_id, now),
    )
    return await cur.fetchone() is not None


def public(r: Row) -> Row:
    return {
        "id": r["id"],
        "dev_eui": r["dev_eui"] or None,
        "network": r["network"],
        "state": r["state"],
        "reason": r["reason"],
        "device_id": r["device_id"],
        "received_at": r["received_at"],
        "uplink_key": r["uplink_key"],
        "resolved_at": r["resolved_at"],
        "resolved_by": r["resolved_by"],
        "payload": r["payload"],
    }


async def list_tray(
    conn: AsyncConnection[Any],
    account_id: str,
    *,
    state: str | None = None,
    dev_eui: str | None = None,
    limit: int = 100,
) -> list[Row]:
    """Open rows (or one state's), oldest first."""
    if state is not None and state not in STATES:
        raise ApiError("invalid_request", f"state must be one of {', '.join(STATES)}")
    if not 1 <= limit <= MAX_LIST:
        raise ApiError("invalid_request", f"limit must be 1 to {MAX_LIST}")
    where = ["account_id = %s"]
    args: list[Any] = [account_id]
    if state is None:
        where.append("resolved_at IS NULL")
    else:
        where.append("state = %s")
        args.append(state)
    if dev_eui is not None:
        where.append("dev_eui = %s")
        args.append(dev_eui.upper())
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(
        f"SELECT * FROM unassigned_uplinks WHERE {' AND '.join(where)} ORDER BY id LIMIT %s",  # noqa: S608 (fixed fragments)
        (*args, limit),
    )
    return [public(r) for r in await cur.fetchall()]


def _id(uplink_id: Any) -> int:
    try:
        v = int(str(uplink_id))
    except ValueError:
        v = -1
    if not 0 < v < 2**63:
        raise ApiError("uplink_not_found", f"no uplink {str(uplink_id)[:40]!r} in this account")
    return v


async def _row(conn: AsyncConnection[Any], account_id: str, uplink_id: Any) -> Row:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(
        "SELECT * FROM unassigned_uplinks WHERE account_id = %s AND id = %s FOR UPDATE",
        (account_id, _id(uplink_id)),
    )
    row = await cur.fetchone()
    if row is None:
        raise ApiError("uplink_not_found", f"no uplink {str(uplink_id)[:40]!r} in this account")
    return row


def _resolved(row: Row) -> ApiError:
    return ApiError(
        "conflict",
        f"uplink {row['id']} was {row['state']} already"
        + (f" to {row['device_id']}" if row["state"] == "assigned" else "")
        + (f" at {row['resolved_at'].isoformat()}" if row["resolved_at"] else ""),
    )


async def discard(
    conn: AsyncConnection[Any], account_id: str, uplink_id: Any, now: datetime, *, actor: str
) -> Row:
    async with conn.transaction():
        row = await _row(conn, account_id, uplink_id)
        if row["resolved_at"] is not None:
            raise _resolved(row)
        await conn.execute(
            "UPDATE unassigned_uplinks SET state = 'discarded', resolved_at = %s, resolved_by = %s"
            " WHERE id = %s",
            (now, actor, row["id"]),
        )
        await audit.record(
            conn,
            account_id=account_id,
            actor=actor,
            action="lorawan.discard",
            subject=str(row["id"]),
            data={"dev_eui": row["dev_eui"] or None, "state": row["state"]},
            at=now,
        )
        row.update(state="discarded", resolved_at=now, resolved_by=actor)
        return public(row)


async def assign(
    conn: AsyncConnection[Any],
    account_id: str,
    uplink_id: Any,
    device_id: Any,
    *,
    now: datetime,
    oldest: datetime,
    compact_after_days: int,
    actor: str,
) -> Row:
    """Give an unassigned uplink's DevEUI to a device and replay every unassigned
    uplink of that DevEUI into readings, once: each row is locked and marked in the
    same transaction as its readings, and each uplink's network identity is claimed
    in lorawan_seen (a later re-delivery is then a duplicate). A device without a
    DevEUI takes this one; a device with another one is refused."""
    if not isinstance(device_id, str) or not 0 < len(device_id) <= 64:
        raise ApiError("invalid_request", "device_id must be a dev_ id or local_id")
    async with conn.transaction():
        row = await _row(conn, account_id, uplink_id)
        if row["state"] != "unassigned":
            if row["resolved_at"] is not None:
                raise _resolved(row)
            raise ApiError(
                "conflict",
                f"uplink {row['id']} is {row['state']}, not unassigned: only an uplink from an "
                "unknown DevEUI can be assigned (discard this one once read)",
            )
        eui = row["dev_eui"]
        cur = conn.cursor(row_factory=dict_row)
        await cur.execute(
            "SELECT d.id, d.local_id, d.dev_eui, s.vertical FROM devices d"
            " JOIN sites s ON s.id = d.site_id WHERE d.account_id = %s AND d.deleted_at IS NULL"
            " AND (d.id = %s OR d.local_id = %s) FOR UPDATE OF d",
            (account_id, device_id, device_id),
        )
        d = await cur.fetchone()
        if d is None:
            raise ApiError("device_not_found", f"no device {device_id[:64]!r} in this account")
        if d["dev_eui"] is None:
            await cur.execute(
                "SELECT id FROM devices WHERE account_id = %s AND dev_eui = %s"
                " AND deleted_at IS NULL",
                (account_id, eui),
            )
            other = await cur.fetchone()
            if other is not None:
                raise ApiError(
                    "conflict",
                    f"dev_eui {eui} is already assigned to {other['id']} in this account",
                )
            await conn.execute("UPDATE devices SET dev_eui = %s WHERE id = %s", (eui, d["id"]))
        elif d["dev_eui"] != eui:
            raise ApiError(
                "conflict",
                f"device {d['id']} has dev_eui {d['dev_eui']}; this uplink came from {eui}: "
                "change the device's dev_eui first (PATCH /v1/devices/{id})",
            )
        dev = pipeline.Device(d["id"], account_id, d["local_id"], d["vertical"])
        await cur.execute(
            "SELECT * FROM unassigned_uplinks WHERE account_id = %s AND dev_eui = %s"
            " AND state = 'unassigned' ORDER BY id LIMIT %s FOR UPDATE",
            (account_id, eui, MAX_REPLAY),
        )
        results = []
        total = 0
        for r in await cur.fetchall():
            results.append(await _replay(conn, dev, r, now, oldest, compact_after_days, actor))
            total += results[-1]["accepted"]
        await audit.record(
            conn,
            account_id=account_id,
            actor=actor,
            action="lorawan.assign",
            subject=d["id"],
            data={
                "dev_eui": eui,
                "dev_eui_set": d["dev_eui"] is None,
                "uplinks": [x["id"] for x in results],
                "accepted": total,
            },
            at=now,
        )
        await cur.execute(
            "SELECT count(*) AS n FROM unassigned_uplinks WHERE account_id = %s AND dev_eui = %s"
            " AND state = 'unassigned'",
            (account_id, eui),
        )
        left = await cur.fetchone()
        return {
            "device_id": d["id"],
            "dev_eui": eui,
            "accepted": total,
            "uplinks": results,
            "remaining": int(left["n"]) if left else 0,
        }


async def _replay(
    conn: AsyncConnection[Any],
    dev: pipeline.Device,
    r: Row,
    now: datetime,
    oldest: datetime,
    compact_after_days: int,
    actor: str,
) -> Row:
    state, reason, accepted, dedup = "assigned", None, 0, 0
    try:
        # the reading's time is the network's, or when we received the uplink
        got = lorawan.parse(
            r["payload"], "up" if r["network"] == "chirpstack" else None, r["received_at"], oldest
        )
        if isinstance(got, lorawan.Ignored):  # cannot be filed so; kept for safety
            raise ApiError("invalid_measurement", f"not an uplink ({got.event})")
        async with conn.transaction():  # the claim and the readings, or neither
            if await claim_key(conn, dev.account_id, got.key, dev.id, now):
                ans = await pipeline.store(
                    conn, dev, got.entries, now=now, compact_after_days=compact_after_days
                )
                accepted, dedup = ans["accepted"], ans["deduplicated"]
            else:
                dedup = len(got.entries)
    except ApiError as exc:
        state, reason = "refused", f"{exc.code}: {exc.message}"
    await conn.execute(
        "UPDATE unassigned_uplinks SET state = %s, reason = coalesce(%s, reason), device_id = %s,"
        " resolved_at = CASE WHEN %s = 'assigned' THEN %s::timestamptz END, resolved_by = %s"
        " WHERE id = %s",
        (state, reason, dev.id, state, now, actor, r["id"]),
    )
    return {
        "id": r["id"],
        "state": state,
        "accepted": accepted,
        "deduplicated": dedup,
        "reason": reason,
    }
