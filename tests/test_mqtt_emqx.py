"""The EMQX HTTP authentication and authorization endpoints (EMQX 5 contract)."""

from __future__ import annotations

from typing import Any

import pytest

from opensense.app import create_app
from opensense_contract import topics

from .fixtures.server import World, make_world, test_config

pytestmark = pytest.mark.db
SECRET = "emqx-shared-secret"
H = {"Authorization": f"Bearer {SECRET}"}


@pytest.fixture
async def app(aiohttp_client: Any, dsn: str, clock: Any) -> Any:
    client = await aiohttp_client(create_app(test_config(clock, emqx_secret=SECRET), dsn))
    client.world = await make_world(dsn, test_config(clock), ("fridge01", "fridge02"))
    return client


async def test_authn_allows_the_devices_own_token_only(app):
    w: World = app.world
    dev, tok = w.device_ids["fridge01"], w.devices["fridge01"]
    r = await app.post(
        "/v1/mqtt/emqx/authn", json={"username": dev, "password": tok, "clientid": dev}, headers=H
    )
    assert await r.json() == {"result": "allow", "is_superuser": False}
    for user, pw in ((dev, w.devices["fridge02"]), (dev, "nonsense"), ("dev_nobody", tok)):
        r = await app.post(
            "/v1/mqtt/emqx/authn", json={"username": user, "password": pw}, headers=H
        )
        assert r.status == 200 and (await r.json())["result"] == "deny"
    await app.post(f"/v1/devices/{dev}/rotate-token", headers=w.auth)
    r = await app.post("/v1/mqtt/emqx/authn", json={"username": dev, "password": tok}, headers=H)
    assert (await r.json())["result"] == "deny"  # rotation takes effect at the next CONNECT


async def test_authz_follows_the_device_acl(app):
    w: World = app.world
    dev = w.device_ids["fridge01"]
    cases = [
        ("publish", topics.topic(w.account, "fridge01"), "allow"),
        ("publish", topics.topic(w.account, "fridge01", "info"), "allow"),
        ("publish", topics.topic(w.account, "fridge02"), "deny"),
        ("publish", topics.topic(w.account, "fridge01", "cmd/identify"), "deny"),
        ("subscribe", topics.topic(w.account, "fridge01", "cmd/#"), "allow"),
        ("subscribe", f"opensense/{w.account}/+/cmd/#", "deny"),
    ]
    for action, topic, expected in cases:
        r = await app.post(
            "/v1/mqtt/emqx/authz",
            json={"username": dev, "topic": topic, "action": action},
            headers=H,
        )
        assert (await r.json())["result"] == expected, (action, topic)


async def test_secret_is_required(app, aiohttp_client, dsn, clock):
    r = await app.post("/v1/mqtt/emqx/authn", json={"username": "x", "password": "y"})
    assert r.status == 401
    r = await app.post(
        "/v1/mqtt/emqx/authn",
        json={"username": "x", "password": "y"},
        headers={"Authorization": "Bearer wrong"},
    )
    assert r.status == 401
    off = await aiohttp_client(create_app(test_config(clock), dsn))
    r = await off.post("/v1/mqtt/emqx/authn", json={"username": "x", "password": "y"}, headers=H)
    assert r.status == 404  # not enabled without OPENSENSE_EMQX_SECRET
