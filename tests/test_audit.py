"""Audit trail: append-only in the database, hash chain, RFC 6962 tree, signed C2SP
checkpoints published outside the database, and `opensense audit verify` naming the
exact row of every kind of tampering."""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest

from opensense import audit
from opensense.audit import merkle
from opensense.audit.canonical import NotCanonical, canonical_json
from opensense.audit.note import Checkpoint, NoteError, Verifier, generate_key
from opensense.audit.publish import AuditPlaces, Diverged, publish
from opensense.audit.store import Directory
from opensense.audit.verify import verify
from opensense.settings import Config
from tests.fixtures.database import admin_of
from tests.fixtures.server import make_world

ROOT = Path(__file__).resolve().parents[1]


# --- pure parts ------------------------------------------------------------------


def test_canonical_json_is_jcs() -> None:
    # RFC 8785 examples of number serialization and member ordering
    assert canonical_json({"b": 1, "a": [1.0, 2.5, 1e21, 1e-7, -0.0]}) == (
        b'{"a":[1,2.5,1e+21,1e-7,0],"b":1}'
    )
    assert canonical_json({"\u20ac": 1, "\r": 2, "\U0001f600": 3, "1": 4}) == (
        '{"\\r":2,"1":4,"\u20ac":1,"\U0001f600":3}'.encode()
    )
    assert canonical_json('\u0001"\\é') == b'"\\u0001\\"\\\\\xc3\xa9"'
    assert canonical_json([0.000015, 1.5e-7, 123456789012345680000.0]) == (
        b"[0.000015,1.5e-7,123456789012345680000]"
    )
    for bad in (float("nan"), "a\x00b", {1: 2}, {1, 2}):
        with pytest.raises(NotCanonical):
            canonical_json(bad)


def _ref_root(data: list[bytes]) -> bytes:
    """RFC 6962 §2.1 MTH, written the recursive way, to check the iterative one."""
    import hashlib

    if not data:
        return hashlib.sha256(b"").digest()
    if len(data) == 1:
        return merkle.leaf_hash(data[0])
    k = 1
    while k * 2 < len(data):
        k *= 2
    return merkle.node_hash(_ref_root(data[:k]), _ref_root(data[k:]))


def test_merkle_tree_and_proofs() -> None:
    for n in range(0, 34):
        data = [os.urandom(8) for _ in range(n)]
        leaves = [merkle.leaf_hash(d) for d in data]
        root = merkle.root(leaves)
        assert root == _ref_root(data)
        for i in range(n):
            proof = merkle.inclusion_proof(leaves, i)
            assert merkle.verify_inclusion(leaves[i], i, n, proof, root)
            assert not merkle.verify_inclusion(merkle.leaf_hash(b"x"), i, n, proof, root)
        for m in range(1, n + 1):
            proof = merkle.consistency_proof(leaves, m)
            assert merkle.verify_consistency(m, n, proof, merkle.root(leaves[:m]), root)
            if m < n:
                other = merkle.root(leaves[: m - 1] + [merkle.leaf_hash(b"forged")])
                assert not merkle.verify_consistency(m, n, proof, other, root)


def test_rfc6962_known_answer() -> None:
    # The empty tree and a one-leaf tree of the empty string (RFC 6962 test vectors,
    # as used by certificate-transparency-go's merkle tests).
    assert merkle.root([]).hex() == (
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    )
    assert merkle.root([merkle.leaf_hash(b"")]).hex() == (
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"
    )


def test_signed_note_round_trip_and_forgery(tmp_path: Path) -> None:
    signer = generate_key(tmp_path / "k", "example.invalid/audit")
    assert (tmp_path / "k").stat().st_mode & 0o777 == 0o600
    cp = Checkpoint("example.invalid/audit/acc_x", 5, b"\x01" * 32)
    note = signer.sign(cp.text())
    lines = note.split("\n")
    assert lines[:3] == [
        "example.invalid/audit/acc_x",
        "5",
        base64.b64encode(b"\x01" * 32).decode(),
    ]
    assert lines[4].startswith("\u2014 example.invalid/audit ")
    v = Verifier.parse(signer.verifier_key())
    assert Checkpoint.parse(v.open(note)) == cp
    with pytest.raises(NoteError):
        v.open(note.replace("\n5\n", "\n6\n"))
    other = generate_key(tmp_path / "k2", "example.invalid/audit")
    with pytest.raises(NoteError):
        Verifier.parse(other.verifier_key()).open(note)


