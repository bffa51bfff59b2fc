"""HTTP ingest: the happy path, dedupe, idempotency, and every kind of bad input."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import psycopg
import pytest

from opensense.api.jsonutil import rfc3339
from opensense.api.keys import CHANNELS, WRITER

from .fixtures.server import World, count_rows

pytestmark = pytest.mark.db


def body(ts: Any, *ms: dict[str, Any], device: str = "fridge01") -> dict[str, Any]:
    return {"device": device, "ts": rfc3339(ts), "measurements": list(ms)}


def t(value: float, **kw: Any) -> dict[str, Any]:
    return {"type": "temperature", "value": value, **kw}


async def test_accepts_and_creates_channels_with_vertical_default(client, world: World, clock, dsn):
    r = await client.post(
        "/v1/ingest",
        json=body(
            clock.now,
            t(4.2, label="front"),
            t(3.9, label="back"),
            {"type": "humidity", "value": 60},
        ),
        headers=world.dev_auth("fridge01"),
    )
    assert r.status == 200, await r.text()
    ans = await r.json()
    assert ans["accepted"] == 3 and ans["deduplicated"] == 0
    assert [(c["type"], c["label"]) for c in ans["channels"]] == [
        ("temperature", "front"),
        ("temperature", "back"),
        ("humidity", ""),
    ]
    front = ans["channels"][0]["channel_id"]
    r = await client.get(f"/v1/channels/{front}", headers=world.auth)
    ch = await r.json()
    assert ch["unit"] == "°C"
    # chilled_storage preset: -2..+5 °C, 15 min grace
    assert ch["rules"][0]["params"] == {"ok_min": -2.0, "ok_max": 5.0}
    assert ch["rules"][0]["grace_min"] == 15
    hum = ans["channels"][2]["channel_id"]
    assert (await (await client.get(f"/v1/channels/{hum}", headers=world.auth)).json())[
        "rules"
    ] == []
    assert await count_rows(dsn, world.account) == 3


async def test_resend_is_deduplicated_never_stored_twice(client, world: World, clock, dsn):
    b = body(clock.now, t(4.0), t(5.0, ts=rfc3339(clock.now - timedelta(minutes=1))))
    r1 = await (await client.post("/v1/ingest", json=b, headers=world.dev_auth("fridge01"))).json()
    r2 = await (await client.post("/v1/ingest", json=b, headers=world.dev_auth("fridge01"))).json()
    assert (r1["accepted"], r1["deduplicated"]) == (2, 0)
    assert (r2["accepted"], r2["deduplicated"]) == (0, 2)
    assert await count_rows(dsn, world.account) == 2
    # rollups count each reading once
    cid = r1["channels"][0]["channel_id"]
    r = await client.get(
        f"/v1/channels/{cid}/measurements?agg=1d&fn=count"
        f"&from={rfc3339(clock.now - timedelta(days=1))}"
        f"&to={rfc3339(clock.now + timedelta(minutes=1))}",
        headers=world.auth,
    )
    data = (await r.json())["data"]
    assert sum(v for _, v in data) == 2


async def test_missing_ts_uses_receive_time_and_header_device(client, world: World, clock):
    r = await client.post(
        "/v1/ingest",
        json={"measurements": [t(2.5)]},
        headers={**world.dev_auth("fridge01"), "X-Device-Id": "fridge01"},
    )
    assert r.status == 200, await r.text()
    cid = (await r.json())["channels"][0]["channel_id"]
    r = await client.get(
        f"/v1/channels/{cid}/measurements?to={rfc3339(clock.now + timedelta(seconds=1))}",
        headers=world.auth,
    )
    assert (await r.json())["data"] == [[rfc3339(clock.now), 2.5]]


async def test_idempotency_key(client, world: World, clock):
    h = {**world.dev_auth("fridge01"), "Idempotency-Key": "batch-1"}
    b = body(clock.now, t(4.0))
    r1 = await client.post("/v1/ingest", json=b, headers=h)
    r2 = await client.post("/v1/ingest", json=b, headers=h)
    assert r1.status == r2.status == 200
    assert await r1.json() == await r2.json()  # the replay answers as the original did
    r3 = await client.post("/v1/ingest", json=body(clock.now, t(9.0)), headers=h)
    assert r3.status == 409
    assert (await r3.json())["error"]["code"] == "idempotency_conflict"
    clock.advance(hours=25)  # the key expires after 24 h
    r4 = await client.post("/v1/ingest", json=body(clock.now, t(9.0)), headers=h)
    assert r4.status == 200


BAD: list[tuple[str, Any, int, str, str]] = [
    # (name, body, status, code, a word the message must contain)
    ("not json", b"{nope", 400, "bad_json", "JSON"),
    (
        "nan",
        b'{"device":"fridge01","measurements":[{"type":"temperature","value":NaN}]}',
        400,
        "bad_json",
        "NaN",
    ),
    (
        "infinity",
        b'{"device":"fridge01","measurements":[{"type":"temperature","value":Infinity}]}',
        400,
        "bad_json",
        "Infinity",
    ),
    (
        "huge number",
        b'{"device":"fridge01","measurements":[{"type":"temperature","value":1e999}]}',
        400,
        "invalid_measurement",
        "finite",
    ),
    ("array body", [1, 2], 400, "invalid_measurement", "object"),
    (
        "value is string",
        {"device": "fridge01", "measurements": [{"type": "temperature", "value": "4"}]},
        400,
        "invalid_measurement",
        "measurements[0].value",
    ),
    (
        "value is bool",
        {"device": "fridge01", "measurements": [{"type": "temperature", "value": True}]},
        400,
        "invalid_measurement",
        "measurements[0].value",
    ),
    ("measurements missing", {"device": "fridge01"}, 400, "invalid_measurement", "measurements"),
    ("empty", {"device": "fridge01", "measurements": []}, 400, "invalid_measurement", "1 to 32"),
    (
        "33 entries",
        {
            "device": "fridge01",
            "measurements": [
                {"type": "temperature", "value": 1, "label": f"p{i}"} for i in range(33)
            ],
        },
        400,
        "invalid_measurement",
        "got 33",
    ),
    (
        "unknown kind",
        {"device": "fridge01", "measurements": [{"type": "radiation", "value": 1}]},
        422,
        "unknown_kind",
        "radiation",
    ),
    (
        "physically impossible",
        {"device": "fridge01", "measurements": [{"type": "humidity", "value": 140}]},
        422,
        "out_of_range",
        "humidity",
    ),
    (
        "leak not 0/1",
        {"device": "fridge01", "measurements": [{"type": "leak", "value": 0.5}]},
        422,
        "out_of_range",
        "0 or 1",
    ),
    (
        "wrong unit",
        {
            "device": "fridge01",
            "measurements": [{"type": "temperature", "value": 40, "unit": "°F"}],
        },
        400,
        "invalid_measurement",
        "unit",
    ),
    (
        "bad ts",
        {
            "device": "fridge01",
            "ts": "yesterday",
            "measurements": [{"type": "temperature", "value": 1}],
        },
        400,
        "invalid_measurement",
        "RFC 3339",
    ),
    (
        "naive ts",
        {
            "device": "fridge01",
            "ts": "2026-01-01T00:00:00",
            "measurements": [{"type": "temperature", "value": 1}],
        },
        400,
        "invalid_measurement",
        "offset",
    ),
    (
        "unknown field",
        {"device": "fridge01", "measurements": [{"type": "temperature", "value": 1, "vaule": 2}]},
        400,
        "invalid_measurement",
        "vaule",
    ),
    (
        "duplicate entries",
        {
            "device": "fridge01",
            "measurements": [
                {"type": "temperature", "value": 1},
                {"type": "temperature", "value": 2},
            ],
        },
        400,
        "invalid_measurement",
        "repeats measurements[0]",
    ),
    (
        "unknown device",
        {"device": "fridge99", "measurements": [{"type": "temperature", "value": 1}]},
        404,
        "device_not_found",
        "fridge99",
    ),
    (
        "another device",
        {"device": "fridge02", "measurements": [{"type": "temperature", "value": 1}]},
        403,
        "forbidden",
        "fridge02",
    ),
]


@pytest.mark.parametrize("name,payload,status,code,word", BAD, ids=[b[0] for b in BAD])
async def test_bad_input_is_refused_whole_with_reason(
    client, world: World, dsn, name, payload, status, code, word
):
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    # a valid first entry must not be half-stored
    r = await client.post(
        "/v1/ingest",
        data=raw,
        headers={**world.dev_auth("fridge01"), "Content-Type": "application/json"},
    )
    assert r.status == status, await r.text()
    err = (await r.json())["error"]
    assert err["code"] == code
    assert word in err["message"]
    assert err["request_id"].startswith("req_")
    assert await count_rows(dsn, world.account) == 0


async def test_a_bad_entry_after_good_ones_stores_nothing(client, world: World, clock, dsn):
    r = await client.post(
        "/v1/ingest",
        json=body(
            clock.now, t(4.0, label="a"), t(4.1, label="b"), {"type": "humidity", "value": 101}
        ),
        headers=world.dev_auth("fridge01"),
    )
    assert r.status == 422
    assert "measurements[2].value" in (await r.json())["error"]["message"]
    assert await count_rows(dsn, world.account) == 0
    r = await client.get("/v1/channels", headers=world.auth)
    assert (await r.json())["data"] == []  # no channel was half-created either


async def test_future_and_too_old_timestamps(client, world: World, clock):
    for ts, word in (
        (clock.now + timedelta(minutes=6), "future"),
        (clock.now - timedelta(days=500), "retention"),
    ):
        r = await client.post(
            "/v1/ingest", json=body(ts, t(4.0)), headers=world.dev_auth("fridge01")
        )
        assert r.status == 422
        e = (await r.json())["error"]
        assert e["code"] == "out_of_range" and word in e["message"]
    r = await client.post(
        "/v1/ingest",
        json=body(clock.now + timedelta(minutes=4), t(4.0)),
        headers=world.dev_auth("fridge01"),
    )
    assert r.status == 200


async def test_body_over_64_kib(client, world: World):
    raw = b'{"device":"fridge01","measurements":[' + b" " * (65 * 1024) + b"]}"
    r = await client.post(
        "/v1/ingest",
        data=raw,
        headers={**world.dev_auth("fridge01"), "Content-Type": "application/json"},
    )
    assert r.status == 413
    assert (await r.json())["error"]["code"] == "payload_too_large"


async def test_tokens_wrong_rotated_other_kind(client, world: World, clock):
    b = body(clock.now, t(4.0))
    r = await client.post("/v1/ingest", json=b)
    assert (r.status, (await r.json())["error"]["code"]) == (401, "auth_required")
    good = world.devices["fridge01"]
    for bad in ("nonsense", good[:-1] + ("a" if good[-1] != "a" else "b"), world.api_token):
        r = await client.post("/v1/ingest", json=b, headers={"Authorization": f"Bearer {bad}"})
        assert (r.status, (await r.json())["error"]["code"]) == (401, "token_invalid"), bad
    # rotation: the old token fails on its very next use, the new one works
    r = await client.post(
        f"/v1/devices/{world.device_ids['fridge01']}/rotate-token", headers=world.auth
    )
    new = (await r.json())["ingest_token"]
    r = await client.post("/v1/ingest", json=b, headers={"Authorization": f"Bearer {good}"})
    assert r.status == 401
    assert "rotated" in (await r.json())["error"]["message"]
    r = await client.post("/v1/ingest", json=b, headers={"Authorization": f"Bearer {new}"})
    assert r.status == 200


async def test_rate_limit_60_per_minute_per_device(client, world: World, clock):
    h = world.dev_auth("fridge01")
    clock.now = clock.now.replace(second=0)
    for i in range(60):
        r = await client.post("/v1/ingest", json=body(clock.now, t(4.0, label=str(i))), headers=h)
        assert r.status == 200
    r = await client.post("/v1/ingest", json=body(clock.now, t(4.0)), headers=h)
    assert r.status == 429
    assert r.headers["Retry-After"] == "60"
    assert (await r.json())["error"]["code"] == "rate_limited"
    # another device is not affected
    r = await client.post(
        "/v1/ingest",
        json=body(clock.now, t(4.0), device="fridge02"),
        headers=world.dev_auth("fridge02"),
    )
    assert r.status == 200
    clock.advance(seconds=61)
    r = await client.post("/v1/ingest", json=body(clock.now, t(4.0)), headers=h)
    assert r.status == 200


async def test_request_log_keeps_reason_and_redacts_tokens(client, world: World, clock, dsn):
    tok = world.devices["fridge01"]
    await client.get(f"/v1/ingest/shelly?token={tok}&device=fridge01&temp=banana")
    await client.app[__import__("opensense.api.keys", fromlist=["REQUEST_LOG"]).REQUEST_LOG].flush()
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT path, status, code, reason FROM request_log WHERE device_id = %s",
            (world.device_ids["fridge01"],),
        )
        rows = await cur.fetchall()
    assert rows, "request not logged"
    path, status, code, reason = rows[-1]
    assert status == 400 and code == "invalid_measurement" and "temp" in reason
    assert tok not in path and "REDACTED" in path


async def test_shelly_get(client, world: World, clock):
    tok = world.devices["fridge01"]
    r = await client.get(
        f"/v1/ingest/shelly?token={tok}&device=fridge01&temp=4.5&hum=61&battery=88&signal=-70"
    )
    assert r.status == 200, await r.text()
    ans = await r.json()
    assert ans["accepted"] == 4
    assert {c["type"] for c in ans["channels"]} == {"temperature", "humidity", "battery", "signal"}
    r = await client.get(f"/v1/ingest/shelly?token={tok}&battery=88")
    assert r.status == 400 and "temp or hum" in (await r.json())["error"]["message"]


async def test_lorawan_webhook(client, world: World, clock, dsn):
    r = await client.post("/v1/tokens", json={"kind": "whk", "name": "ttn"}, headers=world.auth)
    whk = (await r.json())["token"]
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(
            "UPDATE devices SET dev_eui = '70B3D57ED0000001' WHERE id = %s",
            (world.device_ids["fridge01"],),
        )
    up = {
        "end_device_ids": {"dev_eui": "70B3D57ED0000001"},
        "uplink_message": {
            "decoded_payload": {
                "measurements": [{"type": "temperature", "value": 3.5}],
                "battery": 90,
            },
            "rx_metadata": [{"rssi": -97, "snr": 7.5}],
        },
    }
    r = await client.post(f"/v1/ingest/lorawan?token={whk}", json=up)
    assert r.status == 200, await r.text()
    assert {c["type"] for c in (await r.json())["channels"]} == {
        "temperature",
        "battery",
        "signal",
        "snr",
    }
    up["end_device_ids"]["dev_eui"] = "70B3D57ED0000099"
    r = await client.post(f"/v1/ingest/lorawan?token={whk}", json=up)
    assert r.status == 202 and (await r.json())["unassigned"] is True
    r = await client.post(f"/v1/ingest/lorawan?token={world.devices['fridge01']}", json=up)
    assert r.status == 401


async def test_concurrent_overlapping_requests_store_each_reading_once(
    client, world: World, clock, dsn
):
    """Requests that share readings may land in one group-commit batch: each reading
    is accepted by exactly one request and counted as a duplicate by the others."""
    import asyncio

    base = clock.now - timedelta(hours=1)
    bodies = []
    for i in range(24):  # request i carries minutes i..i+7: neighbours overlap
        ms = [t(4.0 + m / 100, ts=rfc3339(base + timedelta(minutes=m))) for m in range(i, i + 8)]
        bodies.append({"device": "fridge01", "measurements": ms})
    h = world.dev_auth("fridge01")
    await client.post("/v1/ingest", json=bodies[0], headers=h)  # creates the channel
    answers = await asyncio.gather(*(client.post("/v1/ingest", json=b, headers=h) for b in bodies))
    results = [await r.json() for r in answers]
    assert all(r.status == 200 for r in answers)
    assert sum(r["accepted"] for r in results) == 24 + 7 - 8  # the first request stored 8 already
    assert all(r["accepted"] + r["deduplicated"] == 8 for r in results)
    assert await count_rows(dsn, world.account) == 24 + 7
    writer = client.app[WRITER]
    assert writer.requests >= 24  # all but the channel-creating first went through the writer


async def test_a_channel_changed_anywhere_is_read_again_on_the_next_request(
    client, world: World, clock, dsn
):
    """HTTP ingest keeps each device's channels in the process and reads them again
    only when the sum of their revisions (migration 0027) differs from the one it
    holds: a recalibration by the API or by another process's plain UPDATE (no
    notification), and a channel made meanwhile, count from the very next request."""
    cache = client.app[CHANNELS]
    h = world.dev_auth("fridge01")

    async def send(value: float, label: str = "") -> dict[str, Any]:
        clock.advance(seconds=1)
        r = await client.post("/v1/ingest", json=body(clock.now, t(value, label=label)), headers=h)
        assert r.status == 200, await r.text()
        return dict(await r.json())

    cid = (await send(4.0))["channels"][0]["channel_id"]  # creates the channel
    await send(4.0)
    reads = cache.reads
    await send(4.0)  # unchanged: the channels are not sent again
    assert cache.reads == reads
    r = await client.patch(f"/v1/channels/{cid}", headers=world.auth, json={"offset": 1.5})
    assert r.status == 200, await r.text()
    await send(4.0)
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute('UPDATE channels SET "offset" = -0.5 WHERE id = %s', (cid,))
    await send(4.0)
    assert cache.reads == reads + 2
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT m.value FROM measurements m JOIN channels c ON c.num = m.channel_num"
            " WHERE c.id = %s ORDER BY m.ts",
            (cid,),
        )
        assert [v for (v,) in await cur.fetchall()] == [4.0, 4.0, 4.0, 5.5, 3.5]
    # a channel made by another request: known to the next one (the writer's path)
    await send(3.0, label="door")
    writer = client.app[WRITER]
    before = writer.requests
    await send(3.0, label="door")
    assert writer.requests == before + 1


async def test_the_rate_count_commits_without_waiting_for_the_disk_alone(world: World, dsn, clock):
    """The authentication statement counts the request with `synchronous_commit` off
    for its own transaction only: the connection (a pool's, which writes readings
    next) is back to synchronous commit after it."""
    from opensense import ratelimit, tokens
    from opensense.ingest.authbatch import AUTH_BATCH_SQL

    _, key_id, _ = tokens.parse_or_raise(world.devices["fridge01"], ("ds_live",))
    window = ratelimit.window_start(clock.now, 60)
    args = {"key_ids": [key_id], "revs": [None], "windows": [window]}
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        async with conn.transaction():  # (as one explicit transaction, to look inside it)
            row = await (await conn.execute(AUTH_BATCH_SQL, args)).fetchone()
            assert row is not None and row[-1] == 1  # counted
            inside = await (await conn.execute("SHOW synchronous_commit")).fetchone()
            assert inside == ("off",)
        await conn.execute(AUTH_BATCH_SQL, args)  # its own transaction, as served
        after = await (await conn.execute("SHOW synchronous_commit")).fetchone()
        assert after == ("on",)
