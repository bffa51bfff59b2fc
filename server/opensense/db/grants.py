"""What the app role may do on the tables (docs/operations.md, "Database roles").
Apart from db/roles.py because `db migrate` re-grants after every run, and the
roles' provisioning in turn migrates: each needs this, neither the other."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

# Tables whose rows the app may read and append but never change.
APPEND_ONLY = ("audit_log",)
# Tables the app may read, append and update (a run's outcome) but not delete from.
NO_DELETE = ("backup_runs",)
# Tables the app may only read.
READ_ONLY = ("schema_migrations",)
# SECURITY DEFINER functions the app may call (migration 0011).
APP_FUNCTIONS = (
    "opensense_create_partition(text, date)",
    "opensense_drop_partition(text)",
    "opensense_reindex_partition(text)",
)


def grant_app(conn: psycopg.Connection[Any], app: str) -> None:
    """As the owner, after the migrations: what the app role may do. Re-run by every
    `db migrate`, so tables of later migrations are covered too."""
    a = sql.Identifier(app)
    x = conn.execute
    x(sql.SQL("GRANT USAGE ON SCHEMA public TO {}").format(a))
    x(
        sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {}").format(
            a
        )
    )
    x(sql.SQL("GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {}").format(a))
    # partitions made later (by opensense_create_partition, as the owner) inherit these
    x(
        sql.SQL(
            "ALTER DEFAULT PRIVILEGES IN SCHEMA public"
            " GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {}"
        ).format(a)
    )
    x(
        sql.SQL(
            "ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT USAGE, SELECT ON SEQUENCES TO {}"
        ).format(a)
    )
    present = {
        r[0]
        for r in x(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = 'public'"
        ).fetchall()
    }
    for table, privileges in (
        *((t, "SELECT, INSERT") for t in APPEND_ONLY),
        *((t, "SELECT, INSERT, UPDATE") for t in NO_DELETE),
        *((t, "SELECT") for t in READ_ONLY),
    ):
        if table in present:
            x(sql.SQL("REVOKE ALL ON {} FROM {}").format(sql.Identifier(table), a))
            x(sql.SQL("GRANT {} ON {} TO {}").format(sql.SQL(privileges), sql.Identifier(table), a))
    if conn.info.server_version >= 170000:
        # PostgreSQL 17's MAINTAIN lets compaction VACUUM and REINDEX the packed months;
        # not on the append-only tables (an ACCESS EXCLUSIVE lock there stalls writers).
        x(
            sql.SQL(
                "ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT MAINTAIN ON TABLES TO {}"
            ).format(a)
        )
        for (table,) in x(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') AND NOT c.relname = ANY(%s)",
            (list(APPEND_ONLY + READ_ONLY),),
        ).fetchall():
            x(sql.SQL("GRANT MAINTAIN ON {} TO {}").format(sql.Identifier(table), a))
        for table in APPEND_ONLY + READ_ONLY:
            if table in present:
                x(sql.SQL("REVOKE MAINTAIN ON {} FROM {}").format(sql.Identifier(table), a))
    for fn in APP_FUNCTIONS:
        if x("SELECT to_regprocedure(%s)", (fn,)).fetchone() != (None,):
            x(sql.SQL("GRANT EXECUTE ON FUNCTION {} TO {}").format(sql.SQL(fn), a))
