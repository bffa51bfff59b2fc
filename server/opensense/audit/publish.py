"""Signing and publishing checkpoints: within minutes of new rows (the
`audit_checkpoint` job, every OPENSENSE_AUDIT_CHECKPOINT_INTERVAL_S, signs each account
whose trail grew) and on demand (`opensense audit checkpoint`). A new checkpoint is only published when the
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

from . import merkle, store, verify
from .note import Checkpoint, NoteError, Signer, Verifier, load_key

log = logging.getLogger(__name__)


class Diverged(RuntimeError):
    """The database no longer extends what was published."""


class SigningKeyError(RuntimeError):
    """The signing key is missing or is not the pinned one. A new key is never made
    silently: a fresh key would sign whatever the database holds now, and auditors
    holding the old verifier key would see only that checkpoints stopped."""


@dataclass(frozen=True)
class AuditPlaces:
    key_path: Path
    publish_dir: Path
    origin: str
    verifier_key: str = ""  # the pinned verifier key (OPENSENSE_AUDIT_VERIFIER_KEY)

    @classmethod
    def from_config(cls, cfg: Any) -> AuditPlaces:
        base = Path(cfg.state_dir) / "audit"
        return cls(
            Path(cfg.audit_signing_key) if cfg.audit_signing_key else base / "signing.key",
            Path(cfg.audit_publish_dir) if cfg.audit_publish_dir else base / "published",
            cfg.audit_origin,
            getattr(cfg, "audit_verifier_key", ""),
        )

    def pinned(self) -> Verifier | None:
        return Verifier.parse(self.verifier_key) if self.verifier_key else None

    def signer(self) -> Signer:
        """The signing key, which must exist and match the pinned verifier key."""
        if not self.key_path.exists():
            raise SigningKeyError(
                f"no audit signing key at {self.key_path}: refusing to sign. Restore it from "
                "your key backup, or make one with `opensense audit keygen` and give auditors "
                "the verifier key it prints (docs/audit.md)"
            )
        signer = load_key(self.key_path)
        pinned = self.pinned()
        if pinned is not None and (pinned.name, pinned.id) != (
            signer.name,
            Verifier.parse(signer.verifier_key()).id,
        ):
            raise SigningKeyError(
                f"the signing key {self.key_path} is not the pinned verifier key "
                "(OPENSENSE_AUDIT_VERIFIER_KEY): refusing to sign with it"
            )
        return signer

    def verifier(self) -> Verifier | None:
        """The key verification trusts: the pinned one, else the public half of the
        signing key on this host. Never <publish dir>/verifier.key: whoever can write
        that directory could replace both the checkpoints and the key."""
        pinned = self.pinned()
        if pinned is not None:
            return pinned
        if self.key_path.exists():
            try:
                return Verifier.parse(load_key(self.key_path).verifier_key())
            except (NoteError, ValueError):
                return None
        return None


async def moved(
    conn: AsyncConnection[Any], places: AuditPlaces
) -> tuple[list[str], list[tuple[str, int]]]:
    """Cheaply: the accounts whose trail has rows beyond their latest published
    checkpoint, and (account, size) of the others. Reads row counts and the latest
    checkpoint files only, so the checkpoint job may ask every few minutes."""
    cur = await conn.execute(
        "SELECT account_id, count(*) FROM audit_log GROUP BY account_id ORDER BY account_id"
    )
    counts = await cur.fetchall()
    verifier = places.verifier()
    directory = store.Directory(places.publish_dir)
    grew, same = [], []
    for acc, n in counts:
        size = directory.latest_size(acc, verifier)
        if size is not None and size == n:
            same.append((acc, int(n)))
        else:
            grew.append(acc)
    return grew, same


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
    directory.write_verifier(signer)  # for auditors' convenience; never trusted here
    out: list[str] = []
    failures: list[str] = []
    for acc in await store.accounts(conn):
        try:
            line, _note = await _publish_account(conn, places, signer, directory, acc)
        except Diverged as exc:
            failures.append(str(exc))
            continue
        out.append(line)
    if directory.commit(f"audit checkpoints: {len(out)} account(s)"):
        out.append(f"committed to git in {places.publish_dir}")
    if failures:
        raise Diverged("; ".join(failures + out))
    return out


async def _publish_account(
    conn: AsyncConnection[Any],
    places: AuditPlaces,
    signer: Signer,
    directory: store.Directory,
    acc: str,
) -> tuple[str, str]:
    """Sign and publish one account's checkpoint if its trail grew (else the latest
    published one stands). Returns a line saying what happened and the signed note."""
    verifier = Verifier.parse(signer.verifier_key())
    leaves = [r.leaf() async for r in store.rows(conn, acc)]
    pub = directory.load(acc)
    old = 0
    if pub.checkpoints:
        last = store.parse_signed(verifier, pub.checkpoints[-1][1])
        old = last.size
        if last.size > len(leaves) or merkle.root(leaves[: last.size]) != last.root:
            raise Diverged(
                f"{acc}: the database ({len(leaves)} rows) does not extend the published "
                f"checkpoint of size {last.size}; run `opensense audit verify`"
            )
        if last.size == len(leaves):
            return f"{acc}: unchanged at {last.size}", pub.checkpoints[-1][1]
    cp = Checkpoint(origin_of(places.origin, acc), len(leaves), merkle.root(leaves))
    note = signer.sign(cp.text())
    path = directory.write(acc, cp.size, note, b"".join(leaves[old:]), old)
    return f"{acc}: published size {cp.size} -> {path}", note


async def publish_account(conn: AsyncConnection[Any], places: AuditPlaces, account_id: str) -> str:
    """The signed checkpoint (a C2SP signed note) of one account's trail as it is now:
    signed and published like the job's when the trail grew, else the latest published.
    For a sealed report (reports/verify.py), which prints the checkpoint it was
    rendered under. The whole account's trail is verified first, as the job does:
    a report is never sealed over a trail that does not verify."""
    with _lock_file(places.publish_dir) as lock:
        await asyncio.to_thread(fcntl.flock, lock.fileno(), fcntl.LOCK_EX)
        try:
            signer = places.signer()
            directory = store.Directory(places.publish_dir)
            directory.write_verifier(signer)
            rep = await verify.verify(conn, directory, places.verifier(), account_id)
            if not rep.ok:
                raise Diverged(f"{account_id}: " + "; ".join(rep.problems))
            _line, note = await _publish_account(conn, places, signer, directory, account_id)
            directory.commit(f"audit checkpoint: {account_id}")
            return note
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
