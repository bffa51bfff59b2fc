"""OpenSense rule-engine cost benchmark: CPU per evaluated reading of the evaluator's
pass (`alarms.evaluator.evaluate_dirty`), the code as it is against the code at a
baseline git revision, in one run against one database (issue 14, "ingest cost").

Setup: one account, N channels per side (default 256; 16 a device) with the default
range rule (ok -2..5 °C, grace 15 min), two sides of their own: "baseline" and "now".
The baseline is `server/opensense` at `--rev` (default 81fe07d, main when the work
began), taken with `git archive` into the work directory and put first on the path
of its own worker process; "now" is this tree's code in another worker process.
Each worker keeps one connection (a pool of 1) and is long-lived, so both are warm;
a side whose code has the background evaluator's `MetaCache` (stop 30) keeps one
across its passes, as the server does.

Rounds: each round writes M new readings (default 32, one a minute) to every channel
of a side through the server's own write statement (`storage.batcher.BATCH_SQL`),
then tells that side's worker to run passes (128 channels a pass, no time budget)
until nothing is dirty; the sides alternate, and take turns going first. Every 16th
channel goes out of range for 40 minutes of readings, so alarms open, peak and
clear on both sides the same way. A worker measures its own CPU (the evaluator's
Python: engine steps, state JSON in and out, psycopg's adaptation) and its
PostgreSQL backend's (psutil on its pid; "n/a" when PostgreSQL is elsewhere) around
the passes only. Printed: µs per evaluated reading and per channel-pass for each
side, the ratio now/baseline, and a check that both sides ended in the same alarm
states and events (rule ids aside): the same decisions.

    tools/bench/evaluator                 # 256 channels x 32 readings x 12 rounds (~1 min)
    tools/bench/evaluator --readings 1    # the trickle shape: one new reading a channel a pass
    tools/bench/evaluator --quick         # 32 channels, 4 rounds (a smoke run)
    tools/bench/evaluator --aged          # states a day old: 150 checkpoints a channel
    tools/bench/evaluator --rev HEAD~3 --dsn postgresql://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from _lib import pg, runner
from _lib.cpu import process_cpu as _cpu
from _lib.report import fmt, ratio, say

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_REV = "81fe07d"  # main at the start of issue 14's rule-engine work (2026-12-03 21:50Z)
PER_DEV = 16


def setup(dsn: str, per_side: int) -> dict[str, list[int]]:
    """Account, site, devices, channels and their range rules by SQL; channel nums per side."""
    from opensense.ids import new_id

    out: dict[str, list[int]] = {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        acc, site = new_id("acc"), new_id("site")
        conn.execute(
            "INSERT INTO accounts (id, name, email) VALUES (%s, 'Bench', 'b@x.invalid')", (acc,)
        )
        conn.execute(
            "INSERT INTO sites (id, account_id, name, vertical, timezone)"
            " VALUES (%s, %s, 'Bench', 'chilled_storage', 'Europe/Berlin')",
            (site, acc),
        )
        for side in ("baseline", "now"):
            devs = [new_id("dev") for _ in range((per_side + PER_DEV - 1) // PER_DEV)]
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO devices (id, account_id, site_id, local_id, name)"
                    " VALUES (%s, %s, %s, %s, %s)",
                    [(d, acc, site, f"{side[0]}{i:05d}", f"node {i}") for i, d in enumerate(devs)],
                )
                chans = [
                    (new_id("chn"), new_id("snr"), acc, devs[i // PER_DEV], f"p{i % PER_DEV}")
                    for i in range(per_side)
                ]
                cur.executemany(
                    "INSERT INTO channels (id, sensor_id, account_id, device_id, kind, label,"
                    " unit, name) VALUES (%s, %s, %s, %s, 'temperature', %s, '°C', 'fridge')",
                    chans,
                )
                cur.executemany(
                    "INSERT INTO rules (id, channel_id, kind, params, grace_min, is_default)"
                    " VALUES (%s, %s, 'range', %s, 15, true)",
                    [(new_id("rul"), c[0], Jsonb({"ok_min": -2.0, "ok_max": 5.0})) for c in chans],
                )
            ids = [c[0] for c in chans]
            got: dict[str, int] = dict(
                conn.execute("SELECT id, num FROM channels WHERE id = ANY(%s)", (ids,)).fetchall()
            )
            out[side] = [int(got[i]) for i in ids]
    return out


# A day's checkpoints (one per 10 minutes over the 25 hours kept) before each state's
# newest judged reading, each with the channel's rule states of then, as a server's
# states hold after a day (alarms/evaluator.py CHECKPOINT_EVERY, CHECKPOINT_KEEP); the
# bench's own run is minutes long and its states hold a few. cp_first and cp_last
# follow when the schema has them (migration 0029).
_ISO = """to_char(t AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"+00:00"')"""
AGE_SQL = f"""
UPDATE alarm_state s SET checkpoints = (
  SELECT jsonb_agg(jsonb_build_array({_ISO},
    (SELECT coalesce(jsonb_object_agg(k, v || jsonb_build_object('last_ts', {_ISO})), '{{}}')
     FROM jsonb_each(s.rules) AS e(k, v)), '{{}}'::jsonb) ORDER BY t)
  FROM generate_series(s.last_ts - interval '1500 minutes', s.last_ts - interval '10 minutes',
                       interval '10 minutes') AS t)
WHERE s.channel_num = ANY(%s) AND s.last_ts IS NOT NULL
"""
AGE_TIMES_SQL = """
UPDATE alarm_state SET cp_first = (checkpoints -> 0 ->> 0)::timestamptz,
  cp_last = (checkpoints -> -1 ->> 0)::timestamptz
WHERE channel_num = ANY(%s)
"""
# code with migration 0030 keeps them in rows of their own: moved there as it moves them
AGE_ROWS_SQL = """
INSERT INTO alarm_checkpoints (channel_num, at, cp)
SELECT s.channel_num, (e.c ->> 0)::timestamptz, e.c
FROM alarm_state s, jsonb_array_elements(s.checkpoints) WITH ORDINALITY AS e(c, i)
WHERE s.channel_num = ANY(%s) ORDER BY s.channel_num, e.i
"""
AGE_EMPTY_SQL = "UPDATE alarm_state SET checkpoints = '[]'::jsonb WHERE channel_num = ANY(%s)"
ROWS_MIGRATION = "opensense/db/migrations/0030_alarm_checkpoints_table.sql"


async def age(conn: Any, nums: list[int], rows: bool) -> None:
    """Give these states a day of checkpoints; `rows`: the side's code keeps them in
    alarm_checkpoints (migration 0030), else in the alarm_state array."""
    await conn.execute(AGE_SQL, (nums,))
    cur = await conn.execute(
        "SELECT 1 FROM information_schema.columns"
        " WHERE table_name = 'alarm_state' AND column_name = 'cp_first'"
    )
    if await cur.fetchone():
        await conn.execute(AGE_TIMES_SQL, (nums,))
    cur = await conn.execute(
        "SELECT count(*), min(jsonb_array_length(checkpoints)),"
        " max(jsonb_array_length(checkpoints)), avg(pg_column_size(checkpoints))"
        " FROM alarm_state WHERE channel_num = ANY(%s)",
        (nums,),
    )
    n, lo, hi, size = await cur.fetchone()
    if rows:
        await conn.execute(AGE_ROWS_SQL, (nums,))
        await conn.execute(AGE_EMPTY_SQL, (nums,))
    say(
        f"aged: {n} states, {lo}..{hi} checkpoints each"
        + (
            " (in rows of their own)"
            if rows
            else f" ({float(size or 0) / 1024:.1f} kB stored, compressed)"
        )
    )


def value(i: int, k: int) -> float:
    """Channel i's k-th reading: a fridge at 3-4 °C; every 16th channel out of range
    (8 °C) for readings 20..59 of every 120: an alarm opens, peaks and clears."""
    if i % 16 == 0 and 20 <= k % 120 < 60:
        return 8.0 + (k % 120) * 0.01
    return 3.0 + (k % 7) * 0.1 + (i % 5) * 0.05


# --- the worker: one per side, the evaluator of that side's code ---------------------------


async def worker(dsn: str, limit: int, profile: str | None) -> None:
    """Read a line per round from stdin, run passes until nothing is dirty, answer
    one JSON line: CPU seconds of this process and of the backend, readings, channels."""
    from psycopg_pool import AsyncConnectionPool

    from opensense.alarms import evaluator

    prof = cProfile.Profile() if profile else None
    async with AsyncConnectionPool(dsn, min_size=1, max_size=1, open=False) as pool:
        async with pool.connection() as c:
            row = await (await c.execute("SELECT pg_backend_pid()")).fetchone()
        backend = int(row[0]) if row else None
        if _cpu(backend) is None:
            backend = None
        # the background evaluator's cache of the channels' rules, kept across passes as
        # the server keeps it (alarms/tasks.py), when the side's code has one
        kept: dict[str, Any] = (
            {"metas": evaluator.MetaCache()} if hasattr(evaluator, "MetaCache") else {}
        )
        print(json.dumps({"ready": evaluator.__file__}), flush=True)
        loop = asyncio.get_running_loop()
        while (line := await loop.run_in_executor(None, sys.stdin.readline)).strip():
            now = datetime.fromisoformat(line.strip())
            me0, be0, t0 = time.process_time(), _cpu(backend), time.perf_counter()
            passes = channels = readings = 0
            if prof is not None:
                prof.enable()
            while True:
                st = await evaluator.evaluate_dirty(pool, now, limit=limit, budget_s=60, **kept)
                if not st.readings:
                    break
                passes += 1
                channels += st.channels
                readings += st.readings
            if prof is not None:
                prof.disable()
            wall = time.perf_counter() - t0
            me1, be1 = time.process_time(), _cpu(backend)
            res = {
                "cpu": me1 - me0,
                "pg": (be1 - be0) if be0 is not None and be1 is not None else None,
                "wall": wall,
                "passes": passes,
                "channels": channels,
                "readings": readings,
            }
            print(json.dumps(res), flush=True)
        if prof is not None and profile:
            prof.dump_stats(profile)


@dataclass
class Side:
    name: str
    nums: list[int]
    proc: subprocess.Popen[str]
    cpu: float = 0.0
    pg: float | None = 0.0
    wall: float = 0.0
    passes: int = 0
    channels: int = 0
    readings: int = 0
    per_round: list[float] = field(default_factory=list)


def baseline_tree(work: Path, rev: str) -> Path:
    """server/opensense at `rev`, in the work directory (its parent goes on PYTHONPATH)."""
    dest = work / "baseline"
    dest.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "server/opensense"],
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest / "server"


