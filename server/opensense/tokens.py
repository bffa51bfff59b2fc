"""Tokens: ds_live_ (one device's ingest), ua_live_ (management API), whk_ (inbound webhooks),
gw_ (a site gateway: forwards its site's readings).

Text form: ``<prefix><key_id>_<secret>``. `key_id` is public and finds the row;
only a bcrypt hash of `secret` is stored. Verification costs one indexed lookup:
the row is read on every request (so a rotation or revocation made by any server
process is seen on the very next request), but bcrypt (~100 ms at cost 12) runs
only the first time this process sees a given (key_id, secret, hash) triple.
`last_used_at` is written at most once a minute per token.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import secrets
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import bcrypt
from psycopg import AsyncConnection

from .errors import ApiError
from .ids import new_id

PREFIXES = {"ds_live": "ds_live_", "ua_live": "ua_live_", "whk": "whk_", "gw": "gw_"}
_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"
KEY_ID_LEN = 12
SECRET_LEN = 32  # 160 bits
ROTATE_AFTER_DAYS = 365  # older tokens are flagged "consider rotating"; they keep working


def _rand(n: int) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(n))


@dataclass(frozen=True)
class NewToken:
    id: str
    kind: str
    plaintext: str  # shown once, never stored
    key_id: str
    hash: str
    site_hash: str | None = None  # ds_live only: see site_hash()


# Mosquitto's password-file hash ($7$): PBKDF2-SHA512 with mosquitto_passwd's default
# iteration count. The secret is 160 random bits, so the iteration count adds nothing
# to its strength; it only has to be one Mosquitto reads.
SITE_HASH_ITERATIONS = 101


def site_hash(plaintext: str, salt: bytes | None = None) -> str:
    """A device token's hash as a Mosquitto 2 password_file entry, `$7$101$<salt>$<hash>`
    (base64). Made only while the plaintext is known (creation, rotation), so a site
    gateway's Mosquitto can check the node's token without the server."""
    salt = salt if salt is not None else secrets.token_bytes(12)
    dk = hashlib.pbkdf2_hmac("sha512", plaintext.encode(), salt, SITE_HASH_ITERATIONS)
    b64 = base64.b64encode
    return f"$7${SITE_HASH_ITERATIONS}${b64(salt).decode()}${b64(dk).decode()}"


def generate(kind: str, rounds: int) -> NewToken:
    key_id, secret = _rand(KEY_ID_LEN), _rand(SECRET_LEN)
    hashed = bcrypt.hashpw(secret.encode(), bcrypt.gensalt(rounds)).decode()
    text = f"{PREFIXES[kind]}{key_id}_{secret}"
    return NewToken(
        new_id("tok"), kind, text, key_id, hashed, site_hash(text) if kind == "ds_live" else None
    )


def parse(token: str) -> tuple[str, str, str] | None:
    """(kind, key_id, secret) or None if the text is not shaped like one of ours."""
    for kind, prefix in PREFIXES.items():
        if token.startswith(prefix):
            rest = token[len(prefix) :]
            key_id, sep, secret = rest.partition("_")
            if sep and len(key_id) == KEY_ID_LEN and len(secret) == SECRET_LEN:
                return kind, key_id, secret
            return None
    return None


def parse_or_raise(token: str | None, kinds: tuple[str, ...]) -> tuple[str, str, str]:
    """(kind, key_id, secret), or the 401 that says what is wrong with the text."""
    if not token:
        raise ApiError(
            "auth_required", "this endpoint needs a token: send Authorization: Bearer <token>"
        )
    parsed = parse(token)
    if parsed is None or parsed[0] not in kinds:
        want = " or ".join(PREFIXES[k] + "…" for k in kinds)
        raise ApiError("token_invalid", f"the token is not a valid {want} token")
    return parsed


@dataclass(frozen=True)
class TokenRow:
    id: str
    kind: str
    account_id: str
    device_id: str | None
    hash: str
    revoked_at: datetime | None


class Verifier:
    """Checks token secrets against bcrypt hashes, remembering good checks.

    The cache key holds the stored hash too, so a re-hashed (rotated) row can never
    match an old entry; revocation is read from the row on every request.
    """

    def __init__(self, max_entries: int = 100_000) -> None:
        self._good: OrderedDict[tuple[str, bytes, str], None] = OrderedDict()
        self._bad: OrderedDict[tuple[str, bytes, str], None] = OrderedDict()
        self._max = max_entries
        self._last_touch: dict[str, datetime] = {}
        self.bcrypt_checks = 0  # observable in tests and benchmarks

    async def check(self, key_id: str, secret: str, stored_hash: str) -> bool:
        digest = hashlib.sha256(secret.encode()).digest()
        key = (key_id, digest, stored_hash)
        if key in self._good:
            self._good.move_to_end(key)
            return True
        if key in self._bad:
            return False
        self.bcrypt_checks += 1
        ok = await asyncio.to_thread(bcrypt.checkpw, secret.encode(), stored_hash.encode())
        cache = self._good if ok else self._bad
        cache[key] = None
        if len(cache) > self._max:
            cache.popitem(last=False)
        return ok

    def due_for_touch(self, token_id: str, now: datetime) -> bool:
        """True at most once a minute per token in this process; the UPDATE's own
        condition keeps several processes to about once a minute as well."""
        last = self._last_touch.get(token_id)
        if last is not None and timedelta(0) <= now - last < timedelta(minutes=1):
            return False
        self._last_touch[token_id] = now
        return True


TOUCH_SQL = (
    "UPDATE tokens SET last_used_at = %(now)s WHERE id = %(id)s"
    " AND (last_used_at IS NULL OR last_used_at < %(now)s - interval '1 minute')"
)


async def authenticate(
    conn: AsyncConnection[Any],
    verifier: Verifier,
    token: str | None,
    kinds: tuple[str, ...],
    now: datetime,
) -> TokenRow:
    """The live token row for `token`, or ApiError 401. Also keeps last_used_at."""
    kind, key_id, secret = parse_or_raise(token, kinds)
    cur = await conn.execute(
        "SELECT id, kind, account_id, device_id, hash, revoked_at FROM tokens WHERE key_id = %s",
        (key_id,),
    )
    row = await cur.fetchone()
    if row is None:
        raise ApiError("token_invalid", "the token is not known (wrong, or deleted)")
    await check_row(conn, verifier, kind, key_id, secret, row[0], row[1], row[4], row[5], now)
    return TokenRow(row[0], row[1], row[2], row[3], row[4], row[5])


async def check_row(
    conn: AsyncConnection[Any],
    verifier: Verifier,
    kind: str,
    key_id: str,
    secret: str,
    token_id: str,
    row_kind: str,
    stored_hash: str,
    revoked_at: datetime | None,
    now: datetime,
) -> None:
    """Refuse (401) unless the row is a live token of `kind` whose hash matches
    `secret`; keeps last_used_at. Shared by every way a token row is read."""
    if row_kind != kind:
        raise ApiError("token_invalid", "the token is not known (wrong, or deleted)")
    if revoked_at is not None:
        raise ApiError("token_invalid", "the token was rotated or revoked; use the current one")
    if not await verifier.check(key_id, secret, stored_hash):
        raise ApiError("token_invalid", "the token is not known (wrong, or deleted)")
    if verifier.due_for_touch(token_id, now):
        await conn.execute(TOUCH_SQL, {"now": now, "id": token_id})
