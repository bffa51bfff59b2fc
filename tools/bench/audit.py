"""OpenSense audit and backup benchmark: what the trust features cost.

Figures, each with a baseline measured in the same run:

1. audit.record, one writer, one transaction per row, vs the same INSERT into a
   plain table with the same columns (no lock, no head lookup, no hashing): rows/s
   and the ratio (both write a file).
2. audit.record with 4 writers on 4 accounts vs 4 writers on ONE account (the
   per-account advisory lock serializes the latter): rows/s each.
3. `verify` (chain + tree + checkpoints) and `publish` (sign a checkpoint) over the
   rows written: rows/s.
4. Backup: pg_dump -Fc piped through age encryption to a file vs pg_dump -Fc to
   a file, on a database holding N synthetic readings: MB/s of dump output each,
   and the ratio (both write a file).

    tools/bench/audit              # full run (~1 min on 2 cores), embedded PostgreSQL in a temp dir
    tools/bench/audit --quick      # smoke run, tiny sizes
    tools/bench/audit --dsn postgresql://postgres@127.0.0.1:5432/test   # a server to make a scratch db on
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pyrage
from psycopg.types.json import Jsonb

from _lib import pg, runner
from _lib.report import ratio, say
from opensense import audit
from opensense.audit.note import generate_key
from opensense.audit.publish import AuditPlaces, publish
from opensense.audit.store import Directory
from opensense.audit.verify import verify
from opensense.backup.dump import dump, pg_tool, server_major


async def _writer(dsn: str, account: str, n: int, plain: bool) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for i in range(n):
            async with conn.transaction():
                if plain:
                    await conn.execute(
                        "INSERT INTO bench_plain (account_id, seq, at, actor, action, subject, data,"
                        " prev_hash, hash) VALUES (%s, %s, now(), 'bench', 'bench.write', NULL,"
                        " %s, %s, %s)",
                        (account, i, Jsonb({"i": i}), b"\0" * 32, b"\0" * 32),
                    )
                else:
                    await audit.record(
                        conn,
                        account_id=account,
                        actor="bench",
                        action="bench.write",
                        subject=None,
                        data={"i": i},
                    )


async def _rate(dsn: str, accounts: list[str], n: int, plain: bool = False) -> float:
    t = time.perf_counter()
    await asyncio.gather(*(_writer(dsn, a, n, plain) for a in accounts))
    return len(accounts) * n / (time.perf_counter() - t)


def _mb_s(nbytes: int, seconds: float) -> float:
    return nbytes / 1e6 / seconds


async def run(frame: runner.Frame, quick: bool) -> None:
    n = 100 if quick else 2000
    readings = 10_000 if quick else 1_000_000
    tmp = frame.work
    with pg.scratch(frame.dsn, "opensense_bench") as dsn:
        await measure(dsn, tmp, n, readings)


async def measure(dsn: str, tmp: Path, n: int, readings: int) -> None:
    pg.migrate(dsn)
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(
            "CREATE TABLE bench_plain (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
            " account_id text NOT NULL, seq bigint NOT NULL, at timestamptz NOT NULL,"
            " actor text NOT NULL, action text NOT NULL, subject text, data jsonb NOT NULL,"
            " prev_hash bytea NOT NULL, hash bytea NOT NULL, UNIQUE (account_id, seq))"
        )
    say(f"== audit.record ({n} rows a writer, one transaction each)")
    base = await _rate(dsn, ["acc_plain0"], n, plain=True)
    one = await _rate(dsn, ["acc_bench0"], n)
    say(f"  plain INSERT, 1 writer:            {base:8.0f} rows/s (baseline)")
    say(
        f"  audit.record, 1 writer:            {one:8.0f} rows/s ({ratio(one, base):.2f}x baseline)"
    )
    four = await _rate(dsn, [f"acc_bench{k}" for k in range(1, 5)], n)
    same = await _rate(dsn, ["acc_bench5"] * 4, n)
    say(
        f"  audit.record, 4 writers/4 accounts: {four:7.0f} rows/s ({ratio(four, base):.2f}x baseline)"
    )
    say(
        f"  audit.record, 4 writers/1 account:  {same:7.0f} rows/s ({ratio(same, four):.2f}x of 4 accounts)"
    )

    places = AuditPlaces(tmp / "key", tmp / "pub", "bench.invalid/audit")
    generate_key(places.key_path, places.origin)  # signing never makes one itself
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        total = n * 10
        t = time.perf_counter()
        await publish(conn, places)
        tp = time.perf_counter() - t
        d = Directory(places.publish_dir)
        t = time.perf_counter()
        rep = await verify(conn, d, d.verifier())
        tv = time.perf_counter() - t
    assert rep.ok, rep.problems
    say("== checkpoints and verification")
    say(f"  publish (6 accounts, {total} rows):  {total / tp:8.0f} rows/s ({tp:.2f} s)")
    say(f"  verify  (chain+tree+checkpoints):  {total / tv:8.0f} rows/s ({tv:.2f} s)")

    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(
            "INSERT INTO measurements (channel_num, ts, value)"
            " SELECT g %% 50, now() - (g / 50) * interval '1 minute', random() * 10"
            " FROM generate_series(1, %s) g",
            (readings,),
        )
        c.execute("VACUUM ANALYZE measurements")
    say(f"== backup ({readings} readings in measurements)")
    tool = pg_tool("pg_dump", "", server_major(dsn))
    t = time.perf_counter()
    subprocess.run([tool, "-Fc", "-f", str(tmp / "plain.dump"), "-d", dsn], check=True)  # noqa: ASYNC221
    tplain = time.perf_counter() - t
    plain_bytes = (tmp / "plain.dump").stat().st_size
    recipient = str(pyrage.x25519.Identity.generate().to_public())
    t = time.perf_counter()
    signer = generate_key(tmp / "signing.key", "bench.invalid/audit")
    res = dump(dsn, tmp / "b.dump.age", recipient, signer=signer)
    tenc = time.perf_counter() - t
    say(
        f"  pg_dump -Fc -> file (unencrypted):  {_mb_s(plain_bytes, tplain):8.1f} MB/s ({plain_bytes / 1e6:.1f} MB, baseline)"
    )
    say(
        f"  pg_dump -Fc | age -> file:         {_mb_s(res.dumped, tenc):8.1f} MB/s "
        f"({res.bytes / 1e6:.1f} MB encrypted, {tplain / tenc:.2f}x baseline speed)"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dsn", help="admin DSN of a server to create a scratch database on")
    args = ap.parse_args(argv)
    return runner.run("audit", args.dsn, lambda frame: run(frame, args.quick))


if __name__ == "__main__":
    sys.exit(main())
