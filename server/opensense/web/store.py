"""The dashboard's SQL: users, sign-in codes and sessions.

Secrets (codes, link tokens, session ids) are kept as SHA-256 hashes only; the
plain value exists in the mail and in the browser's cookie. Every read of account
data takes the account id of the signed-in user, never one from the request (what
the overview shows: web/board.py).
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from psycopg import AsyncConnection

from .. import audit

CODE_TTL = timedelta(minutes=10)
SESSION_IDLE = timedelta(days=30)  # a session ends after 30 days without a request
MAX_CODE_ATTEMPTS = 5  # wrong codes before the pending sign-in is void
# no 0/O, 1/I/L: read off a phone and typed on another device
CODE_ALPHABET = "ABCDEFGHJKMNPQRSTUVWXYZ23456789"
CODE_LENGTH = 6
ROLES = ("viewer", "operator", "manager", "owner")


def digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def new_code() -> str:
    return "".join(secrets.choice(CODE_ALPHABET) for _ in range(CODE_LENGTH))


def normalize_code(code: str) -> str:
    return "".join(code.split()).upper()


@dataclass(frozen=True)
class User:
    id: str
    account_id: str
    email: str
    role: str


USER_COLUMNS = "u.id, u.account_id, u.email, u.role"


async def user_for_email(conn: AsyncConnection[Any], email: str) -> User | None:
    """The user an email signs in as. One email may be a user of several accounts:
    the oldest membership until the dashboard has an account switcher."""
    cur = await conn.execute(
        f"SELECT {USER_COLUMNS} FROM users u WHERE u.email = %s ORDER BY u.created_at, u.id LIMIT 1",
        (email,),
    )
    row = await cur.fetchone()
    return User(*row) if row else None


async def issue_code(conn: AsyncConnection[Any], email: str, now: datetime) -> tuple[str, str]:
    """A new code and link token for `email`, replacing (voiding) any pending one."""
    code, link = new_code(), secrets.token_urlsafe(32)
    await conn.execute(
        "INSERT INTO login_codes (email, code_hash, link_hash, created_at, expires_at)"
        " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (email) DO UPDATE SET"
        " code_hash = excluded.code_hash, link_hash = excluded.link_hash,"
        " created_at = excluded.created_at, expires_at = excluded.expires_at, attempts = 0",
        (email, digest(email + ":" + code), digest(link), now, now + CODE_TTL),
    )
    return code, link


async def issue_sign_in(
    conn: AsyncConnection[Any], user: User, now: datetime, data: dict[str, Any]
) -> tuple[str, str]:
    """`issue_code` for a user, recorded in the account's trail (`auth.link_issued`,
    with `data`: who asked from where), in the caller's transaction."""
    code, link = await issue_code(conn, user.email, now)
    await audit.record(
        conn,
        account_id=user.account_id,
        actor=user.id,
        action="auth.link_issued",
        subject=user.id,
        data={"email": user.email, **data},
        at=now,
    )
    return code, link


async def redeem_code(conn: AsyncConnection[Any], email: str, code: str, now: datetime) -> bool:
    """True once for the right, unexpired code (the row is deleted: single use); a
    wrong code counts an attempt, and past MAX_CODE_ATTEMPTS voids the code."""
    cur = await conn.execute(
        "DELETE FROM login_codes WHERE email = %s AND code_hash = %s AND expires_at > %s"
        " AND attempts < %s RETURNING email",
        (email, digest(email + ":" + normalize_code(code)), now, MAX_CODE_ATTEMPTS),
    )
    if await cur.fetchone() is not None:
        return True
    await conn.execute("UPDATE login_codes SET attempts = attempts + 1 WHERE email = %s", (email,))
    return False


async def redeem_link(conn: AsyncConnection[Any], link: str, now: datetime) -> str | None:
    """The email of an unexpired, unused link (the row is deleted: single use)."""
    cur = await conn.execute(
        "DELETE FROM login_codes WHERE link_hash = %s AND expires_at > %s RETURNING email",
        (digest(link), now),
    )
    row = await cur.fetchone()
    return str(row[0]) if row else None


async def link_pending(conn: AsyncConnection[Any], link: str, now: datetime) -> bool:
    cur = await conn.execute(
        "SELECT 1 FROM login_codes WHERE link_hash = %s AND expires_at > %s", (digest(link), now)
    )
    return await cur.fetchone() is not None


async def create_session(conn: AsyncConnection[Any], user_id: str, now: datetime) -> str:
    sid = secrets.token_urlsafe(32)
    await conn.execute(
        "INSERT INTO sessions (id_hash, user_id, created_at, last_seen_at) VALUES (%s, %s, %s, %s)",
        (digest(sid), user_id, now, now),
    )
    return sid


async def session_user(conn: AsyncConnection[Any], sid: str, now: datetime) -> User | None:
    """The user of a live session, whose idle clock restarts now."""
    cur = await conn.execute(
        f"UPDATE sessions s SET last_seen_at = %s FROM users u"
        f" WHERE s.id_hash = %s AND s.last_seen_at > %s AND u.id = s.user_id"
        f" RETURNING {USER_COLUMNS}",
        (now, digest(sid), now - SESSION_IDLE),
    )
    row = await cur.fetchone()
    return User(*row) if row else None


async def end_session(conn: AsyncConnection[Any], sid: str) -> None:
    await conn.execute("DELETE FROM sessions WHERE id_hash = %s", (digest(sid),))


async def end_all_sessions(conn: AsyncConnection[Any], user_id: str) -> int:
    cur = await conn.execute("DELETE FROM sessions WHERE user_id = %s", (user_id,))
    return cur.rowcount


async def sweep(conn: AsyncConnection[Any], now: datetime) -> None:
    """Expired codes and idle sessions (the housekeeping job)."""
    await conn.execute("DELETE FROM login_codes WHERE expires_at <= %s", (now,))
    await conn.execute("DELETE FROM sessions WHERE last_seen_at <= %s", (now - SESSION_IDLE,))
