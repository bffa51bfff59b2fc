"""The account export: a ZIP with a CSV and a JSON file of each thing the account owns
(docs/dashboard.md, "Export"), streamed to the browser as it is read.

Memory stays bounded whatever the account's size: rows come through server-side
cursors a few hundred at a time, the ZIP is written to a sink that is drained to the
response after every batch (zipfile writes to a stream that cannot seek, with data
descriptors), and packed days of readings are decoded one at a time. Everything is
read in one REPEATABLE READ, READ ONLY transaction: the files agree with each other.
Secrets are left out (token hashes, webhook signing secrets, confirmation tokens)."""

from __future__ import annotations

import csv
import io
import json
import zipfile
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from aiohttp import web
from psycopg import AsyncConnection

from ..storage import packing
from ..storage.write import from_us

BATCH = 500  # rows between drains of the ZIP sink into the response
PACKED_ITERSIZE = 4  # packed days (compressed blobs) held at once


@dataclass(frozen=True)
class Section:
    """One file pair, `<name>.csv` and `<name>.json`: a query of the account's rows
    (`%(a)s` is the account id), ordered so two exports of the same data are equal."""

    name: str
    sql: str


# What the export holds, as data. Tables with secrets list their columns; the others
# take every column, so a column a later migration adds is exported too.
SECTIONS = (
    Section("account", "SELECT id, name, email, created_at FROM accounts WHERE id = %(a)s"),
    Section(
        "users",
        "SELECT id, email, role, created_at FROM users WHERE account_id = %(a)s"
        " ORDER BY created_at, id",
    ),
    Section("sites", "SELECT * FROM sites WHERE account_id = %(a)s ORDER BY created_at, id"),
    Section(
        "devices",
        "SELECT id, site_id, local_id, name, model, fw_version, dev_eui, cadence_s, last_seen_at,"
        " info, created_at, deleted_at FROM devices WHERE account_id = %(a)s"
        " ORDER BY created_at, id",
    ),
    Section(
        "device_placements",
        "SELECT p.* FROM device_placements p JOIN devices d ON d.id = p.device_id"
        " WHERE d.account_id = %(a)s ORDER BY p.device_id, p.effective_from",
    ),
    Section("channels", "SELECT * FROM channels WHERE account_id = %(a)s ORDER BY created_at, id"),
    Section(
        "channel_offsets",
        "SELECT o.* FROM channel_offsets o JOIN channels c ON c.id = o.channel_id"
        " WHERE c.account_id = %(a)s ORDER BY o.channel_id, o.effective_from",
    ),
    Section(
        "rules",
        "SELECT r.* FROM rules r JOIN channels c ON c.id = r.channel_id"
        " WHERE c.account_id = %(a)s ORDER BY r.created_at, r.id",
    ),
    Section("events", "SELECT * FROM events WHERE account_id = %(a)s ORDER BY started_at, id"),
    Section(
        "recipients",
        "SELECT id, site_id, path, address, name, roles, verified, created_at, deleted_at"
        " FROM notify_targets WHERE account_id = %(a)s ORDER BY created_at, id",
    ),
    Section(
        "escalation_policies",
        "SELECT e.* FROM escalation_policies e JOIN sites s ON s.id = e.site_id"
        " WHERE s.account_id = %(a)s ORDER BY e.site_id",
    ),
    Section("silences", "SELECT * FROM silences WHERE account_id = %(a)s ORDER BY starts_at, id"),
    Section("outbound_log", "SELECT * FROM outbound_log WHERE account_id = %(a)s ORDER BY at, id"),
    Section(
        "tokens",
        "SELECT id, kind, name, device_id, created_at, last_used_at, revoked_at"
        " FROM tokens WHERE account_id = %(a)s ORDER BY created_at, id",
    ),
    Section(
        "audit_trail",
        "SELECT id, seq, at, actor, action, subject, data, correction_of,"
        " encode(prev_hash, 'hex') AS prev_hash, encode(hash, 'hex') AS hash"
        " FROM audit_log WHERE account_id = %(a)s ORDER BY seq, id",
    ),
)
READINGS_COLUMNS = ("channel_id", "ts", "value")