def start_worker(
    dsn: str, limit: int, pythonpath: Path | None, profile: str | None = None
) -> subprocess.Popen[str]:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.Popen(
        [sys.executable, str(Path(__file__)), "--worker", "--dsn", dsn, "--limit", str(limit)]
        + (["--profile", profile] if profile else []),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=str(ROOT / "tools" / "bench"),
    )


def ask(side: Side, now: datetime) -> dict[str, Any]:
    assert side.proc.stdin is not None and side.proc.stdout is not None
    side.proc.stdin.write(now.isoformat() + "\n")
    side.proc.stdin.flush()
    line = side.proc.stdout.readline()
    if not line:
        raise RuntimeError(f"the {side.name} worker ended (exit {side.proc.wait()})")
    res: dict[str, Any] = json.loads(line)
    return res


def decisions(dsn: str, nums: list[int]) -> list[Any]:
    """What the engine decided for these channels, in channel order, rule ids aside:
    each channel's status, rule states and events (kind, start, end, worst value)."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT s.status, s.last_ts, s.due_at,"
            " (SELECT jsonb_agg(v) FROM jsonb_each(s.rules) AS e(k, v)),"
            " (SELECT jsonb_agg(jsonb_build_array(e.kind, e.started_at, e.alarm_at, e.cleared_at,"
            "   e.state, e.value) ORDER BY e.started_at) FROM events e WHERE e.channel_id = s.channel_id)"
            " FROM unnest(%s::int4[]) WITH ORDINALITY AS u(num, i)"
            " JOIN alarm_state s ON s.channel_num = u.num ORDER BY u.i",
            (nums,),
        ).fetchall()
    return [[str(c) for c in r] for r in rows]


async def run(frame: runner.Frame, args: argparse.Namespace) -> None:
    from opensense.db import arrays
    from opensense.storage.batcher import BATCH_SQL

    n = args.channels or (32 if args.quick else 256)
    m = args.readings
    rounds = args.rounds or (4 if args.quick else 12)
    with pg.scratch(frame.dsn, "opensense_bench_evaluator") as dsn:
        pg.migrate(dsn)
        nums = setup(dsn, n)
        base_path = baseline_tree(frame.work, args.rev)
        sides = {
            "baseline": Side(
                "baseline", nums["baseline"], start_worker(dsn, args.limit, base_path)
            ),
            "now": Side("now", nums["now"], start_worker(dsn, args.limit, None, args.profile)),
        }
        try:
            for s in sides.values():
                assert s.proc.stdout is not None
                ready = json.loads(s.proc.stdout.readline() or "{}").get("ready", "?")
                say(f"{s.name}: {ready}")
            t0 = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(
                minutes=m * (rounds + 1) + 60
            )
            async with await pg.connect(dsn) as conn:
                for k in range(-1, rounds):  # round -1: a warm-up, not counted
                    if k == 0 and args.aged:
                        for name, tree in (("baseline", base_path), ("now", ROOT / "server")):
                            await age(conn, nums[name], (tree / ROWS_MIGRATION).exists())
                    order = ["baseline", "now"] if k % 2 else ["now", "baseline"]
                    for name in order:
                        s = sides[name]
                        ts, ns, vals = [], [], []
                        for j in range(m):
                            t = t0 + timedelta(minutes=(k + 1) * m + j)
                            for i, num in enumerate(s.nums):
                                ns.append(num)
                                ts.append(t)
                                vals.append(value(i, (k + 1) * m + j))
                        now = t0 + timedelta(minutes=(k + 2) * m)
                        await conn.execute(
                            BATCH_SQL,
                            # no channel offered to the writer's calm look-up
                            # (storage/batcher.py CALM_CTE): every reading is the engine's
                            {
                                "nums": ns,
                                "ts": ts,
                                "vals": vals,
                                "now": now,
                                "devices": [],
                                "calm": arrays.int4s([]),
                            },
                        )
                        res = await asyncio.to_thread(ask, s, now)
                        if res["readings"] != len(ns):
                            raise RuntimeError(f"{name}: judged {res['readings']} of {len(ns)}")
                        if k < 0:
                            continue
                        s.cpu += res["cpu"]
                        s.pg = None if s.pg is None or res["pg"] is None else s.pg + res["pg"]
                        s.wall += res["wall"]
                        s.passes += res["passes"]
                        s.channels += res["channels"]
                        s.readings += res["readings"]
                        s.per_round.append(res["cpu"] / res["readings"] * 1e6)
        finally:
            for s in sides.values():
                if s.proc.stdin is not None:
                    s.proc.stdin.close()
                s.proc.wait(30)
        load = os.getloadavg()
        say()
        say(
            f"evaluation passes: {n} channels a side x {m} new readings a round x {rounds}"
            f" rounds, {args.limit} channels a pass"
            + (", states a day old (150 checkpoints a channel)" if args.aged else "")
            + f"; baseline = server/opensense at {args.rev};"
            f" load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
        )
        say(
            f"{'side':10} {'server µs':>10} {'PG µs':>8} {'total µs':>9}  {'(per reading)':14}"
            f" {'server µs':>10}  {'rounds min..max':>16} {'passes':>7}"
        )
        say(f"{'':10} {'':>10} {'':>8} {'':>9}  {'':14} {'a channel':>10}")
        base = sides["baseline"]
        for s in sides.values():
            r = max(1, s.readings)
            srv = s.cpu / r * 1e6
            pgu = s.pg / r * 1e6 if s.pg is not None else float("nan")
            tot = srv + (pgu if s.pg is not None else 0.0)
            b = base.cpu / max(1, base.readings) * 1e6
            b_tot = b + (base.pg / max(1, base.readings) * 1e6 if base.pg is not None else 0.0)
            say(
                f"{s.name:10} {srv:>10.1f} {fmt(pgu, 1):>8} {tot:>9.1f}  {'':14}"
                f" {s.cpu / max(1, s.channels) * 1e6:>10.0f}"
                f"  {min(s.per_round):>7.1f}..{max(s.per_round):<7.1f} {s.passes:>7}"
                + (
                    ""
                    if s is base
                    else f"   (server x{ratio(srv, b):.2f}, total x{ratio(tot, b_tot):.2f})"
                )
            )
        same = decisions(dsn, nums["baseline"]) == decisions(dsn, nums["now"])
        with psycopg.connect(dsn) as c:
            row = c.execute(
                "SELECT count(*) FROM events e JOIN channels ch ON ch.id = e.channel_id"
                " WHERE ch.num = ANY(%s)",
                (nums["now"],),
            ).fetchone()
        n_events = row[0] if row else 0
        say(
            f"same decisions on both sides (states, events; {n_events} events a side):"
            f" {'yes' if same else 'NO'}"
        )
        if not same:
            raise RuntimeError("the two sides decided differently")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dsn", help="PostgreSQL server (admin DSN) to make a scratch database on")
    ap.add_argument("--channels", type=int, help="channels a side (default 256, --quick 32)")
    ap.add_argument("--readings", type=int, default=32, help="new readings a channel a round")
    ap.add_argument("--rounds", type=int, help="measured rounds (default 12, --quick 4)")
    ap.add_argument("--limit", type=int, default=128, help="channels a pass (the server's 128)")
    ap.add_argument(
        "--aged",
        action="store_true",
        help="states a day old before the measured rounds: 150 checkpoints a channel",
    )
    ap.add_argument("--rev", default=DEFAULT_REV, help="git revision of the baseline code")
    ap.add_argument(
        "--profile", help="cProfile the passes of the 'now' side into this file (pstats)"
    )
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        asyncio.run(worker(args.dsn, args.limit, args.profile))
        return 0
    return runner.run("evaluator", args.dsn, lambda frame: run(frame, args))


if __name__ == "__main__":
    sys.exit(main())
