"""The database roles: an owner that runs migrations and owns every table, an app
role the server connects as, and (for the restore test) a restricted role that may
create a scratch database and nothing else. docs/operations.md, "Database roles".

Why: whoever owns `audit_log` (or is a superuser) can switch its append-only trigger
off and delete the newest rows. The app role therefore holds SELECT and INSERT on it
and nothing more, and the server refuses to start as a superuser or as a member of
the role that owns the schema (`check_serving_role`).

Roles are cluster-wide: every step here is idempotent and tolerates a concurrent
process making the same role."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from . import embedded_dsn, migrate
from .grants import grant_app

OWNER_ROLE = "opensense_owner"
APP_ROLE = "opensense_app"
RESTORE_ROLE = "opensense_restore"


class UnsafeRole(RuntimeError):
    """The server was asked to connect as a role that could rewrite the audit trail."""


@dataclass(frozen=True)
class Roles:
    owner: str = OWNER_ROLE
    app: str = APP_ROLE
    restore: str = RESTORE_ROLE


@dataclass(frozen=True)
class Dsns:
    """The DSNs of one database for each role (embedded mode and tests)."""

    admin: str
    owner: str
    app: str
    restore: str  # the restore role's, on the maintenance database `postgres`


def with_user(dsn: str, user: str, dbname: str | None = None) -> str:
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    info["user"] = user
    info.pop("password", None)  # the embedded and test servers trust local connections
    if dbname is not None:
        info["dbname"] = dbname
    return psycopg.conninfo.make_conninfo("", **info)


def with_dbname(dsn: str, dbname: str) -> str:
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    info["dbname"] = dbname
    return psycopg.conninfo.make_conninfo("", **info)


def user_of(dsn: str) -> str | None:
    user = psycopg.conninfo.conninfo_to_dict(dsn).get("user")
    return str(user) if user else None


def _ensure_role(conn: psycopg.Connection[Any], name: str, createdb: bool) -> None:
    """LOGIN, not superuser, no CREATEROLE (it could grant itself the owner's
    rights); CREATEDB only for the restore role. Made or corrected, never dropped."""
    want = (False, False, createdb, True)
    for _ in range(5):  # a concurrent run may make or alter the same role
        row = conn.execute(
            "SELECT rolsuper, rolcreaterole, rolcreatedb, rolcanlogin FROM pg_roles"
            " WHERE rolname = %s",
            (name,),
        ).fetchone()
        attrs = sql.SQL("LOGIN NOSUPERUSER NOCREATEROLE {}").format(
            sql.SQL("CREATEDB" if createdb else "NOCREATEDB")
        )
        try:
            if row is None:
                conn.execute(sql.SQL("CREATE ROLE {} {}").format(sql.Identifier(name), attrs))
            elif tuple(row) != want:
                conn.execute(sql.SQL("ALTER ROLE {} {}").format(sql.Identifier(name), attrs))
            return
        except (
            psycopg.errors.DuplicateObject,
            psycopg.errors.UniqueViolation,
            psycopg.errors.InternalError,  # "tuple concurrently updated"
        ):
            continue
    raise RuntimeError(f"could not create or correct the PostgreSQL role {name}")


def ensure_roles(admin_dsn: str, roles: Roles) -> None:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        _ensure_role(conn, roles.owner, createdb=False)
        _ensure_role(conn, roles.app, createdb=False)
        _ensure_role(conn, roles.restore, createdb=True)


def provision(admin_dsn: str, database: str, roles: Roles) -> None:
    """As a superuser: the roles exist, `database` and everything in its public schema
    belongs to the owner role (an older release's database, migrated as a superuser,
    is handed over), and the app role may connect."""
    ensure_roles(admin_dsn, roles)
    ident = sql.Identifier
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = %s", (database,)
        ).fetchone()
        if row is not None and row[0] != roles.owner:
            conn.execute(
                sql.SQL("ALTER DATABASE {} OWNER TO {}").format(ident(database), ident(roles.owner))
            )
        # only what is missing: processes starting at once would otherwise race on
        # the same catalog rows ("tuple concurrently updated")
        if conn.execute(
            "SELECT has_database_privilege(%s, %s, 'CONNECT, TEMPORARY')", (roles.app, database)
        ).fetchone() != (True,):
            conn.execute(
                sql.SQL("GRANT CONNECT, TEMPORARY ON DATABASE {} TO {}").format(
                    ident(database), ident(roles.app)
                )
            )
    with psycopg.connect(with_dbname(admin_dsn, database)) as conn:
        ok = conn.execute(
            "SELECT has_schema_privilege(%s, 'public', 'USAGE, CREATE')"
            " AND NOT has_schema_privilege('public', 'public', 'CREATE')",
            (roles.owner,),
        ).fetchone()
        if ok != (True,):
            conn.execute(
                sql.SQL("GRANT USAGE, CREATE ON SCHEMA public TO {}").format(ident(roles.owner))
            )
            conn.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
        _hand_over(conn, roles.owner)
        conn.commit()


def _hand_over(conn: psycopg.Connection[Any], owner: str) -> None:
    """Everything in the public schema not yet the owner role's becomes its."""
    rels = conn.execute(
        "SELECT c.relname, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p', 'v', 'm', 'S')"
        " AND pg_get_userbyid(c.relowner) <> %s"
        # a sequence owned by a column follows its table
        " AND NOT (c.relkind = 'S' AND EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = c.oid"
        "   AND d.classid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')))"
        " ORDER BY c.relkind = 'S', c.relname",
        (owner,),
    ).fetchall()
    for name, kind in rels:
        what = {"v": "VIEW", "m": "MATERIALIZED VIEW", "S": "SEQUENCE"}.get(kind, "TABLE")
        conn.execute(
            sql.SQL("ALTER {} {} OWNER TO {}").format(
                sql.SQL(what), sql.Identifier(name), sql.Identifier(owner)
            )
        )
    for (proc,) in conn.execute(
        "SELECT p.oid::regprocedure::text FROM pg_proc p JOIN pg_namespace n"
        " ON n.oid = p.pronamespace WHERE n.nspname = 'public'"
        " AND pg_get_userbyid(p.proowner) <> %s",
        (owner,),
    ).fetchall():
        conn.execute(
            sql.SQL("ALTER ROUTINE {} OWNER TO {}").format(sql.SQL(proc), sql.Identifier(owner))
        )


