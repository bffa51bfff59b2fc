"""OpenSense calm-batch statement benchmark (issue 14): what PostgreSQL spends on the
batch writer's statement when it settles a fleet batch's calm readings, and how much
of it is the dashboard's live trigger, with the trigger's function as migration 0026
defined it (channels found by their text id, the baseline) and as migration 0033
defines it (by their number), in the same run.

A PostgreSQL of the bench's own (embedded; `--dsn` for another, a superuser's: the
bench loads auto_explain in its session). A scratch database migrated by this tree,
C channels with the chilled-storage range rule made by SQL (as tools/bench/evaluator),
each with a state row the writer may settle: ok, its band -2..+5 °C at its current
`meta_rev`, judged an hour ago, its checkpoint there. Each statement is
storage/batcher.py's PLAIN_BATCH_SQL with one in-band reading on each of 66 channels
drawn at random (about one fleet batch: 22 messages of 3), all offered to the calm
look-up: each is settled (but a channel drawn again within 5 s of reading time, which
is marked), and the statement's UPDATE fires the live trigger on those rows. auto_explain (durations only, nested statements) gives each statement's
time and its trigger query's inside it; a way's figure is the median over a round,
and the rounds alternate the ways. Durations are executor wall time in the backend
(one connection, nothing else running), not CPU; the fleet bench has the whole.

    tools/bench/calmsql                   # 72,000 channels, 4 rounds of 60 statements a way
    tools/bench/calmsql --channels 14400  # the fleet bench's first point
    tools/bench/calmsql --quick           # 2,000 channels, 1 round of 10 (a smoke run)
"""

from __future__ import annotations

import argparse
import random
import re
import statistics
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))

import evaluator as evaluator_bench  # noqa: E402

from _lib import pg  # noqa: E402
from opensense.db import arrays  # noqa: E402
from opensense.storage import batcher, write  # noqa: E402

MIGRATIONS = Path(__file__).resolve().parents[2] / "server/opensense/db/migrations"
BATCH = 66
DURATION = re.compile(r"duration: ([\d.]+) ms")


def _function(migration: str, start: str, end: str | None) -> str:
    """A migration's CREATE FUNCTION of the live trigger, as CREATE OR REPLACE."""
    text = (MIGRATIONS / migration).read_text()
    body = text[text.index(start) : text.index(end) if end else None]
    return body.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1)


WAYS = {
    "by channels.id (0026, the baseline)": _function(
        "0026_alarm_state_saves.sql", "CREATE FUNCTION live_notify_channel_saves", "DROP TRIGGER"
    ),
    "by channels.num (0033)": _function(
        "0033_live_notify_by_num.sql", "CREATE OR REPLACE FUNCTION", None
    ),
}


def prepare(dsn: str, channels: int, now: datetime) -> list[int]:
    """The channels, their rules and calm state rows; their numbers."""
    sides = evaluator_bench.setup(dsn, channels // 2)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO alarm_state (channel_num, channel_id, status, last_ts, cp_last,"
            " cp_first, calm_lo, calm_hi, rules, events)"
            " SELECT num, id, 'ok', %s, %s, %s, -2, 5, '{}', '{}' FROM channels"
            " ON CONFLICT (channel_num) DO NOTHING",
            (now - timedelta(hours=1), now - timedelta(hours=1), now - timedelta(hours=1)),
        )
        conn.execute("UPDATE alarm_state SET calm_rev = meta_rev")
        conn.execute("VACUUM ANALYZE")
    return sides["now"] + sides["baseline"]


