"""OpenSense LISTEN benchmark (issue 14): what a notification costs the process that
listens, psycopg's `notifies()` generator (how `aio.listen` read them until stop 37)
against `aio.listen` as it reads them now (libpq's input consumed when the event loop
says the socket is readable), in the same run.

Why it matters: the dashboard's live updates listen to a notification for every
channel a statement changes (web/live.py, migration 0026); the batch writer settling
a fleet's calm readings changes ~3 channels a node's message, so the server's live
listener gets ~3 notifications a message whether a dashboard is open or not.

A PostgreSQL of the bench's own (embedded; `--dsn` for another). For each way, a
listener process (uvloop, as the server) and a sender process that commits T
transactions of K notifications each (K about one fleet batch's channels). The
listener measures its own CPU (getrusage) from its first notification to its last:
µs a notification. Rounds alternate between the ways; each way's figure is its median
round. tools/bench/fleet measures the whole server, where this difference is below
the noise of a two-point line.

    tools/bench/listen            # 3,000 transactions of 66, 3 rounds a way (~10 s)
    tools/bench/listen --quick    # 200 transactions, 1 round a way (a smoke run)
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _lib import pg  # noqa: E402
from _lib.rounds import alternate  # noqa: E402

WAYS = ("notifies", "listen")
CHANNEL = "opensense_bench_listen"


def _cpu(r: resource.struct_rusage) -> float:
    return r.ru_utime + r.ru_stime


def listener(way: str, dsn: str, total: int) -> None:
    """Listen until `total` notifications came; print the CPU a notification."""
    import uvloop

    from opensense import aio

    async def main() -> None:
        got = 0
        start: list[float] = []
        done = asyncio.Event()
        listening = asyncio.Event()

        async def on_note(payload: str | None) -> None:
            nonlocal got
            if payload is None:
                listening.set()
                return
            if not start:
                start.append(_cpu(resource.getrusage(resource.RUSAGE_SELF)))
            got += 1
            if got == total:
                done.set()

        async def former() -> None:  # aio.listen's loop until stop 37
            async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
                await conn.execute(f"LISTEN {CHANNEL}")
                await on_note(None)
                async for note in conn.notifies():
                    await on_note(note.payload)

        task = asyncio.create_task(
            former() if way == "notifies" else aio.listen(dsn, CHANNEL, on_note, "bench")
        )
        await listening.wait()
        print("ready", flush=True)
        async with asyncio.timeout(300):
            await done.wait()
        cpu = _cpu(resource.getrusage(resource.RUSAGE_SELF)) - start[0]
        await aio.cancel(task)
        print(f"cpu_us_per_note {cpu / total * 1e6:.3f}", flush=True)

    uvloop.run(main())


def send(dsn: str, transactions: int, k: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for i in range(transactions):
            conn.execute(
                "SELECT pg_notify(%s, 'acc_bench' || %s || ' ch_' || g)"
                " FROM generate_series(1, %s) g",
                (CHANNEL, i % 7, k),
            )


def one_round(way: str, dsn: str, transactions: int, k: int) -> float:
    me = [sys.executable, __file__, "--dsn", dsn, "--transactions", str(transactions)]
    me += ["--k", str(k)]
    sub = subprocess.Popen([*me, "--listener", way], stdout=subprocess.PIPE, text=True)
    assert sub.stdout is not None
    line = sub.stdout.readline()
    if line.strip() != "ready":
        sub.kill()
        raise RuntimeError(f"the {way} listener did not start: {line!r}")
    subprocess.run([*me, "--send"], check=True, timeout=600)
    out, _ = sub.communicate(timeout=300)
    for ln in out.splitlines():
        if ln.startswith("cpu_us_per_note "):
            return float(ln.split()[1])
    raise RuntimeError(f"the {way} listener printed no figure: {out!r}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="smoke run: 200 transactions, 1 round")
    ap.add_argument("--dsn", help="a PostgreSQL to use (default: an embedded one of its own)")
    ap.add_argument("--transactions", type=int, help="transactions a round (default 3,000)")
    ap.add_argument("--k", type=int, default=66, help="notifications a transaction")
    ap.add_argument("--rounds", type=int, help="rounds a way (default 3)")
    ap.add_argument("--listener", choices=WAYS, help=argparse.SUPPRESS)
    ap.add_argument("--send", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    transactions = args.transactions or (200 if args.quick else 3000)
    if args.listener:
        listener(args.listener, args.dsn, transactions * args.k)
        return 0
    if args.send:
        send(args.dsn, transactions, args.k)
        return 0
    rounds = args.rounds or (1 if args.quick else 3)
    with tempfile.TemporaryDirectory(prefix="opensense-listen-") as tmp:
        dsn = args.dsn or pg.embedded_dsn(Path(tmp))
        try:
            print(
                f"LISTEN: {transactions:,} transactions of {args.k} notifications a round;"
                f" {pg.describe(dsn, not args.dsn)}"
            )
            former, now = alternate(
                WAYS,
                rounds,
                lambda way: one_round(way, dsn, transactions, args.k),
                "µs a notification",
                "6.2f",
            )
        finally:
            if not args.dsn:
                pg.stop_embedded(Path(tmp))
    print()
    print("listener CPU a notification (median round)")
    print(f"  psycopg notifies() (the baseline)   {former:6.2f} µs")
    print(f"  aio.listen (libpq input)            {now:6.2f} µs   ratio {now / former:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
