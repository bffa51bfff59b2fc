"""A backup run (`opensense backup`, the `backup` job) and the restore test (the
`restore_test` job), each recorded in backup_runs for the status page."""

from __future__ import annotations

import json
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from ..audit.publish import AuditPlaces
from ..audit.trail import COLUMNS, Row
from ..audit.verify import check_chain
from ..db import roles as db_roles
from ..settings import Config
from . import rotation
from .dump import BackupError, Manifest, Progress, dump, restore, sig_path, table_counts


def backup_dir(cfg: Config) -> Path:
    return Path(cfg.backup_dir) if cfg.backup_dir else Path(cfg.state_dir) / "backups"


def _start(conn: psycopg.Connection, kind: str, now: datetime) -> int:
    row = conn.execute(
        "INSERT INTO backup_runs (kind, started_at) VALUES (%s, %s) RETURNING id", (kind, now)
    ).fetchone()
    assert row is not None
    return int(row[0])


def _finish(
    conn: psycopg.Connection,
    run_id: int,
    ok: bool | None,
    now: datetime,
    nbytes: int | None = None,
    location: str | None = None,
    detail: str | None = None,
    sha256: str | None = None,
    signature: str | None = None,
) -> None:
    conn.execute(
        "UPDATE backup_runs SET finished_at = %s, ok = %s, bytes = %s, location = %s, detail = %s,"
        " sha256 = %s, signature = %s WHERE id = %s",
        (now, ok, nbytes, location, detail, sha256, signature, run_id),
    )


def _names(d: Path) -> list[str]:
    return [p.name for p in d.iterdir()] if d.is_dir() else []


@contextmanager
def _failure_recorded(conn: psycopg.Connection, run_id: int, cfg: Config) -> Iterator[None]:
    """A step that fails ends its run as failed (with the error), then raises on."""
    try:
        yield
    except Exception as exc:
        _finish(conn, run_id, False, cfg.clock(), detail=str(exc)[:1000])
        raise


def run_backup(cfg: Config, dsn: str, progress: Progress | None = None) -> list[str]:
    """One dump (daily if it is the day's first, else hourly), the weekly copy when
    due, then rotation of both places. Returns what it did, one line each."""
    now = cfg.clock()
    d = backup_dir(cfg)
    kind = rotation.kind_for_run(rotation.parse_all(_names(d)), now)
    path = d / rotation.name_for(now, kind)
    out: list[str] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        run_id = _start(conn, kind, now)
        with _failure_recorded(conn, run_id, cfg):
            # each dump is signed: a missing signing key stops the run, recorded
            signer = AuditPlaces.from_config(cfg).signer()
            res = dump(dsn, path, cfg.backup_recipients, cfg.pg_bin, progress, signer=signer)
        _finish(
            conn,
            run_id,
            True,
            cfg.clock(),
            res.bytes,
            str(path),
            json.dumps({"dumped_bytes": res.dumped, "tables": len(res.counts)}),
            res.sha256,
            res.signature,
        )
        out.append(f"{kind}: {path} ({res.bytes} bytes encrypted, {res.dumped} dumped)")
        if cfg.backup_offsite_dir:
            off = Path(cfg.backup_offsite_dir)
            if rotation.weekly_due(rotation.parse_all(_names(off)), now):
                wid = _start(conn, "weekly", now)
                target = off / rotation.name_for(now, "weekly")
                with _failure_recorded(conn, wid, cfg):
                    off.mkdir(parents=True, exist_ok=True)
                    tmp = target.with_name(target.name + ".partial")
                    shutil.copyfile(path, tmp)
                    shutil.copyfile(
                        path.with_name(path.name + ".json"),
                        target.with_name(target.name + ".json"),
                    )
                    # the copy is signed under its own name (the name is signed too)
                    weekly_note = (
                        AuditPlaces.from_config(cfg)
                        .signer()
                        .sign(Manifest(target.name, res.sha256, res.bytes).text())
                    )
                    sig_path(target).write_text(weekly_note)
                    tmp.replace(target)
                _finish(
                    conn,
                    wid,
                    True,
                    cfg.clock(),
                    target.stat().st_size,
                    str(target),
                    sha256=res.sha256,
                    signature=weekly_note,
                )
                out.append(f"weekly: copied to {target}")
            out += _rotate(off, now, {"weekly": cfg.backup_keep_weekly_days})
    out += _rotate(
        d, now, {"hourly": cfg.backup_keep_hourly_days, "daily": cfg.backup_keep_daily_days}
    )
    return out


def _rotate(d: Path, now: datetime, keep: dict[str, int]) -> list[str]:
    out = []
    for dump_ in rotation.to_delete(rotation.parse_all(_names(d)), now, keep):
        (d / dump_.name).unlink(missing_ok=True)
        (d / (dump_.name + ".json")).unlink(missing_ok=True)
        (d / (dump_.name + ".sig")).unlink(missing_ok=True)
        out.append(f"rotated out {dump_.name}")
    return out


