"""HTTP ingest's authentication statements shared by concurrent requests
(ingest/authbatch.py): each request is answered as if it were alone (its own token
row, its own place in its device's rate count), the counts are exact, and one
request's trouble fails that request alone."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool, PoolClosed

from opensense import ratelimit, tokens
from opensense.api.jsonutil import rfc3339
from opensense.api.keys import AUTHS
from opensense.ingest.authbatch import AUTH_BATCH_SQL, AuthBatcher, auth_pool

from .fixtures.server import World, as_one_batch, rate_count

pytestmark = pytest.mark.db


def one(ts: Any, label: str, device: str = "fridge01") -> dict[str, Any]:
    return {
        "device": device,
        "ts": rfc3339(ts),
        "measurements": [{"type": "temperature", "value": 4.0, "label": label}],
    }


async def test_concurrent_requests_share_statements_and_count_exactly(
    client, world: World, clock, dsn
):
    """75 requests of one device at once against its 60 a minute, 10 of another, a
    wrong secret, a rotated token and an unknown key: the first device gets exactly 60
    answers 200 and 15 answers 429, the other all 200, the bad tokens 401 each; the
    counters hold every request of a live token (the wrong secret's too, as one by
    one); and they took fewer statements than requests."""
    clock.now = clock.now.replace(second=0)
    auths = client.app[AUTHS]
    statements, requests = auths.statements, auths.requests
    h1, h2 = world.dev_auth("fridge01"), world.dev_auth("fridge02")
    kind, key_id, secret = tokens.parse_or_raise(world.devices["fridge02"], ("ds_live",))
    wrong = {"Authorization": f"Bearer ds_live_{key_id}_{'x' * len(secret)}"}
    unknown = {"Authorization": f"Bearer ds_live_{'z' * len(key_id)}_{secret}"}

    async def post(body: dict[str, Any], headers: dict[str, str]) -> int:
        r = await client.post("/v1/ingest", json=body, headers=headers)
        await r.read()
        return int(r.status)

    calls = [post(one(clock.now, f"a{i}"), h1) for i in range(75)]
    calls += [post(one(clock.now, f"b{i}", "fridge02"), h2) for i in range(10)]
    calls += [post(one(clock.now, "w", "fridge02"), wrong), post(one(clock.now, "u"), unknown)]
    got = await asyncio.gather(*calls)
    assert sorted(got[:75]) == [200] * 60 + [429] * 15
    assert got[75:85] == [200] * 10
    assert got[85:] == [401, 401]
    assert await rate_count(dsn, world.device_ids["fridge01"]) == 75
    assert await rate_count(dsn, world.device_ids["fridge02"]) == 11
    assert auths.requests - requests == 87
    assert auths.statements - statements < 87  # shared


async def test_a_rotated_token_is_refused_by_the_next_statement(client, world: World, clock):
    """A token rotated while requests are in flight: every request sent after the
    rotation is refused (its statement's snapshot is taken after it arrived)."""
    h = world.dev_auth("fridge01")
    r = await client.post("/v1/ingest", json=one(clock.now, "x"), headers=h)
    assert r.status == 200
    r = await client.post(
        f"/v1/devices/{world.device_ids['fridge01']}/rotate-token", headers=world.auth
    )
    assert r.status == 200, await r.text()
    new = {"Authorization": f"Bearer {(await r.json())['ingest_token']}"}
    got = await asyncio.gather(
        *(client.post("/v1/ingest", json=one(clock.now, f"y{i}"), headers=h) for i in range(5)),
        *(client.post("/v1/ingest", json=one(clock.now, f"z{i}"), headers=new) for i in range(5)),
    )
    assert [g.status for g in got] == [401] * 5 + [200] * 5


async def test_a_request_the_database_refuses_fails_alone(world: World, dsn, clock):
    """A key id PostgreSQL cannot take (a NUL character) fails the batch's statement:
    the batch is answered request by request, the others as usual."""
    _, good, _ = tokens.parse_or_raise(world.devices["fridge01"], ("ds_live",))
    window = ratelimit.window_start(clock.now, 60)
    async with AsyncConnectionPool(
        dsn, min_size=1, max_size=2, kwargs={"autocommit": True}
    ) as pool:
        auths = AuthBatcher(pool, runners=1)
        calls = [auths.lookup(k, None, window) for k in (good, "bad\x00key", good)]
        done = await as_one_batch(auths, calls)
    first, bad, second = done
    assert not isinstance(first, BaseException) and first is not None
    assert not isinstance(second, BaseException) and second is not None
    assert isinstance(bad, psycopg.DataError)
    assert (first.rate_count, second.rate_count) == (1, 2)  # one by one, in order
    assert auths.statements == 2  # (the batch failed; then the two good ones alone)
    assert "set_config('synchronous_commit', 'off', true)" in AUTH_BATCH_SQL


async def test_the_statement_is_never_planned_anew(world: World, dsn, clock):
    """The statement runs on its prepared statement's generic plan from its first
    prepared execution on: no custom plan is made (PostgreSQL makes five before it
    weighs the generic one, and once autovacuum's ANALYZE had raised the generic plan's
    estimate it planned every execution anew, for good: authbatch.auth_pool)."""
    _, key_id, _ = tokens.parse_or_raise(world.devices["fridge01"], ("ds_live",))
    window = ratelimit.window_start(clock.now, 60)
    async with auth_pool(dsn, runners=1) as pool:
        auths = AuthBatcher(pool, runners=1)
        auths.start()
        try:
            for _ in range(12):  # psycopg prepares it at the sixth (prepare_threshold 5)
                assert await auths.lookup(key_id, None, window) is not None
        finally:
            await auths.stop()
        async with pool.connection() as conn:
            cur = await conn.execute(
                "SELECT generic_plans, custom_plans FROM pg_prepared_statements"
                " WHERE statement LIKE %s",
                ("%INSERT INTO rate_counters%",),
            )
            plans = await cur.fetchall()
    assert len(plans) == 1 and plans[0][0] >= 6, plans
    assert plans[0][1] == 0, plans


async def test_with_the_database_away_a_batch_fails_at_once(client, world: World, clock, dsn):
    """The database gone: a batch fails whole at once, not retried request by request
    (each would wait for the pool in turn); over HTTP every request of a burst is 503."""
    window = ratelimit.window_start(clock.now, 60)
    _, key_id, _ = tokens.parse_or_raise(world.devices["fridge01"], ("ds_live",))
    pool = AsyncConnectionPool(dsn, min_size=1, max_size=1, open=False)
    await pool.open()
    await pool.close()
    auths = AuthBatcher(pool, runners=1)
    done = await as_one_batch(auths, [auths.lookup(key_id, None, window) for _ in range(3)])
    assert all(isinstance(d, PoolClosed) for d in done), done
    assert auths.attempts == 1

    from opensense.api.keys import POOL

    await client.app[POOL].close()
    h = world.dev_auth("fridge01")
    got = await asyncio.gather(
        *(client.post("/v1/ingest", json=one(clock.now, f"d{i}"), headers=h) for i in range(20))
    )
    assert [g.status for g in got] == [503] * 20


async def test_a_wrong_secret_does_not_hold_back_last_used_at(client, world: World, clock, dsn):
    """last_used_at is kept once a minute by a good request; a wrong secret with the
    token's key id in between (401) does not use up that minute's touch."""
    _, key_id, secret = tokens.parse_or_raise(world.devices["fridge01"], ("ds_live",))
    wrong = {"Authorization": f"Bearer ds_live_{key_id}_{'x' * len(secret)}"}

    async def used() -> Any:
        async with await psycopg.AsyncConnection.connect(dsn) as conn:
            cur = await conn.execute("SELECT last_used_at FROM tokens WHERE key_id = %s", (key_id,))
            row = await cur.fetchone()
        assert row is not None
        return row[0]

    r = await client.post(
        "/v1/ingest", json=one(clock.now, "a"), headers=world.dev_auth("fridge01")
    )
    assert r.status == 200
    assert await used() == clock.now
    clock.advance(seconds=61)
    r = await client.post("/v1/ingest", json=one(clock.now, "b"), headers=wrong)
    assert r.status == 401
    r = await client.post(
        "/v1/ingest", json=one(clock.now, "c"), headers=world.dev_auth("fridge01")
    )
    assert r.status == 200
    assert await used() == clock.now


async def test_a_key_id_no_token_can_have_never_reaches_the_database(client, clock):
    """Key ids are made of tokens' own alphabet: anything else (here characters
    PostgreSQL would refuse, or a batch would have to retry around) is 401 before any
    statement."""
    auths = client.app[AUTHS]
    before = auths.attempts
    for key_id in ("!" * 12, "A" * 12, "é" * 12, "il" * 6):
        bad = {"Authorization": f"Bearer ds_live_{key_id}_{'a' * 32}"}
        r = await client.post("/v1/ingest", json=one(clock.now, "k"), headers=bad)
        assert (r.status, (await r.json())["error"]["code"]) == (401, "token_invalid"), key_id
    assert auths.attempts == before
