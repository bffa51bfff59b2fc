"""The field path, end to end (issue 17 item 9): the real firmware on the MicroPython
unix port logs in to a site Mosquitto run with the shipped config and managed by the
real `opensense-gateway` (TLS, its own token, the same login as at the server), the
WAN is cut, the gateway is SIGKILLed and started again during the cut, the link comes
back, and the real `opensense serve` holds every reading the node took exactly once,
at the node's timestamps. Fast clock: 120 node seconds a real one."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from hil.rig import VirtualRig
from opensense.gateway import store as gateways
from opensense.mqtt.ca import make_ca, make_server_cert, write_pair
from opensense.node.sim import rom
from opensense.settings import Config

from .fixtures.firmware import assert_exactly_once, rows
from .fixtures.processes import ServerProcess
from .fixtures.server import make_world
from .gateway_rig import GatewayProcess, SiteBroker, TcpProxy, wait_for

pytestmark = pytest.mark.db

SPEED = 120  # one reading (cadence 60 s) every half second of real time


async def setup_site(dsn: str) -> tuple[Any, str]:
    world = await make_world(dsn, Config(bcrypt_rounds=4), ("fridge01",))
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        _, token = await gateways.create_gateway(conn, world.account, world.site, "back room", 4)
    return world, token


def stored(dsn: str, world: Any) -> list[tuple[str, datetime, float]]:
    return asyncio.run(rows(dsn, world))


@pytest.mark.e2e
def test_firmware_through_a_site_gateway_wan_cut_and_gateway_killed(dsn, tmp_path: Path):
    world, gw_token = asyncio.run(setup_site(dsn))
    ca_key, ca = make_ca()
    key, cert = make_server_cert(ca_key, ca, ["localhost"])
    key_file, cert_file = write_pair(tmp_path / "tls", "site", key, cert)
    from cryptography.hazmat.primitives import serialization

    ca_der = ca.public_bytes(serialization.Encoding.DER)

    server = ServerProcess(dsn)
    proxy = TcpProxy(server.port)
    broker = SiteBroker(tmp_path / "broker", tls=(cert_file, key_file))
    gw = GatewayProcess(
        tmp_path / "gw",
        server={"url": f"http://127.0.0.1:{proxy.port}", "token": gw_token, "timeout_s": 3},
        forward={"sync_interval_s": 2, "health_interval_s": 0.5},
        mqtt={
            "host": "127.0.0.1",
            "port": broker.port,
            "password": "gateway-secret",
            "password_file": broker.passwd,
            "acl_file": broker.acl,
            "reload_command": broker.reload_command,
        },
    )
    a, b = rom(201), rom(202)
    node = None
    rig = None
    try:
        dev = world.device_ids["fridge01"]
        wait_for(lambda: f"{dev}:" in broker.passwd.read_text(), 30, "the first sync")
        wait_for(lambda: gw.health().get("site_broker") == "subscribed", 30, "the subscription")
        config = {
            "wifi": {"ssid": "shop", "password": "password1"},
            # the node is pointed at the gateway's broker: nothing else changes
            "server": {"host": "localhost", "mqtt_port": broker.tls_port},
            "account": world.account,
            "device_id": dev,
            "local_id": "fridge01",
            "token": world.devices["fridge01"],
            "probes": {a: {"label": "top"}, b: {"label": "bottom"}},
            "cadence": 60,
            "io_timeout_s": 3,
            "wdt_s": 60,
            "mqtt_keepalive": 600,
        }
        epoch0 = int((datetime.now(UTC) - timedelta(hours=3)).timestamp())
        ctl = {
            "speed": SPEED,
            "epoch0": epoch0,
            "probes": [
                {"rom": a, "temp": 3.0, "amp": 1.5, "period": 2400},
                {"rom": b, "temp": 3.5, "amp": 1.0, "period": 3000},
            ],
        }
        # the node on the bench rig (hil.rig): the site broker behind its link proxy
        rig = VirtualRig(tmp_path / "rig", broker.tls_port)
        node = rig.add_node("fridge01", config, ca_der, ctl)
        wait_for(lambda: len(stored(dsn, world)) >= 6, 30, "readings through the gateway")
        assert any(e.split()[2:4] == ["connected", "mqtt"] for e in node.events())

        proxy.cut()
        wait_for(lambda: gw.health().get("uplink") == "down", 20, "the gateway to see the cut")
        before = len(stored(dsn, world))
        taken_at_cut = len(node.samples())
        time.sleep(2)
        gw.kill()  # a power cut of the gateway during the WAN cut
        time.sleep(1.5)  # the node goes on publishing: Mosquitto keeps it for the gateway
        gw.start()
        time.sleep(2)
        assert len(stored(dsn, world)) == before  # the WAN really was cut
        taken_in_cut = len(node.samples()) - taken_at_cut
        assert taken_in_cut >= 5, taken_in_cut
        proxy.restore()

        def drained() -> bool:
            taken = sum(len(v) for _, t, v, _ in node.samples() if "top" in v)
            return len(stored(dsn, world)) >= 2 * (taken_at_cut + taken_in_cut) and taken > 0

        wait_for(drained, 30, "the backlog at the server")
        node.stop()
        # what the node had published reaches the server; then nothing more comes
        wait_for(lambda: gw.queued() == 0, 20, "the gateway's queue to empty")
        got = stored(dsn, world)
        count = assert_exactly_once(node, got)
        assert count >= 2 * (taken_at_cut + taken_in_cut), count
        assert gw.dead_letters() == 0
        events = node.events()
        assert not [e for e in events if "refused" in e or "wdt_starved" in e], events[-20:]
    except BaseException:
        print(gw.log_text(), (broker.root / "mosquitto.log").read_text()[-3000:])
        if node is not None:
            print(node.console()[-3000:])
        raise
    finally:
        if rig is not None:
            rig.close()
        gw.stop()
        broker.stop()
        proxy.close()
        server.stop()
