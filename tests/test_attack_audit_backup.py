"""Attacks on the audit trail's tail and on backups (issue 11, items 15 and 16),
performed against the real server and the real PostgreSQL.

- the app's database role tries to switch the trigger off, delete, truncate, drop;
- the server is started as a superuser or as the schema's owner;
- rows newer than the last checkpoint are deleted behind the trigger's back;
- whoever can write the publish directory re-signs a shortened log with their own key;
- the signing key is missing;
- a backup file is swapped for a dump an attacker made (anyone can encrypt to the
  public age recipient) or signed by another key; the identity file is readable by all;
- the restore test is pointed at a superuser."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from aiohttp.test_utils import TestClient, TestServer
from psycopg_pool import AsyncConnectionPool

from opensense import jobs
from opensense.app import create_app
from opensense.audit.note import generate_key
from opensense.backup.dump import BackupError, restore
from opensense.backup.run import restore_test, run_backup
from opensense.settings import Config
from tests.fixtures.clock import FakeClock
from tests.fixtures.database import admin_of, owner_of, restore_dsn
from tests.fixtures.processes import BIN, free_port, opensense_env
from tests.fixtures.server import make_world

pytestmark = pytest.mark.db

ORIGIN = "test.invalid/audit"
ATTEMPTS = (
    "ALTER TABLE audit_log DISABLE TRIGGER USER",
    "ALTER TABLE audit_log DISABLE TRIGGER ALL",
    "ALTER TABLE audit_log DISABLE TRIGGER audit_log_no_update",
    "DELETE FROM audit_log",
    "UPDATE audit_log SET actor = 'mallory'",
    "TRUNCATE audit_log",
    "DROP TABLE audit_log CASCADE",
    "ALTER TABLE audit_log RENAME TO audit_log_old",
    "DROP TRIGGER audit_log_no_update ON audit_log",
    "CREATE OR REPLACE FUNCTION opensense_audit_refuse() RETURNS trigger LANGUAGE plpgsql"
    " AS $$ BEGIN RETURN OLD; END $$",
    "SET session_replication_role = replica",  # triggers off for the session: superuser only
    "SELECT opensense_drop_partition('audit_log')",
)


def _attack_as(dsn: str) -> list[str]:
    """Every attempt, each in its own transaction; returns those that were NOT refused."""
    allowed = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        for stmt in ATTEMPTS:
            try:
                conn.execute(stmt)
            except (psycopg.errors.InsufficientPrivilege, psycopg.errors.RaiseException):
                continue
            allowed.append(stmt)
    return allowed


def _audit_count(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM audit_log").fetchone()
    assert row is not None
    return int(row[0])


# --- the app role ----------------------------------------------------------------------


async def test_the_app_role_cannot_silence_or_rewrite_the_trail(
    new_database: Any, tmp_path: Path, clock: FakeClock
) -> None:
    dsn = new_database()  # what `create_app` and `opensense serve` connect with
    await make_world(dsn, Config(bcrypt_rounds=4, mqtt="off", clock=clock))
    before = _audit_count(dsn)
    assert _attack_as(dsn) == []
    assert _audit_count(dsn) == before
    # and the app still does its work: append, and make next month's partitions
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT opensense_create_partition('measurements', '2031-01-01')")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT opensense_create_partition('audit_log', '2031-01-01')")


def test_embedded_mode_connects_as_the_app_role_and_upgrades_an_old_state_dir(
    tmp_path: Path,
) -> None:
    """`opensense serve` on the embedded server: a state directory made by an older
    release (migrated as the superuser, everything owned by it) gets the roles on the
    next start, and the server's own role cannot touch the trail."""
    os.chmod(tmp_path, 0o755)  # as root, the embedded server runs as its own user
    state = tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENSENSE_")}
    env.update(OPENSENSE_STATE_DIR=str(state), OPENSENSE_MQTT="off", OPENSENSE_JOBS="false")
    # the older release: everything as the embedded superuser
    old = (
        "from pathlib import Path; from opensense import db;"
        f"dsn = db.embedded_dsn(Path({str(state)!r})); db.migrate(dsn); print(dsn)"
    )
    r = subprocess.run(
        [sys.executable, "-c", old], env=env, capture_output=True, text=True, timeout=180
    )
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run(
        [str(BIN), "db", "url"], env=env, capture_output=True, text=True, timeout=180
    )
    assert r.returncode == 0, r.stderr[-2000:]
    app_dsn = r.stdout.strip()
    assert psycopg.conninfo.conninfo_to_dict(app_dsn)["user"] == "opensense_app"
    port = free_port()
    proc = subprocess.Popen(
        [str(BIN), "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        up = False
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                import urllib.request

                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as rsp:
                    up = rsp.status == 200
                    break
            except OSError:
                time.sleep(0.3)
        assert up, proc.stdout.read() if proc.stdout and proc.poll() is not None else "no answer"
        with psycopg.connect(app_dsn) as conn:
            row = conn.execute(
                "SELECT current_user, rolsuper FROM pg_roles WHERE rolname = current_user"
            ).fetchone()
        assert row == ("opensense_app", False)
        r = subprocess.run(
            [str(BIN), "account", "create", "--name", "A", "--email", "a@example.invalid"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0, r.stderr[-2000:]
        assert _audit_count(app_dsn) >= 2
        assert _attack_as(app_dsn) == []
        # a signed backup as the app role, restore-tested as the embedded restore role
        identity = tmp_path / "id.txt"
        env["OPENSENSE_BACKUP_RECIPIENTS"] = _identity(identity)
        env["OPENSENSE_BACKUP_IDENTITY"] = str(identity)
        for args in (("audit", "keygen"), ("backup",), ("restore", "test")):
            r = subprocess.run(
                [str(BIN), *args], env=env, capture_output=True, text=True, timeout=180
            )
            assert r.returncode == 0, (args, r.stdout, r.stderr[-2000:])
        assert r.stdout.startswith("ok: ") and "audit chains intact" in r.stdout
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        if proc.stdout:
            proc.stdout.close()


def _serve_outcome(dsn: str) -> tuple[int | None, str]:
    """Start `opensense serve` with `dsn`; (exit code, output), None if it served."""
    proc = subprocess.Popen(
        [str(BIN), "serve", "--port", str(free_port())],
        env=opensense_env(dsn),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        out, _ = proc.communicate(timeout=30)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        return None, out


def _member_of_owner(app_dsn: str) -> str:
    """A login role that is a member of the owner role (could SET ROLE to it). Roles
    are cluster-wide: made idempotently, never dropped."""
    from tests.fixtures.database import TEST_ROLES

    name = "opensense_test_owner_member"
    with psycopg.connect(admin_of(app_dsn), autocommit=True) as conn:
        for stmt in (f"CREATE ROLE {name} LOGIN", f"GRANT {TEST_ROLES.owner} TO {name}"):
            try:
                conn.execute(stmt)
            except (psycopg.errors.DuplicateObject, psycopg.errors.UniqueViolation):
                pass  # another run made it
    return str(psycopg.conninfo.make_conninfo(owner_of(app_dsn), user=name))


@pytest.mark.parametrize("who", ["superuser", "owner", "member of the owner"])
async def test_serving_as_a_superuser_or_the_owner_is_refused(
    new_database: Any, aiohttp_client: Any, clock: FakeClock, who: str
) -> None:
    app_dsn = new_database()
    dsn = {
        "superuser": admin_of,
        "owner": owner_of,
        "member of the owner": _member_of_owner,
    }[who](app_dsn)
    code, out = _serve_outcome(dsn)
    assert code == 2, out[-2000:]
    assert "refusing to serve as PostgreSQL role" in out
    assert ("superuser" if who == "superuser" else "owns") in out
    assert "OPENSENSE_DATABASE_URL" in out and "opensense_app" in out
    # the app factory refuses too (a process embedding it)
    from opensense.db.roles import UnsafeRole

    cfg = Config(bcrypt_rounds=4, mqtt="off", jobs_enabled=False, clock=clock)
    # a client of our own: pytest-aiohttp's aiohttp_client never closes a client
    # whose server failed to start (its session is left to the garbage collector)
    app = create_app(cfg, dsn)
    client = TestClient(TestServer(app))
    with pytest.raises(UnsafeRole):
        await client.start_server()
    await client.close()
    await app.cleanup()  # leave the contexts entered before the refusal, as run_app does


# --- the tail: signed within minutes, verified with the pinned key -----------------------


def _cfg(tmp_path: Path, clock: FakeClock, **over: Any) -> Config:
    base: dict[str, Any] = dict(
        bcrypt_rounds=4,
        jobs_enabled=False,
        mqtt="off",
        clock=clock,
        state_dir=tmp_path,
        audit_origin=ORIGIN,
    )
    base.update(over)
    return Config(**base)


def _cli(dsn: str, tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("OPENSENSE_")}
    full.update(
        OPENSENSE_DATABASE_URL=dsn,
        OPENSENSE_STATE_DIR=str(tmp_path),
        OPENSENSE_AUDIT_ORIGIN=ORIGIN,
        **env,
    )
    return subprocess.run(
        [sys.executable, "-m", "opensense.cli", *args],
        env=full,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _delete_tail(dsn: str, account: str, from_seq: int) -> None:
    """A superuser deletes the newest rows behind the trigger's back."""
    with psycopg.connect(admin_of(dsn), autocommit=True) as conn:
        conn.execute("ALTER TABLE audit_log DISABLE TRIGGER USER")
        try:
            conn.execute(
                "DELETE FROM audit_log WHERE account_id = %s AND seq >= %s", (account, from_seq)
            )
        finally:
            conn.execute("ALTER TABLE audit_log ENABLE TRIGGER USER")


async def test_new_rows_are_signed_within_minutes_and_a_deleted_tail_is_caught(
    new_database: Any, aiohttp_client: Any, tmp_path: Path, clock: FakeClock
) -> None:
    dsn = new_database()
    signer = generate_key(tmp_path / "audit" / "signing.key", ORIGIN)  # `audit keygen`
    cfg = _cfg(tmp_path, clock, audit_verifier_key=signer.verifier_key())
    w = await make_world(dsn, cfg)
    client = await aiohttp_client(create_app(cfg, dsn))
    job = next(j for j in jobs.JOBS if j.name == "audit_checkpoint")
    async with AsyncConnectionPool(
        dsn, min_size=1, max_size=2, kwargs={"autocommit": True}
    ) as pool:
        ran = await jobs.run_due(pool, cfg, (job,))
        assert "published size 5" in ran[0], ran
        # a tenant changes things: two new audit rows
        for name in ("Bakery", "Bakery 2"):
            r = await client.patch(f"/v1/sites/{w.site}", json={"name": name}, headers=w.auth)
            assert r.status == 200
        # within the checkpoint interval (5 minutes) they are signed
        clock.advance(seconds=cfg.audit_checkpoint_interval_s)
        ran = await jobs.run_due(pool, cfg, (job,))
        assert ran and "published size 7" in ran[0], ran
        # nothing new: nothing signed, and cheaply so
        clock.advance(seconds=cfg.audit_checkpoint_interval_s)
        ran = await jobs.run_due(pool, cfg, (job,))
        assert ran == [f"audit_checkpoint: ok: {w.account}: unchanged at 7"], ran
    _delete_tail(dsn, w.account, 5)
    # verification with the pinned key, on a host that holds no signing key
    shutil.move(tmp_path / "audit" / "signing.key", tmp_path / "signing.key.offline")
    r = _cli(dsn, tmp_path, "audit", "verify", OPENSENSE_AUDIT_VERIFIER_KEY=signer.verifier_key())
    assert r.returncode == 1, r.stdout + r.stderr
    assert "covers 7 rows but the database holds 5: rows seq 5..6 are missing" in r.stderr


async def test_a_log_re_signed_by_another_key_is_refused(
    new_database: Any, tmp_path: Path, clock: FakeClock
) -> None:
    """Whoever can write the publish directory deletes the tail and re-signs the
    shorter log with a key of their own (same name), replacing verifier.key too."""
    dsn = new_database()
    signer = generate_key(tmp_path / "audit" / "signing.key", ORIGIN)
    pinned = signer.verifier_key()
    cfg = _cfg(tmp_path, clock, audit_verifier_key=pinned)
    w = await make_world(dsn, cfg, devices=("fridge01", "fridge02"))
    assert _cli(dsn, tmp_path, "audit", "checkpoint").returncode == 0
    # the forger: shorten the trail, wipe the published state, sign anew with their key
    _delete_tail(dsn, w.account, 5)
    shutil.rmtree(tmp_path / "audit" / "published")
    os.replace(tmp_path / "audit" / "signing.key", tmp_path / "real.key")
    evil = tmp_path / "evil" / "signing.key"
    generate_key(evil, ORIGIN)
    r = _cli(dsn, tmp_path, "audit", "checkpoint", OPENSENSE_AUDIT_SIGNING_KEY=str(evil))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "audit" / "published" / "verifier.key").read_text().strip() != pinned
    # with the pinned key the forged checkpoints are refused
    r = _cli(dsn, tmp_path, "audit", "verify", OPENSENSE_AUDIT_VERIFIER_KEY=pinned)
    assert r.returncode == 1, r.stdout
    assert "carries no signature by" in r.stderr and "checkpoint" in r.stderr
    # and a signing key that is not the pinned one signs nothing
    r = _cli(
        dsn,
        tmp_path,
        "audit",
        "checkpoint",
        OPENSENSE_AUDIT_SIGNING_KEY=str(evil),
        OPENSENSE_AUDIT_VERIFIER_KEY=pinned,
    )
    assert r.returncode == 1 and "is not the pinned verifier key" in r.stderr


async def test_a_missing_signing_key_is_never_made_silently(
    new_database: Any, tmp_path: Path, clock: FakeClock
) -> None:
    dsn = new_database()
    cfg = _cfg(tmp_path, clock)
    await make_world(dsn, cfg)
    key = tmp_path / "audit" / "signing.key"
    job = next(j for j in jobs.JOBS if j.name == "audit_checkpoint")
    async with AsyncConnectionPool(
        dsn, min_size=1, max_size=2, kwargs={"autocommit": True}
    ) as pool:
        ran = await jobs.run_due(pool, cfg, (job,))
    assert ran[0].startswith("audit_checkpoint: failed: SigningKeyError"), ran
    assert "no audit signing key at" in ran[0] and "opensense audit keygen" in ran[0]
    assert not key.exists()
    r = _cli(dsn, tmp_path, "audit", "checkpoint")
    assert r.returncode == 1 and "refusing to sign" in r.stderr and not key.exists()
    # a configured key that is missing stops the server's start
    missing = tmp_path / "etc" / "audit-signing.key"
    code, out = _serve_outcome_env(dsn, OPENSENSE_AUDIT_SIGNING_KEY=str(missing))
    assert code == 2 and "does not exist" in out and not missing.exists(), out[-2000:]
    # only keygen makes one
    r = _cli(dsn, tmp_path, "audit", "keygen")
    assert r.returncode == 0 and key.exists() and f"{ORIGIN}+" in r.stdout


def _serve_outcome_env(dsn: str, **env: str) -> tuple[int | None, str]:
    proc = subprocess.Popen(
        [str(BIN), "serve", "--port", str(free_port())],
        env=opensense_env(dsn, **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        out, _ = proc.communicate(timeout=30)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        return None, out


# --- backups ----------------------------------------------------------------------------


def _identity(path: Path) -> str:
    import pyrage

    ident = pyrage.x25519.Identity.generate()
    path.write_text(f"{ident}\n")
    path.chmod(0o600)
    return str(ident.to_public())


HOUR = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)


async def _backed_up(
    new_database: Any, tmp_path: Path, name: str, recipient: str, identity: Path
) -> tuple[str, Config, Any]:
    dsn = new_database()
    clock = FakeClock(HOUR)  # every dump of this module has the same file name
    state = tmp_path / name
    generate_key(state / "audit" / "signing.key", ORIGIN)
    cfg = Config(
        mqtt="off",
        clock=clock,
        state_dir=state,
        audit_origin=ORIGIN,
        backup_recipients=recipient,
        backup_identity=str(identity),
        backup_restore_url=restore_dsn(),
    )
    w = await make_world(dsn, cfg)
    run_backup(cfg, dsn)
    return dsn, cfg, w


def _swap(theirs: Path, mine: Path) -> None:
    for suffix in ("", ".sig", ".json"):
        if Path(str(theirs) + suffix).exists():
            shutil.copyfile(str(theirs) + suffix, str(mine) + suffix)


async def test_a_swapped_or_foreign_dump_is_never_restored(
    new_database: Any, tmp_path: Path
) -> None:
    identity = tmp_path / "id.txt"
    recipient = _identity(identity)
    dsn, cfg, w = await _backed_up(new_database, tmp_path, "victim", recipient, identity)
    assert restore_test(cfg, dsn).startswith("ok: ")
    (mine,) = sorted((tmp_path / "victim" / "backups").glob("*.age"))
    # the attacker: a dump of a database of their making, encrypted to the (public)
    # recipient and even signed, by a key of their own, under the victim's file name
    _, evil_cfg, evil_w = await _backed_up(new_database, tmp_path, "evil", recipient, identity)
    (theirs,) = sorted((tmp_path / "evil" / "backups").glob("*.age"))
    assert theirs.name == mine.name  # same hour: the forged file takes the victim's name
    _swap(theirs, mine)
    line = restore_test(cfg, dsn)
    assert line.startswith("FAILED: ") and "does not match its signature" in line, line
    assert "refusing to restore" in line
    # the file's own .sig (by another key) does not help it either
    target = new_database(migrated=False)
    from opensense.audit.publish import AuditPlaces

    pinned = AuditPlaces.from_config(cfg).verifier()
    assert pinned is not None
    with pytest.raises(BackupError, match="does not verify with the pinned key"):
        restore(mine, identity, target, verifier=pinned)
    # and the command says so
    r = _cli(
        dsn,
        tmp_path / "victim",
        "restore",
        str(mine),
        "--identity",
        str(identity),
        "--target",
        target,
    )
    assert r.returncode == 1 and "does not verify with the pinned key" in r.stderr, r.stderr
    # a byte flipped in the real file: refused before a byte is decrypted
    shutil.copyfile(theirs, mine)  # (any content; the recorded hash is the victim's)
    data = bytearray(mine.read_bytes())
    data[len(data) // 2] ^= 1
    mine.write_bytes(bytes(data))
    line = restore_test(cfg, dsn)
    assert line.startswith("FAILED: ") and "does not match its signature" in line
    with psycopg.connect(target) as conn:  # nothing of the forger's was restored
        row = conn.execute(
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = 'public'"
        ).fetchone()
    assert row == (0,)
    with psycopg.connect(dsn) as conn:
        recorded = conn.execute(
            "SELECT sha256 IS NOT NULL AND signature LIKE %s FROM backup_runs"
            " WHERE kind IN ('daily', 'hourly')",
            ("opensense-backup/v1%",),
        ).fetchall()
    assert recorded == [(True,)]


async def test_the_restore_test_runs_as_a_restricted_role(
    new_database: Any, tmp_path: Path
) -> None:
    identity = tmp_path / "id.txt"
    recipient = _identity(identity)
    dsn, cfg, _ = await _backed_up(new_database, tmp_path, "s", recipient, identity)
    line = restore_test(cfg.replace(backup_restore_url=admin_of(dsn)), dsn)
    assert line.startswith("FAILED: ") and "refusing to run the restore test as a superuser" in line
    assert restore_test(cfg, dsn).startswith("ok: ")  # the CREATEDB-only role


async def test_an_identity_file_others_may_read_is_refused(
    new_database: Any, tmp_path: Path
) -> None:
    identity = tmp_path / "id.txt"
    recipient = _identity(identity)
    dsn, cfg, _ = await _backed_up(new_database, tmp_path, "s", recipient, identity)
    identity.chmod(0o644)
    line = restore_test(cfg, dsn)
    assert line.startswith("FAILED: ") and f"chmod 600 {identity}" in line, line
    identity.chmod(0o600)
    assert restore_test(cfg, dsn).startswith("ok: ")
