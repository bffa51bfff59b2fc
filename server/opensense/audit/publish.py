"""Signing and publishing checkpoints: daily (the `audit_checkpoint` job) and on
demand (`opensense audit checkpoint`). A new checkpoint is only published when the
database still extends the last one published; otherwise publishing fails loudly,
because the trail was rewritten or the database was restored behind it."""

from __future__ import annotations

import asyncio
import fcntl
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from psycopg import AsyncConnection

from . import merkle, store
from .note import Checkpoint, Signer, generate_key, load_key

log = logging.getLogger(__name__)


class Diverged(RuntimeError):
    """The database no longer extends what was published."""


@dataclass(frozen=True)
class AuditPlaces:
    key_path: Path
    publish_dir: Path
    origin: str

    @classmethod
    def from_config(cls, cfg: Any) -> AuditPlaces:
        base = Path(cfg.state_dir) / "audit"
        return cls(
            Path(cfg.audit_signing_key) if cfg.audit_signing_key else base / "signing.key",
            Path(cfg.audit_publish_dir) if cfg.audit_publish_dir else base / "published",
            cfg.audit_origin,
        )

    def signer(self, create: bool = True) -> Signer:
        if not self.key_path.exists() and create:
            log.warning("no audit signing key at %s: generating one", self.key_path)
            return generate_key(self.key_path, self.origin)
        return load_key(self.key_path)


def origin_of(base: str, account_id: str) -> str:
    return f"{base}/{account_id}"


async def publish(conn: AsyncConnection[Any], places: AuditPlaces) -> list[str]:
    """Publish a checkpoint for every account whose trail grew. Returns one line each.
    One publisher at a time per directory (an flock on <dir>/.lock)."""
    with _lock_file(places.publish_dir) as lock:
        await asyncio.to_thread(fcntl.flock, lock.fileno(), fcntl.LOCK_EX)
        try:
            return await _publish(conn, places)
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _lock_file(d: Path) -> IO[str]:
    d.mkdir(parents=True, exist_ok=True)
    return open(d / ".lock", "a")


async def _publish(conn: AsyncConnection[Any], places: AuditPlaces) -> list[str]:
    signer = places.signer()
    directory = store.Directory(places.publish_dir)
    directory.write_verifier(signer)
    verifier = directory.verifier()
    out: list[str] = []
    failures: list[str] = []
    for acc in await store.accounts(conn):
        leaves = [r.leaf() async for r in store.rows(conn, acc)]
        pub = directory.load(acc)
        old = 0
        if pub.checkpoints:
            last = store.parse_signed(verifier, pub.checkpoints[-1][1])
            old = last.size
            if last.size > len(leaves) or merkle.root(leaves[: last.size]) != last.root:
                failures.append(
                    f"{acc}: the database ({len(leaves)} rows) does not extend the published "
                    f"checkpoint of size {last.size}; run `opensense audit verify`"
                )
                continue
            if last.size == len(leaves):
                out.append(f"{acc}: unchanged at {last.size}")
                continue
        cp = Checkpoint(origin_of(places.origin, acc), len(leaves), merkle.root(leaves))
        note = signer.sign(cp.text())
        path = directory.write(acc, cp.size, note, b"".join(leaves[old:]), old)
        out.append(f"{acc}: published size {cp.size} -> {path}")
    if directory.commit(f"audit checkpoints: {len(out)} account(s)"):
        out.append(f"committed to git in {places.publish_dir}")
    if failures:
        raise Diverged("; ".join(failures + out))
    return out