# --- in the database ---------------------------------------------------------------


def _cfg(tmp_path: Path, clock: Any) -> Config:
    """A config whose signing key exists (made here, as `opensense audit keygen`
    would: the server never makes one on its own)."""
    key = tmp_path / "audit" / "signing.key"
    if not key.exists():
        generate_key(key, "test.invalid/audit")
    return Config(
        bcrypt_rounds=4,
        jobs_enabled=False,
        mqtt="off",
        clock=clock,
        state_dir=tmp_path,
        audit_origin="test.invalid/audit",
    )


async def _rows(dsn: str, account: str) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT id, seq, action, actor, subject FROM audit_log WHERE account_id = %s ORDER BY seq",
            (account,),
        )
        return await cur.fetchall()


async def _verify(dsn: str, cfg: Config, account: str) -> list[str]:
    places = AuditPlaces.from_config(cfg)
    d = Directory(places.publish_dir)
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        v = d.verifier() if (places.publish_dir / "verifier.key").exists() else None
        rep = await verify(conn, d, v, account)
    return rep.problems


def _tamper(dsn: str, *statements: str) -> None:
    """What a superuser could do: switch the trigger off and edit."""
    with psycopg.connect(admin_of(dsn), autocommit=True) as conn:
        conn.execute("ALTER TABLE audit_log DISABLE TRIGGER USER")
        try:
            for s in statements:
                conn.execute(s)
        finally:
            conn.execute("ALTER TABLE audit_log ENABLE TRIGGER USER")


@pytest.mark.db
async def test_config_changes_are_recorded_with_the_token_as_actor(
    aiohttp_client: Any, dsn: str, tmp_path: Path, clock: Any
) -> None:
    from opensense.app import create_app

    cfg = _cfg(tmp_path, clock)
    w = await make_world(dsn, cfg)
    client = await aiohttp_client(create_app(cfg, dsn))
    r = await client.patch(f"/v1/sites/{w.site}", json={"name": "Bakery"}, headers=w.auth)
    assert r.status == 200
    r = await client.post("/v1/devices/fridge01/rotate-token", headers=w.auth)
    assert r.status == 200
    token = (await r.json())["ingest_token"]
    r = await client.post(
        "/v1/ingest",
        json={"device": "fridge01", "measurements": [{"type": "temperature", "value": 4.0}]},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert r.status == 200
    channel = (await r.json())["channels"][0]["channel_id"]
    r = await client.patch(
        f"/v1/channels/{channel}", json={"ok_max": 6.0, "offset": 0.5}, headers=w.auth
    )
    assert r.status == 200
    r = await client.post("/v1/tokens", json={"kind": "whk"}, headers=w.auth)
    whk = (await r.json())["id"]
    assert (await client.delete(f"/v1/tokens/{whk}", headers=w.auth)).status == 204
    assert (await client.delete("/v1/devices/fridge01", headers=w.auth)).status == 204

    rows = await _rows(dsn, w.account)
    actions = [r[2] for r in rows]
    assert actions == [
        "account.create",
        "token.create",
        "site.create",
        "device.create",
        "token.create",
        "site.update",
        "token.rotate",
        "device.rotate_token",
        "channel.create",
        "channel.update",
        "token.create",
        "token.revoke",
        "device.delete",
    ]
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT id FROM tokens WHERE account_id = %s AND kind = 'ua_live'", (w.account,)
        )
        (token_id,) = await cur.fetchone()  # type: ignore[misc]
    for row in rows[5:]:
        if row[2] != "channel.create":  # made by the device's first uplink
            assert row[3] == token_id, row
    assert rows[5][4] == w.site
    assert [r[1] for r in rows] == list(range(len(rows)))
    assert await _verify(dsn, cfg, w.account) == []


