"""Bench-rig scenarios (issue 17 items 13-14), written against `hil.rig.Rig`: run here
on the virtual rig (the real firmware on the MicroPython unix port behind a link
proxy, a fast clock), asserting on the server: every reading once, at the node's
time, no watchdog starvation. The real rig's code runs against a fake serial port
(pyserial's loop://) and a fake power switch."""

from __future__ import annotations

import asyncio
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from hil.rig import RealConfig, RealRig, VirtualRig
from opensense.node.sim import rom

from .fixtures.clock import FollowingClock
from .fixtures.firmware import assert_exactly_once, node_config, rows, wait_for
from .fixtures.server import make_world

SPEED = 120  # a reading (cadence 60 s) every half second of real time


@pytest.fixture
def clock() -> FollowingClock:
    return FollowingClock(datetime.now(UTC).replace(second=0, microsecond=0), SPEED)


async def _rig_with_node(fw_app: Any, dsn: str, clock: Any, tmp_path: Path, **ctl: Any) -> Any:
    world = await make_world(dsn, fw_app.cfg, ("fridge01",))
    a, b = rom(301), rom(302)
    rig = VirtualRig(tmp_path / "rig", fw_app.cfg.mqtt_port)
    epoch0 = int((clock.now - timedelta(hours=3)).timestamp())
    node = rig.add_node(
        "fridge01",
        # socket timeouts run in real time, the clock fast: 1 s (2 node-minutes) keeps
        # a blackholed connect from costing the loop many sampling ticks
        node_config(fw_app, world, "fridge01", {a: "top", b: "bottom"}, io_timeout_s=1),
        fw_app.tls.ca_der(),
        {
            "speed": SPEED,
            "epoch0": epoch0,
            "probes": [{"rom": a, "temp": 3.0}, {"rom": b, "temp": 4.0, "amp": 1.0}],
            **ctl,
        },
    )
    return world, rig, node


async def _drained(dsn: str, world: Any, node: Any) -> None:
    async def done() -> bool:
        taken = sum(len(v) for _, t, v, _ in node.samples())
        return len(await rows(dsn, world)) >= taken - 4

    await wait_for(done, within=60, what=lambda: node.console()[-2000:])


@pytest.mark.db
@pytest.mark.e2e
async def test_broker_blackholed_with_wifi_up(fw_app, dsn, clock, tmp_path):
    world, rig, node = await _rig_with_node(fw_app, dsn, clock, tmp_path)
    try:
        await wait_for(lambda: rows(dsn, world), what=lambda: node.console()[-2000:])
        rig.link("blackhole")  # the broker's address answers nothing: a dead uplink
        await asyncio.sleep(1)
        before = len(await rows(dsn, world))
        at_cut = len(node.samples())
        await asyncio.sleep(7)  # 14 node-minutes
        assert len(await rows(dsn, world)) == before
        assert [e for e in node.events() if "link lost" in e or "connect failed" in e]
        at_restore = len(node.samples())
        assert at_restore - at_cut >= 2  # sampled on (a loaded host skips fast ticks)
        rig.link("up")
        await _drained(dsn, world, node)
        rig.close()
        got = await rows(dsn, world)
        # every reading of the blackhole reached the server once, at its time
        assert assert_exactly_once(node, got) >= 2 * at_restore
        assert not [e for e in node.events() if "wdt_starved" in e or e.endswith(" reset")]
    finally:
        rig.close()


@pytest.mark.db
@pytest.mark.e2e
async def test_access_point_absent_at_boot(fw_app, dsn, clock, tmp_path):
    world, rig, node = await _rig_with_node(fw_app, dsn, clock, tmp_path, wifi=False)
    try:
        await asyncio.sleep(4)  # 8 node-minutes sampling with no network, no clock
        assert await rows(dsn, world) == []
        offline = len(node.samples())
        assert offline >= 3
        rig.wifi(True)
        await _drained(dsn, world, node)
        rig.close()
        got = await rows(dsn, world)
        # the readings taken before NTP answered are dated once it did, and stored once
        assert assert_exactly_once(node, got) >= 2 * offline
        assert [e for e in node.events() if " clock " in e]
    finally:
        rig.close()


def test_the_real_rig_drives_power_wifi_flash_and_consoles(tmp_path: Path):
    import serial

    (tmp_path / "rig.toml").write_text(
        'ca = "ca.der"\n'
        'power = "uhubctl -l {hub} -p {port} -a {action}"\n'
        "wifi = \"ssh bench-ap 'wifi {action}'\"\n"
        'link = "rig-link {mode} {delay_ms}"\n'
        '[[board]]\nname = "n1"\nusb_serial = "0001A2B3"\nconfig = "n1.json"\nhub = "1-1"\nport = 2\n'
    )
    cfg = RealConfig.load(tmp_path / "rig.toml")
    ran: list[list[str]] = []

    def run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
        ran.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, "SELFTEST OK\n", "")

    loops: list[Any] = []

    def open_serial(dev: str) -> Any:
        assert dev == "/dev/ttyUSB7"
        loops.append(serial.serial_for_url("loop://", timeout=0.05))
        return loops[-1]

    ports = [("/dev/ttyS0", ""), ("/dev/ttyUSB7", "0001A2B3")]
    with pytest.raises(RuntimeError, match="not plugged in"):
        RealRig(cfg, run, open_serial, lambda: ports[:1])
    rig = RealRig(cfg, run, open_serial, lambda: ports)
    try:
        loops[-1].write(b"boot: power_on\r\nsample 1\n")
        deadline = time.monotonic() + 5
        while "sample 1" not in rig.console("n1") and time.monotonic() < deadline:
            time.sleep(0.05)
        lines = rig.console("n1").splitlines()
        assert [line.split(" ", 1)[1] for line in lines] == ["boot: power_on", "sample 1"]
        assert abs(float(lines[0].split()[0]) - time.time()) < 10  # stamped when read
        rig.power_cut("n1")
        rig.wifi(False)
        rig.link("blackhole")
        rig.flash("n1")
        assert ran[:4] == [
            ["uhubctl", "-l", "1-1", "-p", "2", "-a", "off"],
            ["uhubctl", "-l", "1-1", "-p", "2", "-a", "on"],
            ["ssh", "bench-ap", "wifi down"],
            ["rig-link", "blackhole", "0"],
        ]
        flash = ran[4]
        assert flash[:3] == ["opensense", "node", "flash"] and flash[-2:] == [
            "--port",
            "/dev/ttyUSB7",
        ]
        assert flash[3] == str(tmp_path / "n1.json") and flash[5] == str(tmp_path / "ca.der")
        assert len(loops) == 2  # the console let go of the port for mpremote, then back
    finally:
        rig.close()
