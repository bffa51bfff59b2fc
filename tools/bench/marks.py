"""OpenSense wake-up marks benchmark (issue 14): what the rule engine's wake-up marks
(`alarm_dirty`, storage/write.py DIRTY_SQL) cost the batch writer's statement in
PostgreSQL when every reading of a batch is its own channel, as in the ingest bench's
HTTP 32 phase (64 requests of 32 probes read at one instant: ~2,000 channels a
statement, each marked already and claimed now and then by the engine).

A PostgreSQL of the bench's own (embedded; `--dsn` for another, a superuser's). A
scratch database migrated by this tree, C channels with the chilled-storage range
rule made by SQL (as tools/bench/evaluator), every one marked. Each statement stores
one new reading on every channel (a minute after the last), as
storage/batcher.py's PLAIN_STREAM_BATCH_SQL (the statement a stream's batch runs);
before it, 5 % of the marks are deleted, as the engine's claims would have (so that
share of the upserts inserts a row anew, the rest finds its row and locks it). Ways,
alternating round by round, the same rows:

- as the server runs it;
- without the marks: the statement with its `dirty` CTE taken out. Not a statement
  the server could run (the engine would never hear of the readings): the floor that
  prices the marks.

A way's figure is the median statement of a round, then the median round: the
backend's CPU (its scheduler's run time; wall time where PostgreSQL is elsewhere) and wall
time, per row. Commits are asynchronous (`synchronous_commit = off`): the WAL flush,
the same either way, is not measured.

    tools/bench/marks                   # 2,048 channels, 6 rounds of 20 statements a way
    tools/bench/marks --channels 512    # smaller statements
    tools/bench/marks --quick           # 256 channels, 1 round of 5 (a smoke run)
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))

import evaluator as evaluator_bench  # noqa: E402

from _lib import pg  # noqa: E402
from _lib.report import ratio  # noqa: E402
from opensense.db import arrays  # noqa: E402
from opensense.storage import batcher, write  # noqa: E402

CLAIMED = 0.05  # the share of marks the engine claimed between two statements

WAYS = {
    "as the server runs it": batcher.PLAIN_STREAM_BATCH_SQL,
    "without the marks (floor)": batcher.PLAIN_STREAM_BATCH_SQL.replace(write.DIRTY_SQL, ""),
}
assert WAYS["as the server runs it"] != WAYS["without the marks (floor)"]


def prepare(dsn: str, channels: int, now: datetime) -> list[int]:
    """The channels, every one marked; their numbers. The rollups' threshold is set a
    day before the readings, so none is late (as a node's fresh reading)."""
    sides = evaluator_bench.setup(dsn, (channels + 1) // 2)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "UPDATE rollup_state SET threshold = %s, materialized = %s",
            (now - timedelta(days=3), now - timedelta(days=3)),
        )
        conn.execute(
            "INSERT INTO alarm_dirty (channel_num, since) SELECT num, %s FROM channels",
            (now - timedelta(days=2),),
        )
        conn.execute("VACUUM ANALYZE")
    return sorted(sides["now"] + sides["baseline"])[:channels]


class Backend:
    """The CPU seconds of a connection's backend: its scheduler's run time
    (/proc/<pid>/schedstat, nanoseconds; psutil's CPU times tick in 10 ms, half a
    statement), None where PostgreSQL is not on this machine."""

    def __init__(self, conn: psycopg.Connection[object]) -> None:
        self._path: Path | None = Path(f"/proc/{conn.info.backend_pid}/schedstat")
        if self.cpu() is None:
            self._path = None

    def cpu(self) -> float | None:
        if self._path is None:
            return None
        try:
            return int(self._path.read_text().split()[0]) / 1e9
        except (OSError, ValueError, IndexError):
            return None


def one_round(
    conn: psycopg.Connection[object],
    backend: Backend,
    sql: str,
    nums: list[int],
    n: int,
    t: datetime,
    now: datetime,
) -> tuple[float, float]:
    """n statements, their readings at t + 1 min each: the medians of the backend's CPU
    (wall where not measurable) and of wall time, µs a row."""
    cpu: list[float] = []
    wall: list[float] = []
    for i in range(n):
        ts = t + timedelta(minutes=i)
        rows = [(num, ts, 3.0 + random.random()) for num in nums]
        params = {**write.columns(rows), "now": now, "devices": [], "calm": arrays.int4s([])}
        conn.execute(
            "DELETE FROM alarm_dirty WHERE channel_num = ANY(%s)",
            (random.sample(nums, max(1, int(len(nums) * CLAIMED))),),
        )
        c0, w0 = backend.cpu(), time.perf_counter()
        conn.execute(sql, params).fetchall()
        w = time.perf_counter() - w0
        c1 = backend.cpu()
        wall.append(w / len(nums) * 1e6)
        cpu.append((c1 - c0 if c0 is not None and c1 is not None else w) / len(nums) * 1e6)
    return statistics.median(cpu), statistics.median(wall)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="smoke run: 256 channels, 5 x 1")
    ap.add_argument("--dsn", help="a superuser's DSN of a PostgreSQL to use (default: embedded)")
    ap.add_argument("--channels", type=int, help="channels, a reading each a statement (2,048)")
    ap.add_argument("--statements", type=int, help="statements a round (default 20)")
    ap.add_argument("--rounds", type=int, help="rounds a way (default 6)")
    args = ap.parse_args(argv)
    channels = args.channels or (256 if args.quick else 2048)
    n = args.statements or (5 if args.quick else 20)
    rounds = args.rounds or (1 if args.quick else 6)
    now = datetime.now(UTC).replace(microsecond=0)
    got: dict[str, list[tuple[float, float]]] = {w: [] for w in WAYS}
    print(f"wake-up marks: {channels:,} channels, a reading each a statement;")
    with pg.admin_server(args.dsn, "opensense-marks-") as admin:
        with pg.scratch(admin, "opensense_bench_marks") as dsn:
            pg.migrate(dsn)
            nums = prepare(dsn, channels, now)
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("SET synchronous_commit = off")
                backend = Backend(conn)
                what = "backend CPU" if backend.cpu() is not None else "wall (no CPU here)"
                # the readings go on a minute a statement from a day ago: all new
                t = now - timedelta(days=1)
                for r in range(rounds):
                    for way, sql in WAYS.items() if r % 2 == 0 else reversed(WAYS.items()):
                        cpu, wall = one_round(conn, backend, sql, nums, n, t, now)
                        t += timedelta(minutes=n)
                        got[way].append((cpu, wall))
                        print(
                            f"  round {r + 1}  {way:<28} {cpu:6.2f} µs a row {what},"
                            f" {wall:6.2f} wall",
                            flush=True,
                        )
    print()
    print("median round, µs a row:")
    med = {
        w: (statistics.median(c for c, _ in v), statistics.median(x for _, x in v))
        for w, v in got.items()
    }
    for way, (cpu, wall) in med.items():
        print(f"  {way:<28} {cpu:6.2f} {what}, {wall:6.2f} wall")
    full, floor = med["as the server runs it"][0], med["without the marks (floor)"][0]
    print(
        f"  the marks: {full - floor:.2f} µs a row, {ratio(full - floor, full):.0%} of the"
        f" statement's {what}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
