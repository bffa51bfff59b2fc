"""End to end: two simulated nodes run the real firmware (MicroPython unix port)
against the real server and its embedded broker; the broker is down for 6 simulated
hours (fast clock: 1200 virtual seconds a real one); afterwards the server holds every
reading exactly once, in order, with correct timestamps. The nodes climb their reboot
ladder during the outage (Wi-Fi restart after 15 min, a reset after an hour), so the
queue also crosses resets, and each boot's first readings are taken before NTP."""

from __future__ import annotations

import asyncio
import socket
from datetime import UTC, datetime, timedelta

import pytest

from opensense.api.keys import MQTT
from opensense.node.sim import rom

from .fixtures.clock import FollowingClock
from .fixtures.firmware import assert_exactly_once, node_config, rows, wait_for
from .fixtures.server import make_world

pytestmark = pytest.mark.db

SPEED = 1200
OUTAGE_S = 6 * 3600


@pytest.fixture
def clock() -> FollowingClock:
    """The server's clock runs at the nodes' speed (it stays 8 h ahead of their world):
    a frozen one would see every reading "in the future" after 8 h of node time, i.e.
    24 s of real time, which a loaded host can take to get through the test."""
    return FollowingClock(datetime.now(UTC).replace(second=0, microsecond=0), SPEED)


@pytest.mark.e2e
async def test_two_nodes_through_a_six_hour_broker_outage(fw_app, dsn, clock, sim_nodes):
    world = await make_world(dsn, fw_app.cfg, ("fridge01", "freezer01"))
    epoch0 = int((clock.now - timedelta(hours=8)).timestamp())
    nodes = {}
    for i, (local_id, base) in enumerate((("fridge01", 3.0), ("freezer01", -20.0))):
        a, b = rom(100 + 2 * i), rom(101 + 2 * i)
        nodes[local_id] = sim_nodes(
            local_id,
            node_config(fw_app, world, local_id, {a: "top", b: "bottom"}),
            fw_app.tls.ca_der(),
            {
                "speed": SPEED,
                "epoch0": epoch0,
                "probes": [
                    {"rom": a, "temp": base, "amp": 1.5, "period": 2400},
                    {"rom": b, "temp": base + 0.5, "amp": 1.0, "period": 3000},
                ],
            },
        )
    for n in nodes.values():
        n.start()

    async def online() -> bool:
        return all([len(await rows(dsn, world, device=d)) >= 10 for d in nodes])

    await wait_for(online, what=lambda: nodes["fridge01"].console()[-2000:])
    broker = fw_app.app[MQTT]
    await broker.stop()
    with pytest.raises(OSError):  # the listener is gone: nobody answers on the port
        socket.create_connection(("127.0.0.1", fw_app.cfg.mqtt_port), 1).close()
    stored_before = {d: len(await rows(dsn, world, device=d)) for d in nodes}
    await asyncio.sleep(OUTAGE_S / SPEED)
    during = {d: len(await rows(dsn, world, device=d)) for d in nodes}
    late = [e for n in nodes.values() for e in n.events() if "connected" in e.split()[2:3]]
    assert during == stored_before, late  # the broker really was away
    await broker.start()

    async def drained() -> bool:
        for d, n in nodes.items():
            taken = sum(len(v) for _, t, v, _ in n.samples())
            if len(await rows(dsn, world, device=d)) < taken - 4:
                return False
        return True

    await wait_for(drained, within=120, what=lambda: nodes["fridge01"].console()[-2000:])
    for n in nodes.values():
        n.stop()
    for d, n in nodes.items():
        got = await rows(dsn, world, device=d)
        count = assert_exactly_once(n, got)
        # the node kept sampling through the whole outage: its readings (every one of
        # them stored, above) span it with no hole of hours (a reset of the reboot
        # ladder takes minutes; 2 h is 6 s of real time, more than a loaded host stalls). Measured on the node's own samples, not as a share of the ideal 720
        # (6 h, one a minute, two probes): a busy host makes a fast-clock node skip
        # ticks, which is no fault of the queue (a loaded run stored 560 of 720)
        true = sorted(tt for _, t, _, tt in n.samples() if t > 0)
        assert true[-1] - true[0] >= OUTAGE_S, (d, true[0], true[-1])
        gaps = [b - a for a, b in zip(true, true[1:], strict=False)]
        assert max(gaps) <= 2 * 3600, (d, max(gaps))
        assert count >= 2 * (OUTAGE_S // 60) // 2, (d, count)  # at least half the ticks
        resets = [e for e in n.events() if e.endswith(" reset")]
        assert len(resets) >= 4, resets  # the reboot ladder ran during the outage
        assert not [e for e in n.events() if "wdt_starved" in e]
