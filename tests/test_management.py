"""Management API: sites, devices (create, move with history, delete keeping data),
channels (offset, thresholds), tokens (shown once, last_used_at, revocation)."""

from __future__ import annotations

from datetime import timedelta

import psycopg
import pytest

from opensense.api.jsonutil import rfc3339
from opensense.api.keys import VERIFIER

from .fixtures.server import World

pytestmark = pytest.mark.db


async def test_sites_and_devices(client, world: World):
    r = await client.post(
        "/v1/sites",
        json={"name": "Bakery", "timezone": "Europe/Vienna", "vertical": "frozen"},
        headers=world.auth,
    )
    assert r.status == 201
    site = await r.json()
    assert site["id"].startswith("site_") and site["vertical"] == "frozen"
    r = await client.post(
        "/v1/sites", json={"name": "X", "timezone": "Mars/Olympus"}, headers=world.auth
    )
    assert r.status == 400 and "IANA" in (await r.json())["error"]["message"]

    r = await client.post(
        "/v1/devices",
        json={"site_id": site["id"], "local_id": "freezer01", "cadence_s": 120},
        headers=world.auth,
    )
    assert r.status == 201
    dev = await r.json()
    assert dev["id"].startswith("dev_") and dev["ingest_token"].startswith("ds_live_")
    assert dev["token"]["last_used_at"] is None and dev["online"] is False
    # the token is shown once: reads never carry it
    r = await client.get(f"/v1/devices/{dev['id']}", headers=world.auth)
    assert "ingest_token" not in await r.json()
    r = await client.post(
        "/v1/devices", json={"site_id": site["id"], "local_id": "freezer01"}, headers=world.auth
    )
    assert r.status == 409
    r = await client.patch(
        "/v1/devices/freezer01", json={"name": "Chest freezer"}, headers=world.auth
    )
    assert (await r.json())["name"] == "Chest freezer"
    listed = await (await client.get("/v1/devices", headers=world.auth)).json()
    assert {d["local_id"] for d in listed["data"]} == {"fridge01", "fridge02", "freezer01"}


async def test_first_uplink_uses_the_sites_vertical(client, world: World, clock):
    r = await client.post(
        "/v1/sites", json={"name": "Ice", "vertical": "frozen"}, headers=world.auth
    )
    site = await r.json()
    dev = await (
        await client.post(
            "/v1/devices", json={"site_id": site["id"], "local_id": "fz"}, headers=world.auth
        )
    ).json()
    r = await client.post(
        "/v1/ingest",
        json={"device": "fz", "measurements": [{"type": "temperature", "value": -20}]},
        headers={"Authorization": f"Bearer {dev['ingest_token']}"},
    )
    cid = (await r.json())["channels"][0]["channel_id"]
    ch = await (await client.get(f"/v1/channels/{cid}", headers=world.auth)).json()
    assert ch["rules"][0]["params"] == {"ok_min": -24.0, "ok_max": -18.0}
    assert ch["rules"][0]["grace_min"] == 30


async def test_move_keeps_history_under_the_old_site(client, world: World, clock):
    new_site = await (
        await client.post("/v1/sites", json={"name": "Branch"}, headers=world.auth)
    ).json()
    dev = world.device_ids["fridge01"]
    before_move = clock.now
    clock.advance(minutes=10)
    r = await client.post(
        f"/v1/devices/{dev}/move",
        json={"site_id": new_site["id"], "effective_at": rfc3339(clock.now)},
        headers=world.auth,
    )
    assert r.status == 200 and (await r.json())["site_id"] == new_site["id"]
    then = await (
        await client.get(
            f"/v1/sites/{world.site}/devices",
            params={"at": rfc3339(before_move)},
            headers=world.auth,
        )
    ).json()
    assert dev in [d["id"] for d in then["data"]]
    now_old = await (await client.get(f"/v1/sites/{world.site}/devices", headers=world.auth)).json()
    assert dev not in [d["id"] for d in now_old["data"]]
    pl = await (await client.get(f"/v1/devices/{dev}/placements", headers=world.auth)).json()
    assert [p["site_id"] for p in pl["data"]] == [world.site, new_site["id"]]
    # a move may not be slipped in before the last one: history is never rewritten
    r = await client.post(
        f"/v1/devices/{dev}/move",
        json={"site_id": world.site, "effective_at": rfc3339(before_move)},
        headers=world.auth,
    )
    assert r.status == 422 and (await r.json())["error"]["code"] == "invalid_range"


