"""Tokens: ds_live_ (one device's ingest), ua_live_ (management API), whk_ (inbound webhooks),
gw_ (a site gateway: forwards its site's readings).

Text form: ``<prefix><key_id>_<secret>``. `key_id` is public and finds the row;
only a bcrypt hash of `secret` is stored. Verification costs one indexed lookup:
the row is read on every request (so a rotation or revocation made by any server
process is seen on the very next request), but bcrypt (~0.25 s of CPU at cost 12)
runs only the first time any process sees a given (key_id, secret, hash) triple:
after that the token's row holds a fast check (an HMAC keyed outside the database,
see "re-admission" below) and each process remembers good checks in memory.
`last_used_at` is written at most once a minute per token.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import secrets
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import bcrypt
from psycopg import AsyncConnection

from opensense_contract import retry

from .errors import ApiError
from .ids import new_id
from .statedir import create_secret

log = logging.getLogger(__name__)

PREFIXES = {"ds_live": "ds_live_", "ua_live": "ua_live_", "whk": "whk_", "gw": "gw_"}
_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"
_KEY_CHARS = frozenset(_ALPHABET)
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
            # the key id goes to the database: only what `_rand` makes gets that far
            if (
                sep
                and len(key_id) == KEY_ID_LEN
                and len(secret) == SECRET_LEN
                and _KEY_CHARS.issuperset(key_id)
            ):
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


# --- re-admission after a restart (docs/security.md, "Token checks and the restart storm")
#
# bcrypt at cost 12 costs ~0.25 s of CPU. A process remembers good checks in memory, so
# a device pays it once per process; but after a restart every device pays it again
# (10,000 nodes: ~40 CPU-minutes with ingest starved). So after a good bcrypt check
# the process stores a *fast check* in the token's row: HMAC-SHA256 keyed by a server
# secret that is not in the database (a 0600 file in the state dir, or
# OPENSENSE_TOKEN_MAC_KEY), over (key_id, secret, stored bcrypt hash). After a restart
# a device's first request costs one HMAC instead of one bcrypt. The row (revoked_at,
# kind) is still read on every request, and a rotated token is a new row with a new
# hash, so a fast check never outlives the token it was made for; a database reader
# without the key cannot test a guess against it.

MAC_KEY_BYTES = 32
MAC_KEY_FILE = "token_mac.key"
_MAC_CONTEXT = b"opensense token fast check v1"

# bcrypt work is bounded: it runs on its own small thread pool (OPENSENSE_BCRYPT_WORKERS,
# default 1, so on 2 cores a flood of misses leaves a core to the event loop and
# PostgreSQL). A request waiting for bcrypt holds its database connection, so a first
# use waits about MAX_WAIT_S at most: when more checks are pending than the workers
# finish in that time (measured; at cost 12 and one worker: 3), the answer is 503 with
# Retry-After at once, and the pool stays free for the devices already admitted. (A
# count alone would not do: at cost 4 a burst of 30 first uses is over in 30 ms.)
# A key_id that failed FAIL_BUDGET bcrypt checks within FAIL_WINDOW gets 401 without one
# until the window has passed (its live device still gets in through its fast check).
FAIL_BUDGET = 5
FAIL_WINDOW = timedelta(minutes=1)


UNREAD = object()  # Verifier.check: the caller did not read the row's fast_check


MAX_WAIT_S = 1.0


def _cost_seconds(stored_hash: str) -> float:
    """A first guess of one bcrypt check's time from the hash's cost ($2b$12$…), until
    checks have been measured: ~0.25 s at 12, halved for each step down."""
    try:
        cost = int(stored_hash.split("$")[2])
    except (IndexError, ValueError):
        cost = 12
    return 0.25 * 2.0 ** (cost - 12)


def _timed_checkpw(secret: bytes, hashed: bytes) -> tuple[bool, float]:
    t0 = time.perf_counter()
    ok = bool(bcrypt.checkpw(secret, hashed))
    return ok, time.perf_counter() - t0


def load_mac_key(env_key: str, state_dir: Path) -> bytes:
    """The fast-check key: OPENSENSE_TOKEN_MAC_KEY (hex, at least 32 bytes) or
    <state_dir>/token_mac.key, made (0600, in a 0700 directory) when missing. A new key
    only makes the stored fast checks useless (one bcrypt per device again), so making
    one is safe; a key file others can read is refused."""
    if env_key:
        try:
            key = bytes.fromhex(env_key.strip())
        except ValueError as exc:
            raise ValueError("OPENSENSE_TOKEN_MAC_KEY must be hex") from exc
        if len(key) < MAC_KEY_BYTES:
            raise ValueError(f"OPENSENSE_TOKEN_MAC_KEY must be at least {MAC_KEY_BYTES} bytes")
        return key
    path = state_dir / MAC_KEY_FILE
    # created whole or not at all: a second process starting at once never reads it half-written
    if create_secret(path, (secrets.token_hex(MAC_KEY_BYTES) + "\n").encode()):
        log.info("made the token fast-check key %s", path)
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise ValueError(f"{path} is readable by others (mode {mode:o}); chmod 600 it")
    key = bytes.fromhex(path.read_text().strip())
    if len(key) < MAC_KEY_BYTES:
        raise ValueError(f"{path} holds less than {MAC_KEY_BYTES} bytes")
    return key


def fast_check(mac_key: bytes, key_id: str, secret: str, stored_hash: str) -> bytes:
    """The value stored in tokens.fast_check after a good bcrypt check."""
    msg = b"\0".join((_MAC_CONTEXT, key_id.encode(), secret.encode(), stored_hash.encode()))
    return hmac.new(mac_key, msg, hashlib.sha256).digest()


async def _first(f: asyncio.Future[tuple[bool, float]]) -> bool:
    return (await f)[0]


def _memo_key(key_id: str, secret: str, stored_hash: str) -> tuple[str, bytes, str]:
    """What a Verifier remembers a check by: the secret only as its digest."""
    return (key_id, hashlib.sha256(secret.encode()).digest(), stored_hash)


class Verifier:
    """Checks token secrets against bcrypt hashes: memory, then the stored fast check,
    then (bounded) bcrypt.

    The cache key holds the stored hash too, so a re-hashed (rotated) row can never
    match an old entry; revocation is read from the row on every request.
    """

    def __init__(
        self, max_entries: int = 100_000, mac_key: bytes | None = None, workers: int = 1
    ) -> None:
        self._good: OrderedDict[tuple[str, bytes, str], None] = OrderedDict()
        self._bad: OrderedDict[tuple[str, bytes, str], None] = OrderedDict()
        self._max = max_entries
        self._last_touch: dict[str, datetime] = {}
        self.mac_key = mac_key  # None: no fast checks (bcrypt after every restart)
        self._workers = workers
        self._seconds: float | None = None  # a bcrypt check's time, moving average
        self._pool: ThreadPoolExecutor | None = None
        self._waiting = 0
        self._inflight: dict[tuple[str, bytes, str], asyncio.Future[bool]] = {}
        self._fails: dict[str, list[datetime]] = {}
        # observable in tests and benchmarks
        self.bcrypt_checks = 0
        self.fast_checks = 0
        self.refused_by_budget = 0

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def _remember(self, cache: OrderedDict[tuple[str, bytes, str], None], key: Any) -> None:
        cache[key] = None
        if len(cache) > self._max:
            cache.popitem(last=False)

    async def check(
        self,
        key_id: str,
        secret: str,
        stored_hash: str,
        conn: AsyncConnection[Any] | None = None,
        now: datetime | None = None,
        stored_fast: bytes | None | object = UNREAD,
    ) -> bool:
        """`stored_fast`: the row's fast_check when the caller read it with the row
        (saves a query); UNREAD: read it here (on a memory miss only)."""
        key = _memo_key(key_id, secret, stored_hash)
        if self._known_good(key):
            return True
        if key in self._bad:
            return False
        mac = None
        if self.mac_key is not None and conn is not None:
            mac = fast_check(self.mac_key, key_id, secret, stored_hash)
            if stored_fast is UNREAD:
                cur = await conn.execute(
                    "SELECT fast_check FROM tokens WHERE key_id = %s AND hash = %s",
                    (key_id, stored_hash),
                )
                row = await cur.fetchone()
                stored_fast = row[0] if row is not None else None
            if isinstance(stored_fast, bytes | bytearray | memoryview) and hmac.compare_digest(
                bytes(stored_fast), mac
            ):
                self.fast_checks += 1
                self._remember(self._good, key)
                return True
        if now is not None and self._over_budget(key_id, now):
            self.refused_by_budget += 1
            return False
        ok = await self._bcrypt(key, secret, stored_hash)
        if ok:
            self._remember(self._good, key)
            if mac is not None and conn is not None:
                await conn.execute(
                    "UPDATE tokens SET fast_check = %s WHERE key_id = %s AND hash = %s"
                    " AND fast_check IS DISTINCT FROM %s",
                    (mac, key_id, stored_hash, mac),
                )
        else:
            self._remember(self._bad, key)
            if now is not None:
                self._fails.setdefault(key_id, []).append(now)
        return ok

    def _over_budget(self, key_id: str, now: datetime) -> bool:
        fails = self._fails.get(key_id)
        if not fails:
            return False
        fails[:] = [t for t in fails if timedelta(0) <= now - t < FAIL_WINDOW]
        if not fails:
            del self._fails[key_id]
            return False
        if len(self._fails) > self._max:  # bound the map under a spray of key_ids
            self._fails.clear()
        return len(fails) >= FAIL_BUDGET

    async def _bcrypt(self, key: tuple[str, bytes, str], secret: str, stored_hash: str) -> bool:
        """One bcrypt check on the bounded pool; the same check asked again while it
        runs (a device retrying) waits for the first instead of costing another."""
        running = self._inflight.get(key)
        if running is not None:
            return await asyncio.shield(running)
        each = self._seconds if self._seconds is not None else _cost_seconds(stored_hash)
        if self._waiting >= max(self._workers + 1, int(self._workers * MAX_WAIT_S / each)):
            raise ApiError(
                "unavailable",
                "the server is busy checking tokens after a restart; retry in a few seconds",
                headers={"Retry-After": str(retry.SERVER_BUSY_RETRY_S)},
            )
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="bcrypt")
        loop = asyncio.get_running_loop()
        timed = loop.run_in_executor(
            self._pool, _timed_checkpw, secret.encode(), stored_hash.encode()
        )
        self._waiting += 1
        self.bcrypt_checks += 1

        def done(f: asyncio.Future[tuple[bool, float]]) -> None:
            # when the thread is done, not when a waiter gives up: the slot is busy until then
            self._waiting -= 1
            self._inflight.pop(key, None)
            if not f.cancelled() and f.exception() is None:
                took = f.result()[1]
                self._seconds = took if self._seconds is None else 0.8 * self._seconds + 0.2 * took

        timed.add_done_callback(done)
        fut: asyncio.Future[bool] = asyncio.ensure_future(_first(timed))
        self._inflight[key] = fut
        return await asyncio.shield(fut)

    def remembers(self, key_id: str, secret: str, stored_hash: str) -> bool:
        """Whether `check` would answer True from memory (no query, no bcrypt): this
        process checked this secret against this hash before and it was good."""
        return self._known_good(_memo_key(key_id, secret, stored_hash))

    def _known_good(self, key: tuple[str, bytes, str]) -> bool:
        if key not in self._good:
            return False
        self._good.move_to_end(key)  # used: the last to be forgotten
        return True

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
        "SELECT id, kind, account_id, device_id, hash, revoked_at, fast_check FROM tokens"
        " WHERE key_id = %s",
        (key_id,),
    )
    row = await cur.fetchone()
    if row is None:
        raise ApiError("token_invalid", "the token is not known (wrong, or deleted)")
    await check_row(
        conn, verifier, kind, key_id, secret, row[0], row[1], row[4], row[5], now, fast=row[6]
    )
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
    *,
    fast: bytes | None | object = UNREAD,
    touch: bool | None = None,
) -> None:
    """Refuse (401) unless the row is a live token of `kind` whose hash matches
    `secret`; keeps last_used_at. Shared by every way a token row is read. `fast`: the
    row's fast_check, when the caller's query read it. `touch`: whether last_used_at
    is due, when the caller asked `verifier.due_for_touch` already (None: ask it)."""
    if row_kind != kind:
        raise ApiError("token_invalid", "the token is not known (wrong, or deleted)")
    if revoked_at is not None:
        raise ApiError("token_invalid", "the token was rotated or revoked; use the current one")
    if not await verifier.check(key_id, secret, stored_hash, conn, now, fast):
        raise ApiError("token_invalid", "the token is not known (wrong, or deleted)")
    if verifier.due_for_touch(token_id, now) if touch is None else touch:
        await conn.execute(TOUCH_SQL, {"now": now, "id": token_id})