class Sink:
    """Where zipfile writes: bytes kept until `take` hands them to the response."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def write(self, b: bytes) -> int:
        self.chunks.append(bytes(b))
        return len(b)

    def flush(self) -> None:
        return None

    def close(self) -> None:
        return None

    def take(self) -> bytes:
        out = b"".join(self.chunks)
        self.chunks.clear()
        return out


def plain(v: Any) -> Any:
    """A value as JSON holds it."""
    if isinstance(v, datetime | date):
        return v.isoformat()
    if isinstance(v, bytes | memoryview):
        return bytes(v).hex()
    return v


def cell(v: Any) -> str:
    """A value as a CSV cell: objects and lists as JSON, none as empty."""
    v = plain(v)
    if v is None:
        return ""
    if isinstance(v, dict | list):
        return json.dumps(v, ensure_ascii=False, sort_keys=True)
    return str(v)


# a fresh iteration of a file's rows; the first item is the column names
Rows = Callable[[], AsyncIterator[Sequence[Any]]]


async def write_file(
    zf: zipfile.ZipFile,
    sink: Sink,
    resp: web.StreamResponse,
    name: str,
    rows: Rows,
    as_json: bool,
) -> None:
    """One file of the ZIP, from `rows`, drained into the response every BATCH rows."""
    it = rows()
    columns = [str(c) for c in await anext(it)]
    with zf.open(name, "w", force_zip64=True) as f:
        buf = io.StringIO()
        out = csv.writer(buf, lineterminator="\n")
        if as_json:
            buf.write("[")
        else:
            out.writerow(columns)
        n = 0
        async for r in it:
            if as_json:
                obj = {c: plain(v) for c, v in zip(columns, r, strict=True)}
                buf.write(("\n" if n == 0 else ",\n") + json.dumps(obj, ensure_ascii=False))
            else:
                out.writerow([cell(v) for v in r])
            n += 1
            if n % BATCH == 0:
                f.write(buf.getvalue().encode())
                buf.seek(0)
                buf.truncate()
                await resp.write(sink.take())
        if as_json:
            buf.write("\n]\n")
        f.write(buf.getvalue().encode())
    await resp.write(sink.take())


def section_rows(conn: AsyncConnection[Any], s: Section, account_id: str) -> Rows:
    async def rows() -> AsyncIterator[Sequence[Any]]:
        async with conn.cursor(name=f"export_{s.name}") as cur:
            await cur.execute(s.sql, {"a": account_id})
            yield [d.name for d in cur.description or ()]
            async for r in cur:
                yield r

    return rows


def reading_rows(conn: AsyncConnection[Any], channels: list[tuple[str, int]]) -> Rows:
    """Each channel's readings: its packed days (decoded one at a time), then its raw
    rows (a day is in one place or the other, never both: storage/compaction.py)."""

    async def rows() -> AsyncIterator[Sequence[Any]]:
        yield READINGS_COLUMNS
        for cid, num in channels:
            async with conn.cursor(name="export_packed") as cur:
                cur.itersize = PACKED_ITERSIZE
                await cur.execute(
                    "SELECT blob FROM measurements_packed WHERE channel_num = %s ORDER BY day",
                    (num,),
                )
                async for (blob,) in cur:
                    ts, values = packing.unpack(bytes(blob))
                    for t, v in zip(ts, values, strict=True):
                        yield cid, from_us(t), v
            async with conn.cursor(name="export_raw") as cur:
                await cur.execute(
                    "SELECT ts, value FROM measurements WHERE channel_num = %s ORDER BY ts",
                    (num,),
                )
                async for ts, v in cur:
                    yield cid, ts, v

    return rows


async def stream(conn: AsyncConnection[Any], account_id: str, resp: web.StreamResponse) -> None:
    """Write the account's ZIP into the prepared response."""
    sink = Sink()
    async with conn.transaction():
        await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for s in SECTIONS:
                for ext in ("csv", "json"):
                    rows = section_rows(conn, s, account_id)
                    await write_file(zf, sink, resp, f"{s.name}.{ext}", rows, ext == "json")
            cur = await conn.execute(
                "SELECT id, num FROM channels WHERE account_id = %s ORDER BY created_at, id",
                (account_id,),
            )
            channels = [(r[0], r[1]) for r in await cur.fetchall()]
            for ext in ("csv", "json"):
                await write_file(
                    zf,
                    sink,
                    resp,
                    f"readings.{ext}",
                    reading_rows(conn, channels),
                    ext == "json",
                )
        await resp.write(sink.take())
