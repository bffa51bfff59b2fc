"""Retention for every class of the product's table (docs/product.md#retention): declared as data, documented, never
configurable below the product's minimum, applied by the `retention` job (tolerating an
outbound_log table that another migration has not made yet)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from opensense import retention
from opensense.settings import SETTINGS, Config
from tests.fixtures.database import owner_of

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("cls", retention.RETENTION, ids=lambda c: c.name)
def test_every_class_is_documented(cls: retention.DataClass) -> None:
    text = (ROOT / "docs" / "storage.md").read_text()
    row = next((line for line in text.splitlines() if line.startswith(f"| {cls.name} |")), None)
    assert row is not None, cls.name
    if cls.setting:
        env = next(s.env for s in SETTINGS if s.name == cls.setting)
        assert f"`{env}`" in row


@pytest.mark.parametrize("cls", [c for c in retention.RETENTION if c.setting], ids=lambda c: c.name)
def test_shorter_than_the_promised_minimum_is_refused(cls: retention.DataClass) -> None:
    setting = next(s for s in SETTINGS if s.name == cls.setting)
    assert cls.promised_minimum is not None
    with pytest.raises(ValueError, match="below the minimum"):
        Config.from_env({setting.env: str(cls.promised_minimum - 1)})
    Config.from_env({setting.env: str(cls.promised_minimum + 1)})  # longer is fine


def _storage_table() -> dict[str, str]:
    """docs/storage.md's retention table: data class -> what is kept. The product's table
    (outside this repository) is copied there, so the check runs on every clone."""
    text = (ROOT / "docs" / "storage.md").read_text()
    table = text.split("## Retention", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in table.splitlines():
        if line.startswith("| ") and not line.startswith("| data class") and "---" not in line:
            cells = [c.strip() for c in line.split("|")[1:-1]]
            rows[cells[0]] = cells[1]
    return rows


def test_every_documented_class_is_declared_with_its_period() -> None:
    rows = _storage_table()
    assert len(rows) >= 10, rows  # the product's nine classes, backups split, the audit trail
    declared = {c.name: c for c in retention.RETENTION}
    assert set(rows) == set(declared)
    for name, kept in rows.items():
        assert kept.startswith(declared[name].default.split(" (")[0]), (name, kept)


CONTRACT_OUTBOUND = """CREATE TABLE IF NOT EXISTS outbound_log (
    id bigserial PRIMARY KEY, account_id text, path text, target text, event_id text NULL,
    kind text, status text, code int NULL, error text NULL,
    attempt int NOT NULL DEFAULT 1, at timestamptz NOT NULL DEFAULT now())"""


@pytest.mark.db
async def test_retention_job_deletes_only_past_retention(new_database: Any, clock: Any) -> None:
    dsn = new_database()
    cfg = Config(clock=clock, mqtt="off")
    now = clock()
    # the table is moved aside as its owner (the app role may not); retention runs as the app
    async with (
        await psycopg.AsyncConnection.connect(owner_of(dsn), autocommit=True) as owner,
        await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn,
    ):
        # a table missing from the schema is skipped, not an error
        await owner.execute("ALTER TABLE outbound_log RENAME TO outbound_log_aside")
        assert "outbound_log: absent, skipped" in await retention.run(conn, cfg, now)
        await owner.execute("ALTER TABLE outbound_log_aside RENAME TO outbound_log")
        await owner.execute(CONTRACT_OUTBOUND)
        for days in (1, 89, 91, 400):
            await conn.execute(
                "INSERT INTO outbound_log (path, target, kind, status, at)"
                " VALUES ('email', 'x@example.invalid', 'alarm', 'ok', %s)",
                (now - timedelta(days=days),),
            )
        for days in (1, 29, 31):
            await conn.execute(
                "INSERT INTO request_log (ts, request_id, method, path, status, duration_ms)"
                " VALUES (%s, 'req_x', 'GET', '/', 200, 1)",
                (now - timedelta(days=days),),
            )
        detail = await retention.run(conn, cfg, now)
        assert "2 outbound_log rows" in detail and "1 request_log rows" in detail
        cur = await conn.execute("SELECT count(*) FROM outbound_log")
        assert (await cur.fetchone()) == (2,)
