"""The audit trail's rows: writing one (`record`) and the bytes each is hashed as.

Row form (what is hashed): canonical_json of
  {"account_id", "seq", "at", "actor", "action", "subject", "data", "correction_of"}
with `at` as RFC 3339 UTC with microseconds ("2026-11-24T02:34:01.123456Z").
Chain:  hash = SHA-256(prev_hash || row form); the first row's prev_hash is 32 zero bytes.
Tree:   the row form is also leaf `seq` of the account's RFC 6962 tree.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from psycopg import AsyncConnection
from psycopg.pq import TransactionStatus
from psycopg.types.json import Jsonb

from .canonical import canonical_json
from .merkle import leaf_hash

ZERO = b"\x00" * 32
LOCK_NAMESPACE = 7262005  # pg_advisory_xact_lock(ns, hashtext(account_id))

COLUMNS = "id, account_id, seq, at, actor, action, subject, data, correction_of, prev_hash, hash"


@dataclass(frozen=True)
class Row:
    id: int
    account_id: str
    seq: int
    at: datetime
    actor: str
    action: str
    subject: str | None
    data: Any
    correction_of: int | None
    prev_hash: bytes
    hash: bytes

    @classmethod
    def from_db(cls, r: tuple[Any, ...]) -> Row:
        return cls(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], bytes(r[9]), bytes(r[10]))

    def form(self) -> bytes:
        return row_form(
            self.account_id,
            self.seq,
            self.at,
            self.actor,
            self.action,
            self.subject,
            self.data,
            self.correction_of,
        )

    def computed_hash(self) -> bytes:
        return chain_hash(self.prev_hash, self.form())

    def leaf(self) -> bytes:
        return leaf_hash(self.form())

    def label(self) -> str:
        return f"row id {self.id} (account {self.account_id}, seq {self.seq}, {self.action} at {iso(self.at)})"


def iso(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def row_form(
    account_id: str,
    seq: int,
    at: datetime,
    actor: str,
    action: str,
    subject: str | None,
    data: Any,
    correction_of: int | None,
) -> bytes:
    return canonical_json(
        {
            "account_id": account_id,
            "seq": seq,
            "at": iso(at),
            "actor": actor,
            "action": action,
            "subject": subject,
            "data": data,
            "correction_of": correction_of,
        }
    )


def chain_hash(prev_hash: bytes, form: bytes) -> bytes:
    return hashlib.sha256(prev_hash + form).digest()


async def record(
    conn: AsyncConnection[Any],
    *,
    account_id: str,
    actor: str,
    action: str,
    subject: str | None,
    data: dict[str, Any],
    correction_of: int | None = None,
    at: datetime | None = None,
) -> Row:
    """Append one row to the account's trail, inside the caller's transaction.

    Two writers for one account are serialized by a transaction-scoped advisory lock,
    so the chain never forks; the row commits or rolls back with the change it records.
    """
    if conn.info.transaction_status != TransactionStatus.INTRANS:
        raise RuntimeError("audit.record runs inside the caller's transaction (conn.transaction())")
    # What jsonb gives back must hash the same as what we hash now.
    data = json.loads(canonical_json(data))
    at = (at or datetime.now(UTC)).astimezone(UTC)
    await conn.execute(
        "SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (LOCK_NAMESPACE, account_id)
    )
    cur = await conn.execute(
        "SELECT seq, hash FROM audit_log WHERE account_id = %s ORDER BY seq DESC LIMIT 1",
        (account_id,),
    )
    head = await cur.fetchone()
    seq, prev = (head[0] + 1, bytes(head[1])) if head else (0, ZERO)
    if correction_of is not None:
        cur = await conn.execute(
            "SELECT 1 FROM audit_log WHERE id = %s AND account_id = %s", (correction_of, account_id)
        )
        if await cur.fetchone() is None:
            raise ValueError(f"correction_of {correction_of}: no such row in account {account_id}")
    form = row_form(account_id, seq, at, actor, action, subject, data, correction_of)
    h = chain_hash(prev, form)
    cur = await conn.execute(
        "INSERT INTO audit_log (account_id, seq, at, actor, action, subject, data, correction_of,"
        " prev_hash, hash) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
        (account_id, seq, at, actor, action, subject, Jsonb(data), correction_of, prev, h),
    )
    row = await cur.fetchone()
    assert row is not None
    return Row(row[0], account_id, seq, at, actor, action, subject, data, correction_of, prev, h)
