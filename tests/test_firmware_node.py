"""The real firmware on the MicroPython unix port (simulated board) against the real
server and its embedded TLS broker: readings arrive, commands work, certificates are
checked, a broker that drops PUBACKs or restarts mid-replay leaves no gap."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from opensense.app import create_app
from opensense.mqtt.ca import TlsFiles
from opensense.node.sim import SimNode, rom

from .fixtures.processes import free_port
from .fixtures.server import World, make_world, test_config

pytestmark = pytest.mark.db


@pytest.fixture
async def mqtt_app(aiohttp_client: Any, dsn: str, clock: Any, tmp_path: Path) -> Any:
    os.chmod(tmp_path, 0o755)
    cfg = test_config(
        clock,
        mqtt="embedded",
        mqtt_port=free_port(),
        state_dir=tmp_path,
        ingest_rate_per_min=100_000,
    )
    client = await aiohttp_client(create_app(cfg, dsn))
    client.cfg = cfg
    d = tmp_path / "mqtt-tls"
    client.tls = TlsFiles(d / "ca.pem", d / "server.pem", d / "server.key")
    return client


def node_config(
    app: Any, world: World, local_id: str, probes: dict[str, str], **kw: Any
) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "wifi": {"ssid": "shop", "password": "password1"},
        "server": {"host": "localhost", "mqtt_port": app.cfg.mqtt_port},
        "account": world.account,
        "device_id": world.device_ids[local_id],
        "local_id": local_id,
        "token": world.devices[local_id],
        "probes": {r: {"label": label} for r, label in probes.items()},
        "cadence": 60,
        "io_timeout_s": 3,
        "wdt_s": 60,
    }
    cfg.update(kw)
    return cfg


@pytest.fixture
async def sim_nodes(tmp_path: Path) -> AsyncIterator[Callable[..., SimNode]]:
    made: list[SimNode] = []

    def make(name: str, config: dict[str, Any], ca: bytes, ctl: dict[str, Any]) -> SimNode:
        n = SimNode(tmp_path / name, config, ca, ctl)
        made.append(n)
        return n

    yield make
    for n in made:
        await asyncio.to_thread(n.stop)


async def rows(
    dsn: str, world: World, kind: str = "temperature", device: str = "fridge01"
) -> list[tuple[str, datetime, float]]:
    """(label, ts, value) of one device's channels of one kind, by label and time."""
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT c.label, m.ts, m.value FROM measurements m"
            " JOIN channels c ON c.num = m.channel_num JOIN devices d ON d.id = c.device_id"
            " WHERE c.account_id = %s AND c.kind = %s AND d.local_id = %s"
            " ORDER BY c.label, m.ts",
            (world.account, kind, device),
        )
        return [(r[0], r[1], r[2]) for r in await cur.fetchall()]


async def wait_for(
    pred: Callable[[], Any], within: float = 60, what: Callable[[], str] = lambda: ""
) -> Any:
    deadline = time.monotonic() + within
    while True:
        v = await pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what()}")
        await asyncio.sleep(0.2)


async def test_node_reports_over_tls_mqtt_and_obeys_commands(mqtt_app, dsn, clock, sim_nodes):
    world = await make_world(dsn, mqtt_app.cfg, ("fridge01",))
    r1, r2 = rom(1), rom(2)
    epoch0 = int((clock.now - timedelta(hours=1)).timestamp())
    n = sim_nodes(
        "n1",
        node_config(mqtt_app, world, "fridge01", {r1: "front", r2: "back"}),
        mqtt_app.tls.ca_der(),
        {
            "speed": 60,
            "epoch0": epoch0,
            "probes": [{"rom": r1, "temp": 3.5}, {"rom": r2, "temp": -1.25}],
        },
    )
    n.start()

    async def five() -> Any:
        got = await rows(dsn, world)
        return got if len([g for g in got if g[0] == "front"]) >= 5 else None

    got = await wait_for(five, what=lambda: "5 readings: " + n.console()[-3000:])
    assert {v for label, _, v in got if label == "front"} == {3.5}
    assert {v for label, _, v in got if label == "back"} == {-1.25}
    fronts = [ts for label, ts, _ in got if label == "front"]
    assert all(b - a == timedelta(seconds=60) for a, b in zip(fronts, fronts[1:], strict=False))
    assert all(abs(ts.timestamp() - epoch0) < 3 * 3600 for ts in fronts)
    print(n.console()[-2000:])