@pytest.mark.db
async def test_the_table_is_append_only(dsn: str, tmp_path: Path, clock: Any) -> None:
    w = await make_world(dsn, _cfg(tmp_path, clock))
    with psycopg.connect(admin_of(dsn), autocommit=True) as conn:
        # the trigger binds even a superuser
        for stmt in (
            "UPDATE audit_log SET actor = 'x'",
            "DELETE FROM audit_log",
            "TRUNCATE audit_log",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
                conn.execute(stmt)
    # the app's role (what the server connects as) may read and append, nothing else
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM audit_log WHERE account_id = %s", (w.account,)
        ).fetchone()
        assert row is not None and row[0] > 0
        for stmt in (
            "UPDATE audit_log SET actor = 'x'",
            "DELETE FROM audit_log",
            "TRUNCATE audit_log",
            "ALTER TABLE audit_log DISABLE TRIGGER USER",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(stmt)


@pytest.mark.db
async def test_corrections_are_new_rows(dsn: str, tmp_path: Path, clock: Any) -> None:
    w = await make_world(dsn, _cfg(tmp_path, clock))
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        async with conn.transaction():
            first = await audit.record(
                conn,
                account_id=w.account,
                actor="cli:test",
                action="note",
                subject=None,
                data={"text": "fridge 2 cleaned"},
            )
        async with conn.transaction():
            fix = await audit.record(
                conn,
                account_id=w.account,
                actor="cli:test",
                action="note",
                subject=None,
                data={"text": "fridge 3 cleaned"},
                correction_of=first.id,
            )
        with pytest.raises(RuntimeError, match="transaction"):
            await audit.record(
                conn, account_id=w.account, actor="x", action="y", subject=None, data={}
            )
    assert fix.seq == first.seq + 1 and fix.prev_hash == first.hash
    assert await _verify(dsn, _cfg(tmp_path, clock), w.account) == []


@pytest.mark.db
async def test_concurrent_writers_do_not_fork_the_chain(
    dsn: str, tmp_path: Path, clock: Any
) -> None:
    w = await make_world(dsn, _cfg(tmp_path, clock))

    async def writer(k: int) -> None:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            for i in range(10):
                async with conn.transaction():
                    await audit.record(
                        conn,
                        account_id=w.account,
                        actor=f"w{k}",
                        action="test",
                        subject=None,
                        data={"i": i},
                    )
                    await asyncio.sleep(0)

    await asyncio.gather(*(writer(k) for k in range(6)))
    rows = await _rows(dsn, w.account)
    assert [r[1] for r in rows] == list(range(len(rows)))
    assert len(rows) == 5 + 60
    assert await _verify(dsn, _cfg(tmp_path, clock), w.account) == []


# --- tampering -----------------------------------------------------------------------


async def _world_with_checkpoint(dsn: str, cfg: Config) -> tuple[Any, list[tuple[Any, ...]]]:
    w = await make_world(dsn, cfg, devices=("fridge01", "fridge02", "fridge03"))
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await publish(conn, AuditPlaces.from_config(cfg))
    rows = await _rows(dsn, w.account)
    assert len(rows) == 9 and await _verify(dsn, cfg, w.account) == []
    return w, rows


@pytest.mark.db
async def test_rewritten_row_is_named(dsn: str, tmp_path: Path, clock: Any) -> None:
    cfg = _cfg(tmp_path, clock)
    w, rows = await _world_with_checkpoint(dsn, cfg)
    victim = rows[4]
    _tamper(dsn, f'UPDATE audit_log SET data = \'{{"local_id": "evil"}}\' WHERE id = {victim[0]}')
    problems = await _verify(dsn, cfg, w.account)
    assert problems and f"row id {victim[0]} " in problems[0] and "rewritten" in problems[0]
    assert all(f"row id {victim[0]} " in p for p in problems), problems


@pytest.mark.db
async def test_rewritten_row_with_recomputed_hashes_is_named_by_the_checkpoint(
    dsn: str, tmp_path: Path, clock: Any
) -> None:
    """A careful forger recomputes every hash after the edit: the chain is whole
    again, but the published leaves and the signed root name the row."""
    from opensense.audit.trail import COLUMNS, ZERO, Row, chain_hash

    cfg = _cfg(tmp_path, clock)
    w, rows = await _world_with_checkpoint(dsn, cfg)
    victim = rows[3]
    _tamper(dsn, f"UPDATE audit_log SET actor = 'cli:someone_else' WHERE id = {victim[0]}")
    with psycopg.connect(dsn, autocommit=True) as conn:
        all_rows = [
            Row.from_db(r)
            for r in conn.execute(
                f"SELECT {COLUMNS} FROM audit_log WHERE account_id = %s ORDER BY seq", (w.account,)
            )
        ]
    prev, fixes = ZERO, []
    for r in all_rows:
        h = chain_hash(prev, r.form())
        fixes.append(
            f"UPDATE audit_log SET prev_hash = '\\x{prev.hex()}', hash = '\\x{h.hex()}' WHERE id = {r.id}"
        )
        prev = h
    _tamper(dsn, *fixes)
    problems = await _verify(dsn, cfg, w.account)
    assert len(problems) == 1 and f"row id {victim[0]} " in problems[0], problems
    assert "signed checkpoint" in problems[0]


@pytest.mark.db
async def test_deleted_row_is_named(dsn: str, tmp_path: Path, clock: Any) -> None:
    cfg = _cfg(tmp_path, clock)
    w, rows = await _world_with_checkpoint(dsn, cfg)
    _tamper(dsn, f"DELETE FROM audit_log WHERE id = {rows[5][0]}")
    problems = await _verify(dsn, cfg, w.account)
    assert problems[0].startswith(f"row seq 5 of account {w.account} is missing (deleted)")
    assert f"row id {rows[6][0]} " in problems[0]


@pytest.mark.db
async def test_reordered_pair_is_named(dsn: str, tmp_path: Path, clock: Any) -> None:
    cfg = _cfg(tmp_path, clock)
    w, rows = await _world_with_checkpoint(dsn, cfg)
    a, b = rows[2][0], rows[3][0]
    _tamper(
        dsn,
        f"UPDATE audit_log SET seq = seq + 1000000 WHERE id IN ({a}, {b})",
        f"UPDATE audit_log SET seq = 3 WHERE id = {a}",
        f"UPDATE audit_log SET seq = 2 WHERE id = {b}",
    )
    problems = await _verify(dsn, cfg, w.account)
    assert "rows reordered" in problems[0] and f"row id {b} " in problems[0], problems
    assert any(f"row id {a} " in p for p in problems)


@pytest.mark.db
async def test_database_restored_behind_a_newer_checkpoint(
    dsn: str, tmp_path: Path, clock: Any
) -> None:
    cfg = _cfg(tmp_path, clock)
    w, rows = await _world_with_checkpoint(dsn, cfg)
    # more history, published
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for i in range(3):
            async with conn.transaction():
                await audit.record(
                    conn, account_id=w.account, actor="x", action="t", subject=None, data={"i": i}
                )
        out = await publish(conn, AuditPlaces.from_config(cfg))
    assert any("published size 12" in line for line in out)
    # "restore" the older state: the last three rows are gone, the chain itself is whole
    _tamper(dsn, f"DELETE FROM audit_log WHERE account_id = '{w.account}' AND seq >= 9")
    problems = await _verify(dsn, cfg, w.account)
    assert len(problems) == 1, problems
    assert "covers 12 rows but the database holds 9: rows seq 9..11 are missing" in problems[0]
    # the daily publisher refuses to sign over it
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        with pytest.raises(Diverged, match="does not extend"):
            await publish(conn, AuditPlaces.from_config(cfg))
        # and new history written after the restore does not paper over it
        async with conn.transaction():
            forged = await audit.record(
                conn, account_id=w.account, actor="x", action="t", subject=None, data={"i": 99}
            )
    problems = await _verify(dsn, cfg, w.account)
    assert any(f"row id {forged.id} " in p for p in problems), problems


# --- the command ---------------------------------------------------------------------


def _cli(dsn: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "OPENSENSE_DATABASE_URL": dsn,
        "OPENSENSE_STATE_DIR": str(tmp_path),
        "OPENSENSE_AUDIT_ORIGIN": "test.invalid/audit",
    }
    return subprocess.run(
        [sys.executable, "-m", "opensense.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.db
async def test_cli_verify_checkpoint_inclusion_consistency(
    new_database: Any, tmp_path: Path, clock: Any
) -> None:
    dsn = new_database()
    r = _cli(dsn, tmp_path, "audit", "verify")
    assert r.returncode == 0 and "audit trail verified: 0 rows" in r.stdout, r.stderr
    has_git = shutil.which("git") is not None
    if has_git:
        subprocess.run(["git", "init", "-q", str(tmp_path / "pub")], check=True)  # noqa: ASYNC221
    cfg = _cfg(tmp_path, clock)
    w = await make_world(dsn, cfg)
    env_pub = str(tmp_path / "pub")
    os.environ["OPENSENSE_AUDIT_PUBLISH_DIR"] = env_pub
    try:
        r = _cli(dsn, tmp_path, "audit", "checkpoint")
        assert r.returncode == 0, r.stderr
        assert "published size 5" in r.stdout and ("committed to git" in r.stdout) == has_git
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            async with conn.transaction():
                await audit.record(
                    conn, account_id=w.account, actor="x", action="t", subject=None, data={}
                )
        assert _cli(dsn, tmp_path, "audit", "checkpoint").returncode == 0
        r = _cli(dsn, tmp_path, "audit", "verify")
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip().endswith(
            "audit trail verified: 6 rows in 1 account(s), every hash chain intact, "
            "2 signed checkpoint(s) match the database"
        )
        cps = sorted((tmp_path / "pub" / w.account / "checkpoints").iterdir())
        r = _cli(dsn, tmp_path, "audit", "verify", "--consistency", str(cps[0]), str(cps[1]))
        assert r.returncode == 0 and "size 5 and 6" in r.stdout and "are consistent" in r.stdout
        rows = await _rows(dsn, w.account)
        r = _cli(dsn, tmp_path, "audit", "verify", "--row", str(rows[2][0]))
        assert r.returncode == 0 and "is included in the signed checkpoint" in r.stdout, r.stderr
        if has_git:
            log = subprocess.run(  # noqa: ASYNC221
                ["git", "-C", env_pub, "log", "--oneline"], capture_output=True, text=True
            )
            assert len(log.stdout.splitlines()) == 2
        _tamper(dsn, f"UPDATE audit_log SET actor = 'evil' WHERE id = {rows[1][0]}")
        r = _cli(dsn, tmp_path, "audit", "verify")
        assert r.returncode == 1 and f"row id {rows[1][0]} " in r.stderr
        r = _cli(dsn, tmp_path, "audit", "verify", "--row", str(rows[1][0]))
        assert r.returncode == 1 and "NOT included" in r.stderr
    finally:
        del os.environ["OPENSENSE_AUDIT_PUBLISH_DIR"]


@pytest.mark.db
async def test_the_daily_job_publishes(new_database: Any, tmp_path: Path, clock: Any) -> None:
    from psycopg_pool import AsyncConnectionPool

    from opensense import jobs

    dsn = new_database()
    cfg = _cfg(tmp_path, clock)
    w = await make_world(dsn, cfg)
    job = next(j for j in jobs.JOBS if j.name == "audit_checkpoint")
    async with AsyncConnectionPool(
        dsn, min_size=1, max_size=2, kwargs={"autocommit": True}
    ) as pool:
        ran = await jobs.run_due(pool, cfg, (job,))
        assert ran == [
            f"audit_checkpoint: ok: {w.account}: published size 5 -> "
            f"{tmp_path}/audit/published/{w.account}/checkpoints/000000000005"
        ]
        assert await jobs.run_due(pool, cfg, (job,)) == []  # claimed for its interval
        clock.advance(days=1)
        ran = await jobs.run_due(pool, cfg, (job,))
        assert ran == [f"audit_checkpoint: ok: {w.account}: unchanged at 5"]
    assert (tmp_path / "audit" / "signing.key").stat().st_mode & 0o777 == 0o600
    assert await _verify(dsn, cfg, w.account) == []
