"""The code of another commit, measured in the same run (`tools/bench/ingest
--baseline-rev REV`).

A bench's figures move with the box: the same code measured an hour apart on this
2-core machine differed by half. A ratio against a constant measured on another day
is only as good as that day's box, so the baseline is measured in the same run,
beside the code under test, on the same PostgreSQL server:

- `extract(rev, into)`: `git archive REV server` into a directory of the run's own;
  the old package is then imported through PYTHONPATH (it shadows the editable
  install of the working tree, in the bench's subprocesses only).
- `prepare(...)`: a database of its own in the same cluster, migrated by the old
  code, with the bench's account and devices made by the old code's service layer:
  run as this module in a subprocess with PYTHONPATH set (`python -m _lib.baseline`),
  since the old schema is not the new one. It prints the app role's DSN and the
  devices' tokens as one JSON line.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from .http_load import Dev

ROOT = Path(__file__).resolve().parents[3]
BENCH = Path(__file__).resolve().parents[1]


def extract(rev: str, into: Path) -> str:
    """The tree of `rev`'s server package in `into`; returns the commit's short hash."""
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", f"{rev}^{{commit}}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.Popen(
        ["git", "-C", str(ROOT), "archive", commit, "server"], stdout=subprocess.PIPE
    )
    subprocess.run(["tar", "-x", "-C", str(into)], stdin=archive.stdout, check=True)
    if archive.wait() != 0:
        raise RuntimeError(f"git archive {commit} server failed")
    return commit


def env(tree: Path) -> dict[str, str]:
    """The environment that makes a subprocess import the old code."""
    return {"PYTHONPATH": os.pathsep.join([str(tree / "server"), str(BENCH)])}


def database_name(dsn: str) -> str:
    """The baseline's database: `dsn`'s name with `_baseline` added."""
    return f"{psycopg.conninfo.conninfo_to_dict(dsn).get('dbname') or 'opensense'}_baseline"


def database_dsn(dsn: str) -> str:
    """A fresh database of its own beside `dsn`'s (a superuser's DSN): dropped if an
    earlier run left it, created anew."""
    drop(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database_name(dsn))))
    return psycopg.conninfo.make_conninfo(dsn, dbname=database_name(dsn))


def drop(dsn: str) -> None:
    """The baseline's database, once its server is stopped."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        ident = sql.Identifier(database_name(dsn))
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))


def prepare(tree: Path, dsn: str, rounds: int, n: int, now: datetime) -> tuple[str, list[Dev]]:
    """Migrate `dsn` (a superuser's, its own database) and make `n` devices with the
    code in `tree`; returns the app role's DSN and the devices."""
    out = subprocess.run(
        [sys.executable, "-m", "_lib.baseline", dsn, str(rounds), str(n), now.isoformat()],
        cwd=BENCH,
        env={**os.environ, **env(tree)},
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        raise RuntimeError(f"preparing the baseline failed: {out.stderr.strip()[-800:]}")
    got: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    devs = [
        Dev(
            d["local_id"],
            d["headers"],
            datetime.fromisoformat(d["next_ts"]),
            datetime.fromisoformat(d["limit"]),
        )
        for d in got["devs"]
    ]
    return str(got["app_dsn"]), devs


async def _prepare(dsn: str, rounds: int, n: int, now: datetime) -> dict[str, Any]:
    # imported here: under the old code's PYTHONPATH, these import the old package
    from . import pg
    from .fleet import ingest_devices

    app_dsn = await asyncio.to_thread(pg.serving_dsn, dsn)
    _, devs = await ingest_devices(dsn, rounds, n, now)
    return {
        "app_dsn": app_dsn,
        "devs": [
            {
                "local_id": d.local_id,
                "headers": d.headers,
                "next_ts": d.next_ts.isoformat(),
                "limit": d.limit.isoformat(),
            }
            for d in devs
        ],
    }


if __name__ == "__main__":
    a_dsn, a_rounds, a_n, a_now = sys.argv[1:5]
    print(
        json.dumps(
            asyncio.run(_prepare(a_dsn, int(a_rounds), int(a_n), datetime.fromisoformat(a_now)))
        )
    )