def check_serving_role(dsn: str) -> str:
    """Refuse (UnsafeRole) a role that could rewrite the audit trail: a superuser, a
    member of the role owning audit_log or the schema, or one holding UPDATE, DELETE
    or TRUNCATE on audit_log. Returns the role's name."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT current_user, r.rolsuper, r.rolcreaterole,"
            " (SELECT pg_get_userbyid(c.relowner) FROM pg_class c"
            "   WHERE c.oid = to_regclass('audit_log')),"
            " (SELECT pg_has_role(current_user, c.relowner, 'MEMBER') FROM pg_class c"
            "   WHERE c.oid = to_regclass('audit_log')),"
            " (SELECT pg_get_userbyid(c.relowner) FROM pg_class c"
            "   WHERE c.oid = to_regclass('schema_migrations')),"
            " (SELECT pg_has_role(current_user, c.relowner, 'MEMBER') FROM pg_class c"
            "   WHERE c.oid = to_regclass('schema_migrations')),"
            " (SELECT has_table_privilege(c.oid, 'UPDATE, DELETE, TRUNCATE') FROM pg_class c"
            "   WHERE c.oid = to_regclass('audit_log'))"
            " FROM pg_roles r WHERE r.rolname = current_user"
        ).fetchone()
    assert row is not None
    me, superuser, createrole, audit_owner, owns_audit, schema_owner, owns_schema, may_change = row
    why = None
    if superuser:
        why = "it is a superuser"
    elif createrole:
        why = "it has CREATEROLE (it could grant itself the owner's rights)"
    elif owns_audit:
        why = f"it owns audit_log (or is a member of its owner {audit_owner})"
    elif owns_schema:
        why = f"it owns the schema (or is a member of {schema_owner}, which ran the migrations)"
    elif may_change:
        why = "it may UPDATE, DELETE or TRUNCATE audit_log"
    if why:
        raise UnsafeRole(
            f"refusing to serve as PostgreSQL role {me!r}: {why}, so it could switch the "
            "audit trail's trigger off and rewrite its history. Connect as the app role "
            f"(OPENSENSE_DATABASE_URL=postgresql://{APP_ROLE}:…@host/db) and keep the owner "
            f"role ({OWNER_ROLE}) for `opensense db migrate` (OPENSENSE_DATABASE_OWNER_URL); "
            'docs/operations.md, "Database roles"'
        )
    return str(me)


# --- embedded mode -------------------------------------------------------------------


def embedded(state_dir: Path, database: str = "opensense", roles: Roles | None = None) -> Dsns:
    """The embedded server with its roles: made at init, and made on the next start
    for a state directory an older release created (everything handed to the owner)."""
    roles = roles or Roles()
    admin = embedded_dsn(state_dir, database)
    provision(admin, database, roles)
    owner = with_user(admin, roles.owner)
    with psycopg.connect(owner) as conn:
        # an older release's database, migrated before the app role had its grants
        # (`db migrate` grants on its own; this covers a plain restart after upgrade)
        missing = conn.execute(
            "SELECT CASE WHEN to_regclass('schema_migrations') IS NULL THEN false"
            " ELSE NOT has_table_privilege(%s, 'schema_migrations', 'SELECT') END",
            (roles.app,),
        ).fetchone()
        if missing and missing[0]:
            grant_app(conn, roles.app)
        conn.commit()
    return Dsns(
        admin, owner, with_user(admin, roles.app), with_user(admin, roles.restore, "postgres")
    )


def serving_dsn(admin_dsn: str, roles: Roles | None = None) -> str:
    """For tools holding a superuser DSN of a scratch database (tools/bench): give it
    the roles, migrate it as the owner, and return the app role's DSN to serve with.
    Assumes a server that trusts local connections (the embedded one, a test server)."""
    roles = roles or Roles()
    name = str(psycopg.conninfo.conninfo_to_dict(admin_dsn)["dbname"])
    provision(admin_dsn, name, roles)
    migrate(with_user(admin_dsn, roles.owner), app_role=roles.app)
    return with_user(admin_dsn, roles.app)
