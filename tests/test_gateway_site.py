"""The gateway at a site, with real processes: the local HTTP door, node tokens
checked offline (site broker and HTTP) and a rotation reaching the site, readings the
server refuses kept as dead letters and reported in health, a revoked gateway token
never retried and nothing dropped."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psycopg
import pytest

from opensense.devices import store
from opensense.gateway import store as gateways
from opensense.settings import Config

from .fixtures.processes import ServerProcess, free_port
from .fixtures.server import make_world
from .gateway_rig import GatewayProcess, SiteBroker, connected_node, refused_node, wait_for

pytestmark = pytest.mark.db


async def setup_site(dsn: str) -> tuple[Any, str, str]:
    world = await make_world(dsn, Config(bcrypt_rounds=4), ("fridge01", "fridge02"))
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        gw, token = await gateways.create_gateway(conn, world.account, world.site, "back room", 4)
    return world, gw["id"], token


def post(url: str, token: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def stored(dsn: str, account: str, local_id: str) -> list[float]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT m.value FROM measurements m JOIN channels c ON c.num = m.channel_num"
            " JOIN devices d ON d.id = c.device_id WHERE c.account_id = %s AND d.local_id = %s"
            " ORDER BY m.ts",
            (account, local_id),
        ).fetchall()
    return [r[0] for r in rows]


def rotate(dsn: str, world: Any) -> str:
    async def go() -> str:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            from datetime import UTC, datetime

            _, tok = await store.rotate_device_token(
                conn, world.account, world.device_ids["fridge01"], 4, datetime.now(UTC)
            )
            return tok

    return asyncio.run(go())


@pytest.fixture
def site(dsn: str, tmp_path: Path) -> Any:
    world, gid, gw_token = asyncio.run(setup_site(dsn))
    server = ServerProcess(dsn)
    broker = SiteBroker(tmp_path / "broker")
    http_port = free_port()
    gw = GatewayProcess(
        tmp_path / "gw",
        server={"url": server.url, "token": gw_token, "timeout_s": 3},
        forward={"sync_interval_s": 1, "health_interval_s": 0.5},
        mqtt={
            "host": "127.0.0.1",
            "port": broker.port,
            "password": "gateway-secret",
            "password_file": broker.passwd,
            "acl_file": broker.acl,
            "reload_command": broker.reload_command,
        },
        http={"listen": f"127.0.0.1:{http_port}"},
    )
    try:
        wait_for(
            lambda: f"{world.device_ids['fridge02']}:" in broker.passwd.read_text(),
            30,
            "the first sync",
        )
        wait_for(lambda: gw.health().get("uplink") == "up", 30, "the uplink")
        wait_for(lambda: gw.health().get("site_broker") == "subscribed", 30, "the subscription")
    except AssertionError:
        print(gw.log_text(), Path(server.log.name).read_text()[-3000:])
        gw.stop()
        broker.stop()
        server.stop()
        raise
    yield world, gid, gw, broker, server, f"http://127.0.0.1:{http_port}"
    gw.stop()
    broker.stop()
    server.stop()


def test_http_door_tokens_rotation_and_dead_letters(site, dsn):
    world, gid, gw, broker, server, local = site
    try:
        # a node that can only POST: the docs/product.md#ingest format, at the gateway
        body = {"device": "fridge01", "measurements": [{"type": "temperature", "value": 4.5}]}
        status, answer = post(local + "/v1/ingest", world.devices["fridge01"], body)
        assert status == 200 and answer["accepted"] == 1, answer
        wait_for(lambda: stored(dsn, world.account, "fridge01") == [4.5], 20, "the HTTP reading")
        # another node's token cannot speak for fridge01; a made-up token is refused
        status, answer = post(local + "/v1/ingest", world.devices["fridge02"], body)
        assert status == 400 and "cannot send for" in answer["error"]["message"]
        status, answer = post(local + "/v1/ingest", "ds_live_" + "a" * 12 + "_" + "b" * 32, body)
        assert status == 401 and answer["error"]["code"] == "token_invalid"

        # the site broker checks the node's own token: a wrong one cannot connect
        assert refused_node(
            broker.port,
            world.account,
            "fridge02",
            world.devices["fridge01"],
            world.device_ids["fridge02"],
        )
        # a reading the server refuses (outside the physical range) becomes a dead
        # letter, visible in the gateway's health on the server
        node = connected_node(
            broker.port,
            world.account,
            "fridge02",
            world.devices["fridge02"],
            world.device_ids["fridge02"],
        )
        node.publish(time.time() - 60, 4.0).wait_for_publish(10)
        node.publish(time.time(), 9999.0).wait_for_publish(10)
        wait_for(lambda: stored(dsn, world.account, "fridge02") == [4.0], 20, "fridge02's reading")
        wait_for(lambda: gw.dead_letters() == 1, 20, "the dead letter")

        def server_health() -> dict[str, Any]:
            with psycopg.connect(dsn) as conn:
                row = conn.execute("SELECT health FROM gateways WHERE id = %s", (gid,)).fetchone()
            return dict(row[0]) if row else {}

        h = wait_for(lambda: (h := server_health()).get("dead_letters") == 1 and h, 20, "health")
        assert h["queue_depth"] == 0 and h["uplink"] == "up" and h["last_sync"]
        node.close()

        # rotation: at the next sync the old token stops working at the site
        old = world.devices["fridge01"]
        new = rotate(dsn, world)
        wait_for(
            lambda: post(local + "/v1/ingest", old, body)[0] == 401, 20, "the old token to fail"
        )
        recent = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 30))
        status, _ = post(local + "/v1/ingest", new, body | {"ts": recent})
        assert status == 200
        # Mosquitto reloads its password file on SIGHUP, a moment later
        assert refused_node(
            broker.port, world.account, "fridge01", old, world.device_ids["fridge01"]
        )
        connected_node(
            broker.port, world.account, "fridge01", new, world.device_ids["fridge01"]
        ).close()
    except BaseException:
        print(gw.log_text())
        raise


def test_revoked_gateway_token_is_never_retried_and_keeps_the_readings(site, dsn):
    world, gid, gw, broker, server, local = site

    def refusals() -> int:
        with psycopg.connect(dsn) as conn:
            row = conn.execute(
                "SELECT count(*) FROM request_log WHERE path LIKE '/v1/gateway/%%' AND status = 401"
            ).fetchone()
        return int(row[0]) if row else 0

    earlier = refusals()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE tokens SET revoked_at = now() WHERE gateway_id = %s", (gid,))
    wait_for(lambda: gw.health().get("uplink") == "refused", 20, "the gateway to stop")
    body = {"device": "fridge01", "measurements": [{"type": "temperature", "value": 3.0}]}
    status, _ = post(local + "/v1/ingest", world.devices["fridge01"], body)
    assert status == 200  # still taken in and kept: nothing is lost
    wait_for(lambda: gw.queued() == 1, 10, "the reading in the queue")
    # the request log is written in batches: wait for the one refusal, then watch
    wait_for(lambda: refusals() > earlier, 10, "the 401 in the request log")
    time.sleep(3)
    assert refusals() == earlier + 1  # never retried on its own
    assert gw.queued() == 1 and stored(dsn, world.account, "fridge01") == []
