"""The SQL of sealed reports (table report_seals, migration 0021): what a sealed PDF
printed, written with its audit row, and read back to re-render it or to confirm a
hash on the public verification page."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from psycopg import AsyncConnection

CODE_RE = re.compile(r"^[a-z2-7]{16}$")  # a short link's code (reports/verify.py new_code)
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")

COLUMNS = (
    "code, link, account_id, site_id, site_name, template, period_from, period_to, language,"
    " rendered_at, checkpoint, sha256, audit_id"
)


@dataclass(frozen=True)
class SealRow:
    code: str
    link: str  # as printed (OPENSENSE_PUBLIC_URL may change later)
    account_id: str
    site_id: str
    site_name: str
    template: str
    period_from: date
    period_to: date
    language: str
    rendered_at: datetime
    checkpoint: str
    sha256: str
    audit_id: int


async def insert(conn: AsyncConnection[Any], row: SealRow) -> None:
    await conn.execute(
        f"INSERT INTO report_seals ({COLUMNS}) VALUES"
        " (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (
            row.code,
            row.link,
            row.account_id,
            row.site_id,
            row.site_name,
            row.template,
            row.period_from,
            row.period_to,
            row.language,
            row.rendered_at,
            row.checkpoint,
            row.sha256,
            row.audit_id,
        ),
    )


async def by_code(conn: AsyncConnection[Any], code: str) -> SealRow | None:
    cur = await conn.execute(f"SELECT {COLUMNS} FROM report_seals WHERE code = %s", (code,))
    r = await cur.fetchone()
    return SealRow(*r) if r is not None else None


async def by_sha256(conn: AsyncConnection[Any], sha256: str) -> SealRow | None:
    cur = await conn.execute(f"SELECT {COLUMNS} FROM report_seals WHERE sha256 = %s", (sha256,))
    r = await cur.fetchone()
    return SealRow(*r) if r is not None else None
