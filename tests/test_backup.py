"""Backups: pg_dump streamed through age to a recipient, rotation with an injected
clock, restore into a fresh database row for row, the restore test, and a dump that
cannot be read without the identity."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pyrage
import pytest
from psycopg import sql

from opensense import audit
from opensense.audit.note import Signer, Verifier, generate_key
from opensense.backup import rotation
from opensense.backup.dump import BackupError, dump, restore
from opensense.backup.run import check_restored, restore_test, run_backup
from opensense.settings import Config
from tests.fixtures.clock import FakeClock
from tests.fixtures.database import restore_dsn
from tests.fixtures.server import make_world

# --- rotation (pure) -----------------------------------------------------------------


def _simulate(days: int, start: datetime) -> tuple[list[rotation.Dump], list[rotation.Dump]]:
    """Run the hourly schedule for `days` with an injected clock; the file system is
    two lists."""
    local: list[rotation.Dump] = []
    offsite: list[rotation.Dump] = []
    keep = {"hourly": 7, "daily": 30}
    now = start
    for _ in range(days * 24):
        kind = rotation.kind_for_run(local, now)
        d = rotation.parse(rotation.name_for(now, kind))
        assert d is not None
        local.append(d)
        if rotation.weekly_due(offsite, now):
            w = rotation.parse(rotation.name_for(now, "weekly"))
            assert w is not None
            offsite.append(w)
        for gone in rotation.to_delete(local, now, keep):
            local.remove(gone)
        for gone in rotation.to_delete(offsite, now, {"weekly": 91}):
            offsite.remove(gone)
        now += timedelta(hours=1)
    return local, offsite


def test_rotation_keeps_hourly_7_days_daily_30_weekly_offsite() -> None:
    start = datetime(2026, 1, 1, 0, 30, tzinfo=UTC)
    local, offsite = _simulate(120, start)
    end = start + timedelta(days=120)
    hourly = [d for d in local if d.kind == "hourly"]
    daily = [d for d in local if d.kind == "daily"]
    last = end - timedelta(hours=1)
    assert all(last - d.at <= timedelta(days=7) for d in hourly)  # none older than 7 days
    assert last - min(d.at for d in hourly) == timedelta(days=7)  # and 7 whole days kept
    assert len(hourly) >= 7 * 23  # 23 hourly + 1 daily per day
    assert len(daily) == 30 and all(last - d.at <= timedelta(days=30) for d in daily)
    assert len({d.at.date() for d in daily}) == len(daily)  # one per day
    assert len(offsite) == 13 and all(
        b.at - a.at == timedelta(days=7) for a, b in zip(offsite, offsite[1:], strict=False)
    )


def test_rotation_never_deletes_the_newest_of_a_kind() -> None:
    old = datetime(2025, 1, 1, tzinfo=UTC)
    dumps = [
        rotation.Dump(old, "daily", "a"),
        rotation.Dump(old + timedelta(hours=1), "hourly", "b"),
    ]
    assert rotation.to_delete(dumps, old + timedelta(days=400), {"hourly": 7, "daily": 30}) == []


def test_names_round_trip() -> None:
    at = datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)
    assert rotation.parse(rotation.name_for(at, "daily")) == rotation.Dump(
        at, "daily", "opensense-20260304T050607Z-daily.dump.age"
    )
    assert rotation.parse("opensense-20260304T050607Z-daily.dump") is None


# --- with PostgreSQL -----------------------------------------------------------------


def _identity(path: Path) -> str:
    ident = pyrage.x25519.Identity.generate()
    path.write_text(f"# test identity\n{ident}\n")
    path.chmod(0o600)  # restore refuses an identity others may read
    return str(ident.to_public())


def _signer(state_dir: Path) -> Signer:
    """The installation's signing key, made as `opensense audit keygen` would."""
    return generate_key(state_dir / "audit" / "signing.key", "test.invalid/audit")


def _vkey(signer: Signer) -> Verifier:
    return Verifier.parse(signer.verifier_key())


def _table_dump(dsn: str) -> dict[str, list[str]]:
    """Every row of every table, as text, sorted: for row-for-row comparison."""
    out: dict[str, list[str]] = {}
    with psycopg.connect(dsn) as conn:
        tables = conn.execute(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = 'public' AND c.relkind = 'r' AND c.relpersistence = 'p'"
        ).fetchall()
        for (t,) in tables:
            rows = conn.execute(
                sql.SQL("SELECT t::text FROM {} t").format(sql.Identifier(t))
            ).fetchall()
            out[t] = sorted(r[0] for r in rows)
    return out