def check_restored(dsn: str, expected: dict[str, int]) -> list[str]:
    """Row counts against the dump's manifest, and every account's audit chain."""
    problems = []
    got = table_counts(dsn)
    for table, n in sorted(expected.items()):
        if got.get(table) != n:
            problems.append(f"{table}: {got.get(table)} rows restored, {n} dumped")
    with psycopg.connect(dsn) as conn:
        cur = conn.execute(f"SELECT {COLUMNS} FROM audit_log ORDER BY account_id, seq, id")
        rows: dict[str, list[Any]] = {}
        for r in cur:
            row = Row.from_db(r)
            rows.setdefault(row.account_id, []).append(row)
    for acc_rows in rows.values():
        problems += check_chain(acc_rows)
    return problems


def restore_url(cfg: Config, dsn: str) -> str | None:
    """The restricted role's DSN the restore test runs as: the setting, else (embedded
    server) its restore role; None with an external database and no setting."""
    if cfg.backup_restore_url:
        return cfg.backup_restore_url
    if not cfg.database_url:
        return db_roles.with_user(dsn, db_roles.RESTORE_ROLE, "postgres")
    return None


def _newest_signed(conn: psycopg.Connection) -> tuple[Path, str, str] | None:
    row = conn.execute(
        "SELECT location, sha256, signature FROM backup_runs"
        " WHERE kind IN ('hourly', 'daily') AND ok AND signature IS NOT NULL"
        " AND location IS NOT NULL ORDER BY started_at DESC, id DESC LIMIT 1"
    ).fetchone()
    return (Path(row[0]), str(row[1]), str(row[2])) if row else None


def restore_test(cfg: Config, dsn: str, progress: Progress | None = None) -> str:
    """Restore the newest dump this server recorded and signed into a scratch database,
    as the restricted restore role, check it, drop it. The file must match the hash
    and signature recorded with it (a swapped or altered file is refused)."""
    now = cfg.clock()
    with psycopg.connect(dsn, autocommit=True) as conn:
        run_id = _start(conn, "restore_test", now)
        if not cfg.backup_identity:
            detail = "skipped: OPENSENSE_BACKUP_IDENTITY is not set on this host"
            _finish(conn, run_id, None, cfg.clock(), detail=detail)
            return detail
        target = restore_url(cfg, dsn)
        if target is None:
            detail = "skipped: OPENSENSE_BACKUP_RESTORE_URL is not set (docs/backups.md)"
            _finish(conn, run_id, None, cfg.clock(), detail=detail)
            return detail
        verifier = AuditPlaces.from_config(cfg).verifier()
        newest = _newest_signed(conn)
        if verifier is None or newest is None:
            detail = (
                "no verifier key: set OPENSENSE_AUDIT_VERIFIER_KEY"
                if verifier is None
                else f"no signed backup recorded in backup_runs ({backup_dir(cfg)})"
            )
            _finish(conn, run_id, False, cfg.clock(), detail=detail)
            return "FAILED: " + detail
        path, sha256, note = newest
        nbytes, tables, rows = 0, 0, 0
        problems: list[str] = []
        try:
            with psycopg.connect(target, autocommit=True) as rconn:
                if rconn.execute(
                    "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"
                ).fetchone() != (False,):
                    raise BackupError(
                        "refusing to run the restore test as a superuser: "
                        "OPENSENSE_BACKUP_RESTORE_URL names a role with CREATEDB only"
                    )
                scratch = f"opensense_restore_test_{secrets.token_hex(4)}"
                rconn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(scratch)))
                try:
                    if Manifest.open(verifier, note).sha256 != sha256:
                        raise BackupError("the recorded hash and the signed one differ")
                    manifest = json.loads(path.with_name(path.name + ".json").read_text())
                    into = db_roles.with_dbname(target, scratch)
                    nbytes = restore(
                        path,
                        Path(cfg.backup_identity),
                        into,
                        cfg.pg_bin,
                        progress,
                        verifier=verifier,
                        note=note,
                    )
                    problems = check_restored(into, manifest["counts"])
                    tables = len(manifest["counts"])
                    rows = sum(manifest["counts"].values())
                finally:
                    rconn.execute(
                        sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                            sql.Identifier(scratch)
                        )
                    )
        except (BackupError, OSError, ValueError, psycopg.Error) as exc:
            problems, tables, rows, nbytes = [str(exc)[:1000]], 0, 0, 0
        ok = not problems
        detail = (
            f"{path.name}: {tables} tables, {rows} rows restored and counted, audit chains intact"
            if ok
            else f"{path.name}: " + "; ".join(problems)[:1500]
        )
        _finish(conn, run_id, ok, cfg.clock(), nbytes, str(path), detail)
    return ("ok: " if ok else "FAILED: ") + detail
