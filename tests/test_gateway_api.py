"""The server side of the site gateway: gw_ tokens, sync, batch ingest scoped to the
gateway's site (per-reading rejections, exactly once), health, local alerts."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import psycopg
import pytest

from opensense.api.jsonutil import rfc3339
from opensense.devices import store
from opensense.gateway import store as gateways
from opensense.tokens import site_hash

from .fixtures.server import World, make_world

pytestmark = pytest.mark.db


async def make_gateway(dsn: str, world: World) -> tuple[str, str]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        gw, token = await gateways.create_gateway(conn, world.account, world.site, "back room", 4)
    return gw["id"], token


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_site_hash_is_mosquitto_pbkdf2():
    h = site_hash("ds_live_x", salt=b"\x00" * 12)
    assert h.startswith("$7$101$AAAAAAAAAAAAAAAA$")
    from opensense_gateway.mosquitto import check_hash

    assert check_hash("ds_live_x", h)
    assert not check_hash("ds_live_y", h)


async def test_sync_lists_site_devices_hashes_and_rules(client, world: World, dsn, clock):
    gid, token = await make_gateway(dsn, world)
    r = await client.get("/v1/gateway/sync", headers=auth(token))
    assert r.status == 200, await r.text()
    doc = await r.json()
    assert doc["gateway"]["id"] == gid and doc["account_id"] == world.account
    devs = {d["local_id"]: d for d in doc["devices"]}
    assert set(devs) == {"fridge01", "fridge02"}
    from opensense_gateway.mosquitto import check_hash

    assert check_hash(world.devices["fridge01"], devs["fridge01"]["site_hash"])
    assert not check_hash(world.devices["fridge02"], devs["fridge01"]["site_hash"])
    assert doc["defaults"][0]["kind"] == "range"
    # a device token is no gateway token, and the other way round
    r = await client.get("/v1/gateway/sync", headers=world.dev_auth("fridge01"))
    assert r.status == 401
    r = await client.post("/v1/ingest", headers=auth(token), json={})
    assert r.status == 401


def batch(series: list[dict[str, Any]], bid: str = "b1") -> dict[str, Any]:
    return {"batch": bid, "series": series}


async def test_ingest_scoped_to_site_exactly_once(client, world: World, dsn, clock, config):
    gid, token = await make_gateway(dsn, world)
    other = await make_world(dsn, config, ("elsewhere",))
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        site2 = await store.create_site(
            conn, world.account, {"name": "Other", "vertical": "frozen"}
        )
        await store.create_device(
            conn, world.account, {"site_id": site2["id"], "local_id": "remote"}, 4, clock()
        )
    t0 = int(clock().timestamp()) - 3600
    ts = [t0 + 60 * i for i in range(10)]
    body = batch(
        [
            {
                "device": "fridge01",
                "type": "temperature",
                "label": "",
                "ts": ts,
                "values": [4.0] * 10,
            },
            {"device": "fridge02", "type": "temperature", "ts": ts[:2], "values": [3.0, 9999.0]},
            {"device": "remote", "type": "temperature", "ts": ts[:1], "values": [1.0]},
            {"device": "elsewhere", "type": "temperature", "ts": ts[:1], "values": [1.0]},
            {"device": "fridge01", "type": "nope", "ts": ts[:1], "values": [1.0]},
        ]
    )
    r = await client.post("/v1/gateway/ingest", headers=auth(token), json=body)
    assert r.status == 200, await r.text()
    a = await r.json()
    assert a["accepted"] == 11 and a["deduplicated"] == 0
    codes = sorted((x["series"], x["index"], x["code"]) for x in a["rejected"])
    assert codes == [
        (1, 1, "out_of_range"),
        (2, 0, "forbidden"),
        (3, 0, "device_not_found"),
        (4, 0, "unknown_kind"),
    ]
    # the same batch again (an answer lost on the way): nothing stored twice
    r = await client.post("/v1/gateway/ingest", headers=auth(token), json=body)
    a = await r.json()
    assert a["accepted"] == 0 and a["deduplicated"] == 11
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT d.local_id, b.n, b.ts_from, b.ts_to FROM gateway_batches b"
            " JOIN devices d ON d.id = b.device_id WHERE b.gateway_id = %s ORDER BY 1",
            (gid,),
        )
        rows = await cur.fetchall()
    assert [(r[0], r[1]) for r in rows] == [("fridge01", 10), ("fridge02", 1)]
    assert int(rows[0][2].timestamp()) == ts[0] and int(rows[0][3].timestamp()) == ts[-1]
    del other


async def test_bad_batch_shape_is_400(client, world: World, dsn):
    _, token = await make_gateway(dsn, world)
    r = await client.post("/v1/gateway/ingest", headers=auth(token), json={"batch": "x"})
    assert r.status == 400
    assert (await r.json())["error"]["code"] == "invalid_request"


async def test_health_and_local_alerts(client, world: World, dsn, clock):
    gid, token = await make_gateway(dsn, world)
    h = {
        "queue_depth": 12,
        "oldest_unsent_s": 3.5,
        "uplink": "up",
        "last_sync": None,
        "dead_letters": 0,
    }
    r = await client.post("/v1/gateway/health", headers=auth(token), json=h)
    assert r.status == 200, await r.text()
    # a channel the alert names
    await client.post(
        "/v1/ingest",
        headers=world.dev_auth("fridge01"),
        json={"device": "fridge01", "measurements": [{"type": "temperature", "value": 4}]},
    )
    # the server then hears nothing from the gateway for an hour: an uplink gap, in
    # which the gateway alerted locally (issue 11: only then is a local alert taken)
    before = clock()
    clock.advance(hours=1)
    alert = {
        "ref": "a1",
        "device": "fridge01",
        "type": "temperature",
        "label": "",
        "opened_at": rfc3339(before + timedelta(minutes=15)),
        "notified_at": rfc3339(before + timedelta(minutes=15, seconds=2)),
        "path": "smtp",
    }
    r = await client.post("/v1/gateway/local-alerts", headers=auth(token), json={"alerts": [alert]})
    assert (await r.json()) == {"stored": 1}
    alert["cleared_at"] = rfc3339(before + timedelta(minutes=50))
    r = await client.post("/v1/gateway/local-alerts", headers=auth(token), json={"alerts": [alert]})
    assert r.status == 200
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute("SELECT health, last_seen_at FROM gateways WHERE id = %s", (gid,))
        health, seen = await cur.fetchone()  # type: ignore[misc]
        cur = await conn.execute(
            "SELECT channel_id, path, cleared_at IS NOT NULL FROM local_alerts WHERE gateway_id = %s",
            (gid,),
        )
        alerts = await cur.fetchall()
    assert health["queue_depth"] == 12 and seen is not None
    assert len(alerts) == 1 and alerts[0][0].startswith("chn_") and alerts[0][1:] == ("smtp", True)


async def test_revoked_gateway_token_is_refused_at_once(client, world: World, dsn, clock):
    gid, token = await make_gateway(dsn, world)
    r = await client.get("/v1/gateway/sync", headers=auth(token))
    assert r.status == 200
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("UPDATE tokens SET revoked_at = now() WHERE gateway_id = %s", (gid,))
    r = await client.get("/v1/gateway/sync", headers=auth(token))
    assert r.status == 401


async def test_rotated_gateway_token(client, world: World, dsn, clock):
    gid, old = await make_gateway(dsn, world)
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        _, new = await gateways.rotate_gateway_token(conn, world.account, gid, 4, clock())
    assert (await client.get("/v1/gateway/sync", headers=auth(old))).status == 401
    assert (await client.get("/v1/gateway/sync", headers=auth(new))).status == 200