async def _populate(dsn: str, clock: FakeClock) -> Any:
    cfg = Config(bcrypt_rounds=4, mqtt="off", clock=clock)
    w = await make_world(dsn, cfg, devices=("fridge01", "fridge02"))
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(
            "INSERT INTO channels (id, sensor_id, account_id, device_id, kind, unit, name)"
            " VALUES ('chn_' || md5(%s), 'snr_' || md5(%s), %s, %s, 'temperature', '°C', 't')",
            (w.account, w.account, w.account, w.device_ids["fridge01"]),
        )
        await conn.execute(
            "INSERT INTO measurements (channel_num, ts, value)"
            " SELECT c.num, %s - g * interval '1 minute', g / 10.0"
            " FROM channels c, generate_series(1, 500) g WHERE c.account_id = %s",
            (clock(), w.account),
        )
        async with conn.transaction():
            await audit.record(
                conn,
                account_id=w.account,
                actor="cli:test",
                action="note",
                subject=None,
                data={"text": 'Grüße, "quoted"', "n": 1.5},
            )
    return w


@pytest.mark.db
async def test_round_trip_restores_every_row_and_the_chain(
    new_database: Any, tmp_path: Path, clock: FakeClock
) -> None:
    src = new_database()
    await _populate(src, clock)
    # a few readings through the real ingest path's tables
    with psycopg.connect(src, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO request_log (ts, request_id, method, path, status, duration_ms)"
            " VALUES (now(), 'req_1', 'GET', '/x', 200, 1.5)"
        )
    recipient = _identity(tmp_path / "id.txt")
    signer = _signer(tmp_path)
    seen: list[int] = []
    res = dump(src, tmp_path / "b.dump.age", recipient, progress=seen.append, signer=signer)
    raw = (tmp_path / "b.dump.age").read_bytes()
    assert raw.startswith(b"age-encryption.org/v1\n")
    assert b"audit_log" not in raw and b"fridge01" not in raw  # nothing readable
    assert res.counts["audit_log"] == 8 and res.dumped > 0
    assert sum(n for t, n in res.counts.items() if t.startswith("measurements_y")) == 500

    target = new_database(migrated=False)  # the owner role's: not a superuser
    restore(tmp_path / "b.dump.age", tmp_path / "id.txt", target, verifier=_vkey(signer))
    assert _table_dump(target) == _table_dump(src)
    assert check_restored(target, res.counts) == []
    # the restored trail is append-only again
    with psycopg.connect(target, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("DELETE FROM audit_log")
    # and refuses a database that is not empty
    with pytest.raises(BackupError, match="not empty"):
        restore(tmp_path / "b.dump.age", tmp_path / "id.txt", target, verifier=_vkey(signer))


@pytest.mark.db
async def test_a_key_we_do_not_hold_cannot_read_it(
    new_database: Any, tmp_path: Path, clock: FakeClock
) -> None:
    src = new_database()
    await _populate(src, clock)
    theirs = pyrage.x25519.Identity.generate()  # the operator's key, kept elsewhere
    signer = _signer(tmp_path)
    dump(src, tmp_path / "b.dump.age", str(theirs.to_public()), signer=signer)
    _identity(tmp_path / "ours.txt")  # the only key on this host
    target = new_database(migrated=False)
    with pytest.raises(BackupError, match="cannot decrypt"):
        restore(tmp_path / "b.dump.age", tmp_path / "ours.txt", target, verifier=_vkey(signer))
    with pytest.raises(pyrage.DecryptError):
        pyrage.decrypt((tmp_path / "b.dump.age").read_bytes(), [pyrage.x25519.Identity.generate()])
    # with the right key it is a complete dump
    (tmp_path / "theirs.txt").write_text(f"{theirs}\n")
    (tmp_path / "theirs.txt").chmod(0o600)
    restore(tmp_path / "b.dump.age", tmp_path / "theirs.txt", target, verifier=_vkey(signer))
    assert _table_dump(target) == _table_dump(src)


@pytest.mark.db
async def test_backup_runs_rotation_weekly_copy_and_restore_test(
    new_database: Any, tmp_path: Path
) -> None:
    src = new_database()
    # noon of today: the hours this test steps (daily, then hourly; 8 days on, daily
    # then hourly) must not cross midnight, or an "hourly" is the next day's daily
    # (started at the real hour, it failed when run after 22:00 UTC)
    clock = FakeClock(datetime.now(UTC).replace(hour=12, minute=0, second=0, microsecond=0))
    await _populate(src, clock)
    recipient = _identity(tmp_path / "id.txt")
    _signer(tmp_path)
    cfg = Config(
        mqtt="off",
        clock=clock,
        state_dir=tmp_path,
        backup_recipients=recipient,
        backup_offsite_dir=str(tmp_path / "offsite"),
        backup_identity=str(tmp_path / "id.txt"),
        backup_restore_url=restore_dsn(),  # a CREATEDB role, not a superuser
    )
    first = run_backup(cfg, src)
    assert first[0].startswith("daily:") and any(x.startswith("weekly:") for x in first)
    clock.advance(hours=1)
    second = run_backup(cfg, src)
    assert second[0].startswith("hourly:") and not any(x.startswith("weekly:") for x in second), (
        second
    )
    assert restore_test(cfg, src).startswith("ok: ")
    with psycopg.connect(src) as conn:
        runs = conn.execute(
            "SELECT kind, ok, bytes > 0, location IS NOT NULL, finished_at IS NOT NULL"
            " FROM backup_runs ORDER BY id"
        ).fetchall()
        leftovers = conn.execute(
            "SELECT count(*) FROM pg_database WHERE datname LIKE 'opensense_restore_test_%'"
        ).fetchone()
    assert [r[0] for r in runs] == ["daily", "weekly", "hourly", "restore_test"]
    assert all(r[1:] == (True, True, True, True) for r in runs)
    assert leftovers == (0,)
    # a damaged dump fails the restore test, recorded for the status page
    newest = sorted((tmp_path / "backups").glob("*.age"))[-1]
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    assert restore_test(cfg, src).startswith("FAILED: ")
    with psycopg.connect(src) as conn:
        assert conn.execute(
            "SELECT ok FROM backup_runs WHERE kind = 'restore_test' ORDER BY id DESC LIMIT 1"
        ).fetchone() == (False,)
    # eight days on, hourly dumps past 7 days are rotated out, the daily stays
    clock.advance(days=8)
    run_backup(cfg, src)  # the day's daily
    clock.advance(hours=1)
    out = run_backup(cfg, src)  # an hourly: the 8-day-old hourly goes
    assert any(x.startswith("rotated out") and "hourly" in x for x in out), out
    names = sorted(p.name for p in (tmp_path / "backups").glob("*.age"))
    assert [n.split("-")[-1] for n in names] == [
        "daily.dump.age",
        "daily.dump.age",
        "hourly.dump.age",
    ]


@pytest.mark.db
def test_cli_backup_and_restore(new_database: Any, tmp_path: Path) -> None:
    src = new_database()
    recipient = _identity(tmp_path / "id.txt")
    _signer(tmp_path)
    env = {
        **os.environ,
        "OPENSENSE_DATABASE_URL": src,
        "OPENSENSE_STATE_DIR": str(tmp_path),
        "OPENSENSE_BACKUP_RECIPIENTS": recipient,
    }
    r = subprocess.run(
        [sys.executable, "-m", "opensense.cli", "backup"], env=env, capture_output=True, text=True
    )
    assert r.returncode == 0 and r.stdout.startswith("daily: "), r.stderr
    path = next((tmp_path / "backups").glob("*.age"))
    assert json.loads(path.with_name(path.name + ".json").read_text())["counts"]
    target = new_database(migrated=False)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "opensense.cli",
            "restore",
            str(path),
            "--identity",
            str(tmp_path / "id.txt"),
            "--target",
            target,
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0 and "row counts and audit chains check" in r.stdout, r.stderr
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "opensense.cli",
            "restore",
            str(path),
            "--identity",
            str(tmp_path / "id.txt"),
            "--target",
            target,
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1 and "not empty" in r.stderr


def test_progress_is_reported_on_long_runs() -> None:
    import io

    from opensense.backup.dump import Counting

    seen: list[int] = []
    src = Counting(io.BytesIO(b"x" * 100_000), seen.append, every=0.0)
    out = io.BytesIO()
    recipient = pyrage.x25519.Identity.generate().to_public()
    pyrage.encrypt_io(src, out, [recipient])
    assert src.n == 100_000 and seen and seen[-1] <= 100_000 and seen == sorted(seen)
