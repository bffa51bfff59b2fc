"""Reading the trail out of PostgreSQL, and the published checkpoints out of their
directory (outside the database)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from psycopg import AsyncConnection

from .note import Checkpoint, NoteError, Signer, Verifier
from .trail import COLUMNS, Row


async def accounts(conn: AsyncConnection[Any]) -> list[str]:
    cur = await conn.execute("SELECT DISTINCT account_id FROM audit_log ORDER BY account_id")
    return [r[0] for r in await cur.fetchall()]


async def rows(conn: AsyncConnection[Any], account_id: str) -> AsyncIterator[Row]:
    """The account's rows in seq order, streamed (a server-side cursor in a transaction)."""
    # closed before the transaction ends: left to the garbage collector, psycopg
    # warns (ResourceWarning) that the cursor was deleted while still open
    async with conn.transaction(), conn.cursor(name="audit_rows") as cur:
        await cur.execute(
            f"SELECT {COLUMNS} FROM audit_log WHERE account_id = %s ORDER BY seq, id",
            (account_id,),
        )
        async for r in cur:
            yield Row.from_db(r)


@dataclass(frozen=True)
class Published:
    """One account's published state: signed checkpoints and the leaf hashes."""

    path: Path
    checkpoints: list[tuple[Path, str]]  # (file, signed note), ascending by size
    leaves: bytes  # 32 bytes per leaf


class Directory:
    """<dir>/verifier.key, and per account <dir>/<account>/{leaves, checkpoint,
    checkpoints/<size>}. Write-once files except `checkpoint` (the latest) and the
    append-only `leaves`. A git work tree gets one commit per publication."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def account_dir(self, account_id: str) -> Path:
        if "/" in account_id or account_id.startswith("."):
            raise ValueError(f"unexpected account id {account_id!r}")
        return self.root / account_id

    def load(self, account_id: str) -> Published:
        d = self.account_dir(account_id)
        cps = []
        cdir = d / "checkpoints"
        if cdir.is_dir():
            for f in sorted(cdir.iterdir()):
                if f.name.isdigit():
                    cps.append((f, f.read_text(encoding="utf-8")))
        leaves = (d / "leaves").read_bytes() if (d / "leaves").exists() else b""
        return Published(d, cps, leaves)

    def latest_size(self, account_id: str, verifier: Verifier | None) -> int | None:
        """The size of the account's latest checkpoint, if it verifies; else None."""
        path = self.account_dir(account_id) / "checkpoint"
        if verifier is None or not path.exists():
            return None
        try:
            return Checkpoint.parse(verifier.open(path.read_text(encoding="utf-8"))).size
        except (NoteError, OSError, UnicodeDecodeError):
            return None

    def published_accounts(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / "checkpoints").is_dir())

    def write(self, account_id: str, size: int, note: str, new_leaves: bytes, old: int) -> Path:
        d = self.account_dir(account_id)
        (d / "checkpoints").mkdir(parents=True, exist_ok=True)
        with open(d / "leaves", "ab") as f:
            f.truncate(old * 32)  # a crash between files leaves a longer tail: cut it
            f.write(new_leaves)
            f.flush()
            os.fsync(f.fileno())
        cp = d / "checkpoints" / f"{size:012d}"
        _atomic_write(cp, note)
        _atomic_write(d / "checkpoint", note)
        return cp

    def write_verifier(self, signer: Signer) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / "verifier.key"
        text = signer.verifier_key() + "\n"
        if not path.exists() or path.read_text() != text:
            _atomic_write(path, text)

    def verifier(self) -> Verifier:
        path = self.root / "verifier.key"
        if not path.exists():
            raise NoteError(f"no verifier key at {path}: pass --vkey")
        return Verifier.parse(path.read_text())

    def commit(self, message: str) -> bool:
        """git add + commit when the directory is a git work tree; False otherwise."""
        if not (self.root / ".git").exists():
            return False
        ignore = self.root / ".gitignore"
        if not ignore.exists():
            ignore.write_text(".lock\n*.tmp\n")

        def run(*a: str) -> None:
            subprocess.run(
                ["git", "-C", str(self.root), *a], check=True, capture_output=True, text=True
            )

        run("add", "-A")
        if subprocess.run(["git", "-C", str(self.root), "diff", "--cached", "--quiet"]).returncode:
            run(
                "-c",
                "user.name=opensense",
                "-c",
                "user.email=opensense@localhost",
                "commit",
                "-q",
                "-m",
                message,
            )
        return True


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def parse_signed(verifier: Verifier, note: str) -> Checkpoint:
    return Checkpoint.parse(verifier.open(note))