async def test_delete_revokes_token_and_keeps_measurements(client, world: World, clock):
    h = world.dev_auth("fridge01")
    r = await client.post(
        "/v1/ingest",
        json={"device": "fridge01", "measurements": [{"type": "temperature", "value": 4.0}]},
        headers=h,
    )
    cid = (await r.json())["channels"][0]["channel_id"]
    r = await client.delete(f"/v1/devices/{world.device_ids['fridge01']}", headers=world.auth)
    assert r.status == 204
    r = await client.post(
        "/v1/ingest",
        json={"device": "fridge01", "measurements": [{"type": "temperature", "value": 4.0}]},
        headers=h,
    )
    assert r.status == 401
    r = await client.get(
        f"/v1/channels/{cid}/measurements",
        params={"to": rfc3339(clock.now + timedelta(seconds=1))},
        headers=world.auth,
    )
    assert len((await r.json())["data"]) == 1
    r = await client.get(f"/v1/devices/{world.device_ids['fridge01']}", headers=world.auth)
    assert r.status == 404


async def test_channel_offset_and_thresholds(client, world: World, clock, dsn):
    r = await client.post(
        "/v1/ingest",
        json={"device": "fridge01", "measurements": [{"type": "temperature", "value": 4.0}]},
        headers=world.dev_auth("fridge01"),
    )
    cid = (await r.json())["channels"][0]["channel_id"]
    r = await client.patch(
        f"/v1/channels/{cid}",
        json={"offset": -0.5, "ok_max": 6, "grace_min": 20},
        headers=world.auth,
    )
    ch = await r.json()
    assert (
        ch["offset"] == -0.5
        and ch["rules"][0]["params"]["ok_max"] == 6
        and ch["rules"][0]["grace_min"] == 20
    )
    r = await client.patch(f"/v1/channels/{cid}", json={"ok_min": 9}, headers=world.auth)
    assert r.status == 422 and (await r.json())["error"]["code"] == "invalid_range"
    clock.advance(minutes=1)
    await client.post(
        "/v1/ingest",
        json={"device": "fridge01", "measurements": [{"type": "temperature", "value": 4.0}]},
        headers=world.dev_auth("fridge01"),
    )
    r = await client.get(
        f"/v1/channels/{cid}/measurements",
        params={"to": rfc3339(clock.now + timedelta(seconds=1))},
        headers=world.auth,
    )
    # the correction applies from when it was set; the earlier reading is not rewritten
    assert [v for _, v in (await r.json())["data"]] == [4.0, 3.5]
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            'SELECT "offset" FROM channel_offsets WHERE channel_id = %s', (cid,)
        )
        assert [r[0] for r in await cur.fetchall()] == [-0.5]


async def test_user_tokens_last_used_and_revocation(client, world: World, clock, dsn):
    r = await client.post("/v1/tokens", json={"name": "ci"}, headers=world.auth)
    assert r.status == 201
    new = await r.json()
    h = {"Authorization": f"Bearer {new['token']}"}
    verifier = client.app[VERIFIER]
    checks = verifier.bcrypt_checks
    for _ in range(5):
        assert (await client.get("/v1/sites", headers=h)).status == 200
    assert verifier.bcrypt_checks == checks + 1  # one bcrypt check for a known token, not five

    async def last_used():
        async with await psycopg.AsyncConnection.connect(dsn) as conn:
            cur = await conn.execute("SELECT last_used_at FROM tokens WHERE id = %s", (new["id"],))
            return (await cur.fetchone())[0]

    first = await last_used()
    assert first == clock.now
    clock.advance(seconds=30)
    await client.get("/v1/sites", headers=h)
    assert await last_used() == first  # written at most once a minute
    clock.advance(seconds=31)
    await client.get("/v1/sites", headers=h)
    assert await last_used() == clock.now

    listed = await (await client.get("/v1/tokens", headers=world.auth)).json()
    assert new["id"] in [t["id"] for t in listed["data"]]
    assert all("token" not in t and "hash" not in t for t in listed["data"])
    assert (await client.delete(f"/v1/tokens/{new['id']}", headers=world.auth)).status == 204
    r = await client.get("/v1/sites", headers=h)
    assert r.status == 401 and (await r.json())["error"]["code"] == "token_invalid"


async def test_old_tokens_are_flagged_but_keep_working(client, world: World, clock):
    clock.advance(days=366)
    devs = await (await client.get("/v1/devices", headers=world.auth)).json()
    assert all(d["token"]["rotate_recommended"] for d in devs["data"])
    r = await client.post(
        "/v1/ingest",
        json={"device": "fridge01", "measurements": [{"type": "temperature", "value": 4.0}]},
        headers=world.dev_auth("fridge01"),
    )
    assert r.status == 200


async def test_read_rate_limit_per_account(client, world: World, clock):
    clock.now = clock.now.replace(second=0)
    for _ in range(120):
        assert (await client.get("/v1/sites", headers=world.auth)).status == 200
    r = await client.get("/v1/sites", headers=world.auth)
    assert r.status == 429 and int(r.headers["Retry-After"]) == 60
