"""`opensense audit verify`: the chain, the tree, the published checkpoints (and
their consistency with each other and with the database), and inclusion of one row.
Every problem names the row it found."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

from psycopg import AsyncConnection

from . import merkle, store
from .note import Checkpoint, NoteError, Verifier
from .trail import ZERO, Row


@dataclass
class Report:
    accounts: int = 0
    rows: int = 0
    checkpoints: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_chain(rows: list[Row]) -> list[str]:
    """The per-account hash chain: seq 0,1,2…; each prev_hash is the previous hash;
    each hash is SHA-256(prev_hash || row form)."""
    problems: list[str] = []
    by_hash = {r.hash: r for r in rows}
    prev: Row | None = None
    for r in rows:
        want_seq = 0 if prev is None else prev.seq + 1
        want_prev = ZERO if prev is None else prev.hash
        if r.seq == want_seq - 1 and prev is not None:
            problems.append(f"{r.label()}: two rows share seq {r.seq} (the chain forked)")
        elif r.seq > want_seq:
            gap = f"seq {want_seq}" if r.seq == want_seq + 1 else f"seq {want_seq}..{r.seq - 1}"
            problems.append(
                f"row {gap} of account {r.account_id} is missing (deleted): "
                f"{r.label()} follows {prev.label() if prev else 'the start of the chain'}"
            )
        if r.prev_hash != want_prev:
            linked = by_hash.get(r.prev_hash)
            if linked is not None and linked is not r:
                problems.append(
                    f"{r.label()}: its prev_hash points at {linked.label()}, "
                    f"not at the row before it (rows reordered)"
                )
            elif r.seq <= want_seq:  # a gap above already named the missing row
                problems.append(
                    f"{r.label()}: its prev_hash is not the hash of the row before it "
                    "(a row before it was rewritten or removed)"
                )
        if r.computed_hash() != r.hash:
            problems.append(
                f"{r.label()}: its contents do not match its hash (the row was rewritten)"
            )
        prev = r
    return problems


def check_published(
    account_id: str, rows: list[Row], leaves: list[bytes], pub: store.Published, v: Verifier
) -> tuple[int, list[str]]:
    """Each signed checkpoint against the database and against each other (RFC 6962
    consistency proofs), and the published leaf hashes against the rows."""
    problems: list[str] = []
    cps: list[tuple[str, Checkpoint]] = []
    for path, note in pub.checkpoints:
        try:
            cp = store.parse_signed(v, note)
        except NoteError as exc:
            problems.append(f"checkpoint {path}: {exc}")
            continue
        if not cp.origin.endswith("/" + account_id):
            problems.append(f"checkpoint {path}: origin {cp.origin!r} is not account {account_id}")
            continue
        cps.append((str(path), cp))
    published = [pub.leaves[i : i + 32] for i in range(0, len(pub.leaves), 32)]
    if cps:
        latest_path, latest = cps[-1]
        if merkle.root(published[: latest.size]) != latest.root or len(published) < latest.size:
            problems.append(
                f"{pub.path / 'leaves'}: the published leaf hashes do not match the signed "
                f"checkpoint {latest_path}"
            )
            published = []
    # Checkpoints against each other: each is consistent with the next.
    for (p1, a), (p2, b) in zip(cps, cps[1:], strict=False):
        src = published if len(published) >= b.size else leaves
        if len(src) < b.size:
            continue  # reported below as rows missing
        proof = merkle.consistency_proof(src[: b.size], a.size) if a.size else []
        if not merkle.verify_consistency(a.size, b.size, proof, a.root, b.root):
            problems.append(f"checkpoints {p1} and {p2} are not consistent (the log forked)")
    # The database's leaves against the published ones: names the first row that differs.
    where = _first_difference(leaves, published)
    if where is not None:
        problems.append(
            f"{rows[where].label()}: differs from leaf {where} published with the signed "
            f"checkpoint {cps[-1][0]} (rewritten, reordered or replaced after it was signed)"
        )
    # Checkpoints against the database.
    for cp_path, cp in cps:
        if cp.size > len(rows) and cp is not cps[-1][1]:
            continue  # the largest checkpoint names the missing rows once
        if cp.size > len(rows):
            missing = f"seq {len(rows)}" + (f"..{cp.size - 1}" if cp.size - 1 > len(rows) else "")
            problems.append(
                f"account {account_id}: the signed checkpoint {cp_path} covers {cp.size} rows but "
                f"the database holds {len(rows)}: rows {missing} are missing (the database was "
                "restored to an older state, or rows were deleted)"
            )
        elif where is None and merkle.root(leaves[: cp.size]) != cp.root:
            where = _first_difference(leaves[: cp.size], published)
            named = rows[where].label() if where is not None else f"one of the first {cp.size} rows"
            problems.append(
                f"{named}: differs from what the signed checkpoint {cp_path} covers "
                "(rewritten, reordered or replaced after it was signed)"
            )
    return len(cps), problems


def _first_difference(db: list[bytes], published: list[bytes]) -> int | None:
    for i, (a, b) in enumerate(zip(db, published, strict=False)):
        if a != b:
            return i
    return None


async def verify(
    conn: AsyncConnection[Any],
    directory: store.Directory,
    verifier: Verifier | None,
    account: str | None = None,
) -> Report:
    rep = Report()
    accs = sorted(set(await store.accounts(conn)) | set(directory.published_accounts()))
    if account:
        accs = [account]
    for acc in accs:
        rows = [r async for r in store.rows(conn, acc)]
        rep.accounts += 1
        rep.rows += len(rows)
        rep.problems += check_chain(rows)
        leaves = [r.leaf() for r in rows]
        pub = directory.load(acc)
        if verifier is None:
            if pub.checkpoints:
                rep.problems.append(
                    "checkpoints are published but no verifier key is pinned "
                    "(OPENSENSE_AUDIT_VERIFIER_KEY, or --vkey)"
                )
            continue
        n, problems = check_published(acc, rows, leaves, pub, verifier)
        rep.checkpoints += n
        rep.problems += problems
        if rows and not pub.checkpoints:
            rep.notes.append(f"account {acc}: no checkpoint published yet")
    return rep


async def inclusion(
    conn: AsyncConnection[Any], directory: store.Directory, verifier: Verifier, row_id: int
) -> list[str]:
    """Prove that row `row_id` is in the account's tree under a signed checkpoint."""
    cur = await conn.execute("SELECT account_id FROM audit_log WHERE id = %s", (row_id,))
    found = await cur.fetchone()
    if found is None:
        raise LookupError(f"no audit row with id {row_id}")
    rows = [r async for r in store.rows(conn, found[0])]
    row = next(r for r in rows if r.id == row_id)
    leaves = [r.leaf() for r in rows]
    for path, note in directory.load(row.account_id).checkpoints:
        cp = store.parse_signed(verifier, note)
        if cp.size <= row.seq or cp.size > len(leaves):
            continue
        proof = merkle.inclusion_proof(leaves[: cp.size], row.seq)
        if not merkle.verify_inclusion(row.leaf(), row.seq, cp.size, proof, cp.root):
            raise ValueError(f"{row.label()} is NOT included in the signed checkpoint {path}")
        return [
            f"{row.label()} is included in the signed checkpoint {path} "
            f"(size {cp.size}, root {base64.b64encode(cp.root).decode()})",
            f"leaf hash {row.leaf().hex()}; proof ({len(proof)} hashes):",
            *(f"  {h.hex()}" for h in proof),
        ]
    raise LookupError(
        f"{row.label()} is not covered by a published checkpoint yet "
        "(run `opensense audit checkpoint`)"
    )


def consistency(a_note: str, b_note: str, verifier: Verifier, leaves: list[bytes]) -> str:
    """Two signed checkpoints of one account: is the older a prefix of the newer?"""
    a, b = Checkpoint.parse(verifier.open(a_note)), Checkpoint.parse(verifier.open(b_note))
    if a.origin != b.origin:
        raise ValueError(f"different logs: {a.origin} and {b.origin}")
    if a.size > b.size:
        a, b = b, a
    if len(leaves) < b.size:
        raise ValueError(
            f"the leaves at hand ({len(leaves)}) do not reach checkpoint size {b.size}"
        )
    proof = merkle.consistency_proof(leaves[: b.size], a.size) if a.size else []
    if not merkle.verify_consistency(a.size, b.size, proof, a.root, b.root):
        raise ValueError(f"checkpoints of size {a.size} and {b.size} are NOT consistent")
    return f"checkpoints of size {a.size} and {b.size} of {a.origin} are consistent ({len(proof)} proof hashes)"


__all__ = ["Checkpoint", "Report", "check_chain", "consistency", "inclusion", "verify"]
