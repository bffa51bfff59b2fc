"""`opensense audit verify|checkpoint|keygen|log`."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import psycopg

from ..settings import Config
from . import store, verify
from .note import NoteError, Verifier, generate_key
from .publish import AuditPlaces, Diverged, SigningKeyError, publish
from .trail import COLUMNS, Row, iso


async def _connect(dsn: str) -> psycopg.AsyncConnection[Any]:
    return await psycopg.AsyncConnection.connect(dsn, autocommit=True, options="-c timezone=UTC")


def _verifier(places: AuditPlaces, vkey: str | None) -> Verifier | None:
    """--vkey, else the pinned key (OPENSENSE_AUDIT_VERIFIER_KEY), else the public half
    of this host's signing key; never the publish directory's own verifier.key."""
    if vkey:
        return Verifier.parse(vkey)
    return places.verifier()


async def _verify(cfg: Config, dsn: str, args: argparse.Namespace, notes: list[str]) -> int:
    places = AuditPlaces.from_config(cfg)
    directory = store.Directory(places.publish_dir)
    v = _verifier(places, args.vkey)
    async with await _connect(dsn) as conn:
        if args.consistency:
            if v is None:
                print("opensense: no verifier key: pass --vkey", file=sys.stderr)
                return 2
            a, b = notes
            origin = verify.Checkpoint.parse(v.open(b)).origin
            acc = origin.rsplit("/", 1)[-1]
            pub = directory.load(acc)
            leaves = [pub.leaves[i : i + 32] for i in range(0, len(pub.leaves), 32)]
            if len(leaves) < verify.Checkpoint.parse(v.open(b)).size:
                leaves = [r.leaf() async for r in store.rows(conn, acc)]
            try:
                print(verify.consistency(a, b, v, leaves))
            except (ValueError, NoteError) as exc:
                print(f"audit: {exc}", file=sys.stderr)
                return 1
            return 0
        if args.row is not None:
            if v is None:
                print("opensense: no verifier key: pass --vkey", file=sys.stderr)
                return 2
            try:
                for line in await verify.inclusion(conn, directory, v, args.row):
                    print(line)
            except (LookupError, ValueError, NoteError) as exc:
                print(f"audit: {exc}", file=sys.stderr)
                return 1
            return 0
        rep = await verify.verify(conn, directory, v, args.account)
    for note in rep.notes:
        print(f"note: {note}")
    if rep.ok:
        print(
            f"audit trail verified: {rep.rows} rows in {rep.accounts} account(s), every hash "
            f"chain intact, {rep.checkpoints} signed checkpoint(s) match the database"
        )
        return 0
    print(f"AUDIT TRAIL BROKEN: {len(rep.problems)} problem(s)", file=sys.stderr)
    for p in rep.problems:
        print(f"  {p}", file=sys.stderr)
    return 1


async def _checkpoint(cfg: Config, dsn: str) -> int:
    async with await _connect(dsn) as conn:
        try:
            lines = await publish(conn, AuditPlaces.from_config(cfg))
        except (Diverged, SigningKeyError) as exc:
            print(f"audit: refusing to publish: {exc}", file=sys.stderr)
            return 1
    for line in lines or ["no audit rows yet"]:
        print(line)
    return 0


async def _log(dsn: str, account: str | None) -> int:
    async with await _connect(dsn) as conn:
        cur = await conn.execute(
            f"SELECT {COLUMNS} FROM audit_log WHERE %s::text IS NULL OR account_id = %s"
            " ORDER BY account_id, seq",
            (account, account),
        )
        async for r in cur:
            row = Row.from_db(r)
            print(
                json.dumps(
                    {
                        "id": row.id,
                        "account_id": row.account_id,
                        "seq": row.seq,
                        "at": iso(row.at),
                        "actor": row.actor,
                        "action": row.action,
                        "subject": row.subject,
                        "data": row.data,
                        "correction_of": row.correction_of,
                        "hash": row.hash.hex(),
                    },
                    ensure_ascii=False,
                )
            )
    return 0


def run(cfg: Config, dsn: str, args: argparse.Namespace) -> int:
    if args.action == "keygen":
        places = AuditPlaces.from_config(cfg)
        path = Path(args.out) if args.out else places.key_path
        try:
            signer = generate_key(path, cfg.audit_origin)
        except FileExistsError:
            print(f"opensense: {path} exists; refusing to replace a signing key", file=sys.stderr)
            return 1
        print(f"wrote {path} (mode 0600); verifier key, give it to auditors and pin it")
        print("(OPENSENSE_AUDIT_VERIFIER_KEY) wherever checkpoints or backups are verified:")
        print(signer.verifier_key())
        return 0
    if args.action == "verify":
        notes = [Path(p).read_text() for p in args.consistency] if args.consistency else []
        return asyncio.run(_verify(cfg, dsn, args, notes))
    if args.action == "checkpoint":
        return asyncio.run(_checkpoint(cfg, dsn))
    return asyncio.run(_log(dsn, args.account))
