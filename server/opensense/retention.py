"""Retention of every data class in the product's table (docs/product.md#retention),
declared once as data. docs/storage.md lists each class (a test holds it to this
table); a setting's minimum is the product's, so shortening is refused at start.

Kinds of rule:
- `partitions`: whole monthly partitions dropped by storage.compaction
- `rows`: DELETE of rows older than N days by a time column; a table that does not
  exist (yet: e.g. outbound_log before the alarms migration) is skipped, not an error
- `backups`: rotation of the dump files (backup.rotation)
- `forever`: never deleted
- `not_stored`: nothing kept to delete
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from psycopg import AsyncConnection, sql

from .settings import SETTINGS, Config
from .storage.compaction import enforce_retention


@dataclass(frozen=True)
class DataClass:
    name: str  # as the product's table names it
    rule: str  # partitions | rows | backups | forever | not_stored
    default: str  # the product's words
    setting: str | None = None  # Config field holding the period
    table: str | None = None  # rows: the table
    column: str | None = None  # rows: its time column
    promised_minimum: int | None = None  # the product's minimum in the setting's unit


RETENTION: tuple[DataClass, ...] = (
    DataClass(
        "Raw measurements", "partitions", "13 months", "retention_raw_months", promised_minimum=13
    ),
    DataClass(
        "5-minute rollups", "partitions", "5 years", "retention_rollup_months", promised_minimum=60
    ),
    DataClass(
        "1-hour rollups", "partitions", "5 years", "retention_rollup_months", promised_minimum=60
    ),
    DataClass("1-day rollups", "forever", "forever"),
    DataClass("Alert events", "forever", "forever"),
    DataClass("Audit trail", "forever", "forever (append-only)"),
    DataClass("PDF reports rendered", "not_stored", "regenerated on demand"),
    DataClass(
        "API request logs",
        "rows",
        "30 days",
        "retention_request_log_days",
        "request_log",
        "ts",
        promised_minimum=30,
    ),
    DataClass(
        "Outbound notification logs",
        "rows",
        "90 days",
        "retention_outbound_log_days",
        "outbound_log",
        "at",
        promised_minimum=90,
    ),
    # a network re-delivers an uplink within minutes or hours; readings carry the
    # network's time, so an older re-delivery is still deduplicated by (channel, ts)
    DataClass(
        "LoRaWAN uplink identities",
        "rows",
        "30 days",
        "retention_request_log_days",
        "lorawan_seen",
        "received_at",
        promised_minimum=30,
    ),
    DataClass("LoRaWAN tray", "forever", "forever (assigned and discarded rows are kept)"),
    DataClass("Hourly backups", "backups", "7 days", "backup_keep_hourly_days", promised_minimum=7),
    DataClass("Daily backups", "backups", "30 days", "backup_keep_daily_days", promised_minimum=30),
)


def check_minimums() -> None:
    """Every class with a setting refuses values below the product's minimum."""
    by_name = {s.name: s for s in SETTINGS}
    for c in RETENTION:
        if c.setting is not None:
            s = by_name[c.setting]
            assert s.minimum is not None and s.minimum >= (c.promised_minimum or 0), c.name


check_minimums()


async def run(conn: AsyncConnection[Any], cfg: Config, now: datetime) -> str:
    """Apply every `partitions` and `rows` class. Backups rotate with each backup run."""
    dropped = await enforce_retention(
        conn, now, cfg.retention_raw_months, cfg.retention_rollup_months
    )
    parts = [f"dropped {len(dropped)} partitions"]
    for c in RETENTION:
        if c.rule != "rows":
            continue
        assert c.table and c.column and c.setting
        cur = await conn.execute("SELECT to_regclass(%s) IS NOT NULL", (c.table,))
        present = await cur.fetchone()
        if not (present and present[0]):
            parts.append(f"{c.table}: absent, skipped")
            continue
        days = getattr(cfg, c.setting)
        cur = await conn.execute(
            sql.SQL("DELETE FROM {} WHERE {} < %s").format(
                sql.Identifier(c.table), sql.Identifier(c.column)
            ),
            (now - timedelta(days=days),),
        )
        parts.append(f"{cur.rowcount} {c.table} rows")
    return ", ".join(parts)