def one_round(
    conn: psycopg.Connection[object],
    notes: list[str],
    nums: list[int],
    n: int,
    t: datetime,
    now: datetime,
) -> tuple[float, float, int]:
    """n statements at reading time t (+0.1 s each): the medians of the statement's and
    its trigger query's durations (µs, from auto_explain's `notes`), and how many
    channels were settled."""
    count = "SELECT count(*) FROM alarm_state WHERE last_ts >= %s"
    before = int(conn.execute(count, (t,)).fetchone()[0])  # type: ignore[index]
    notes.clear()
    for i in range(n):
        rows = [
            (num, t + timedelta(seconds=0.1 * i), 3.0 + random.random())
            for num in sorted(random.sample(nums, BATCH))
        ]
        calm = arrays.int4s([r[0] for r in rows])
        conn.execute(
            batcher.PLAIN_BATCH_SQL,
            {**write.columns(rows), "now": now, "devices": [], "calm": calm},
        ).fetchall()
    trig = [float(m.group(1)) * 1000 for x in notes if "live_new" in x if (m := DURATION.search(x))]
    stmt = [
        float(m.group(1)) * 1000 for x in notes if "WITH src AS" in x if (m := DURATION.search(x))
    ]
    conn.execute("TRUNCATE alarm_dirty")  # (a channel drawn twice in a round was marked)
    settled = int(conn.execute(count, (t,)).fetchone()[0]) - before  # type: ignore[index]
    if len(stmt) != n or len(trig) != n:
        raise RuntimeError(f"auto_explain logged {len(stmt)} statements, {len(trig)} triggers")
    return statistics.median(stmt), statistics.median(trig), settled


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="smoke run: 2,000 channels, 10 x 1")
    ap.add_argument("--dsn", help="a superuser's DSN of a PostgreSQL to use (default: embedded)")
    ap.add_argument("--channels", type=int, help="channels with a calm state (default 72,000)")
    ap.add_argument("--statements", type=int, help="statements a round (default 60)")
    ap.add_argument("--rounds", type=int, help="rounds a way (default 4)")
    args = ap.parse_args(argv)
    channels = args.channels or (2000 if args.quick else 72000)
    n = args.statements or (10 if args.quick else 60)
    rounds = args.rounds or (1 if args.quick else 4)
    now = datetime.now(UTC).replace(microsecond=0)
    print(f"calm batch statement: {channels:,} channels, {BATCH} readings a statement;")
    with pg.admin_server(args.dsn, "opensense-calmsql-") as admin:
        with pg.scratch(admin, "opensense_bench_calmsql") as dsn:
            pg.migrate(dsn)
            nums = prepare(dsn, channels, now)
            got: dict[str, list[tuple[float, float]]] = {w: [] for w in WAYS}
            with psycopg.connect(dsn, autocommit=True) as conn:
                notes: list[str] = []
                conn.add_notice_handler(lambda d: notes.append(d.message_primary or ""))
                conn.execute("SET synchronous_commit = off")  # (the commit is not measured)
                conn.execute("LOAD 'auto_explain'")
                conn.execute("SET auto_explain.log_min_duration = 0")
                conn.execute("SET auto_explain.log_nested_statements = on")
                conn.execute("SET client_min_messages = log")
                # each round's readings more than CALM_QUIET_S after the last round's
                # and all within 10 minutes of the checkpoint: every one is settled
                t, step = now - timedelta(minutes=59), timedelta(seconds=0.1 * n + 6)
                if 2 * rounds * step >= timedelta(minutes=9):
                    ap.error("--rounds x --statements too many: the checkpoint falls due")
                for r in range(rounds):
                    for way, function in WAYS.items():
                        conn.execute(function)
                        stmt, trig, settled = one_round(conn, notes, nums, n, t, now)
                        t += step
                        got[way].append((stmt, trig))
                        print(
                            f"  round {r + 1}  {way:<36} statement {stmt:6.0f} µs,"
                            f" trigger {trig:5.0f} µs ({settled} channels settled)",
                            flush=True,
                        )
    print()
    print("median round: the statement, and the live trigger's query inside it")
    base = None
    for way, v in got.items():
        stmt = statistics.median(s for s, _ in v)
        trig = statistics.median(t for _, t in v)
        ratio = "" if base is None else f"   ratio {trig / base:.2f}"
        base = trig if base is None else base
        print(f"  {way:<36} statement {stmt:6.0f} µs   trigger {trig:5.0f} µs{ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
