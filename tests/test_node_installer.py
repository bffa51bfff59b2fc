"""The installer (`opensense node check|flash`): the config and CA are checked before
anything is written, the firmware compiles with mpy-cross, the mpremote plan installs
the pinned dependencies to /lib and ends with the clock and a self-test; the self-test
itself runs on a simulated node against the real server."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from opensense.mqtt.ca import make_ca, make_server_cert
from opensense.node import flash
from opensense.node.deps import FIRMWARE
from opensense.node.sim import SimNode, micropython, rom

from .fixtures.firmware import node_config, rows
from .fixtures.server import make_world


def good_config() -> dict[str, Any]:
    return {
        "wifi": {"ssid": "shop", "password": "password1"},
        "server": {"host": "mqtt.shop.example", "mqtt_port": 8883},
        "account": "acc_abc",
        "device_id": "dev_abc",
        "local_id": "fridge01",
        "token": "ds_live_abcdefgh",
        "probes": {rom(1): {"label": "front", "offset": -0.25}, rom(2): {"label": "back"}},
        "cadence": 60,
    }


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    _, ca = make_ca()
    (tmp_path / "ca.der").write_bytes(ca.public_bytes(serialization.Encoding.DER))
    (tmp_path / "config.json").write_text(json.dumps(good_config()))
    return tmp_path / "config.json", tmp_path / "ca.der"


def test_a_good_config_passes_all_checks(files):
    said: list[str] = []
    st = flash.check(*files, say=said.append)
    assert said[0].startswith("[1/6]") and any(s.startswith("[3/6]") for s in said)
    dests = [c.dest for c in st["copies"]]
    assert "/lib/umqtt/simple.py" in dests and "/lib/urequests.py" in dests
    assert "/sense/fq.py" in dests and "/hw/esp32.py" in dests and "/main.py" in dests
    assert "/hw/sim.py" not in dests  # the simulated board stays on the computer
    assert dests[-2:] == ["/config.json", "/ca.der"]


@pytest.mark.parametrize(
    "change, expect",
    [
        (lambda c: c["probes"].update({rom(1)[:-2] + "00": {"label": "x"}}), "bad CRC"),
        (lambda c: c["probes"].update({"10" + rom(3)[2:]: {"label": "x"}}), "not a DS18B20"),
        (lambda c: c["probes"][rom(2)].update(label="front"), "used twice"),
        (lambda c: c["probes"][rom(2)].update(offset=9), "offset"),
        (lambda c: c["wifi"].update(password="short"), "8 to 63"),
        (lambda c: c.update(token="ua_live_x"), "ds_live_"),
        (lambda c: c.update(local_id="a/b"), "local_id"),
        (lambda c: c.update(cadence=5), "cadence"),
        (lambda c: c["server"].update(https_url="http://x"), "https://"),
        (lambda c: c.pop("device_id"), "dev_"),
    ],
)
def test_a_bad_config_is_refused_before_anything_is_written(files, change, expect):
    cfg = good_config()
    change(cfg)
    files[0].write_text(json.dumps(cfg))
    with pytest.raises(flash.InstallError) as e:
        flash.flash(*files, port="/dev/null", run=lambda c: pytest.fail(f"ran {c}"))
    assert expect in str(e.value)


def test_ca_problems_are_named(tmp_path: Path):
    key, ca = make_ca()
    _, server = make_server_cert(key, ca, ["x"])
    assert "not a CA" in flash.ca_problems(server.public_bytes(serialization.Encoding.DER))[0]
    assert "DER" in flash.ca_problems(ca.public_bytes(serialization.Encoding.PEM))[0]
    _, old = make_ca(now=dt.datetime(2015, 1, 1, tzinfo=dt.UTC), days=30)
    assert "expired" in flash.ca_problems(old.public_bytes(serialization.Encoding.DER))[0]


def test_mpy_cross_finds_a_syntax_error(tmp_path: Path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f(:\n    pass\n")
    errors = flash.compile_check([FIRMWARE / "sense" / "fq.py", bad])
    assert len(errors) == 1 and "bad.py" in errors[0] and "line 1" in errors[0]
    assert flash.compile_check(flash.firmware_files()) == []


def test_flash_runs_mpremote_in_order_and_reports_the_self_test(files):
    ran: list[list[str]] = []

    def run(c: list[str]) -> subprocess.CompletedProcess[str]:
        ran.append(c)
        out = "probes on the bus: 2\nfirst reading accepted\nSELFTEST OK\n"
        return subprocess.CompletedProcess(c, 0, out if c[-1] == "import selftest" else "", "")

    said: list[str] = []
    assert flash.flash(*files, port="/dev/ttyUSB0", say=said.append, run=run) == 0
    assert all(Path(c[0]).name == "mpremote" and c[1:3] == ["connect", "/dev/ttyUSB0"] for c in ran)
    cps = [c[-1] for c in ran if c[3:5] == ["fs", "cp"]]
    assert ":/lib/umqtt/simple.py" in cps and cps[-1] == ":/ca.der"
    assert flash.is_rtc_cmd(ran[-2]) and ran[-1][-1] == "import selftest"
    assert any("SELFTEST OK" in s for s in said)

    def broken(c: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(c, 1, "", "could not enter raw repl")

    with pytest.raises(flash.InstallError) as e:
        flash.flash(*files, port="/dev/ttyUSB0", say=said.append, run=broken)
    assert "serial monitor" in str(e.value)


def test_the_node_clock_is_set_in_utc_whatever_the_pc_time_zone(files, monkeypatch):
    """An installer PC in UTC+2 (and one in UTC-5): the RTC gets UTC, not the PC's local
    time as `mpremote rtc --set` writes it (the self-test's reading was refused as "in
    the future" east of UTC)."""
    import ast
    import time

    ran: list[list[str]] = []

    def run(c: list[str]) -> subprocess.CompletedProcess[str]:
        ran.append(c)
        return subprocess.CompletedProcess(c, 0, "SELFTEST OK\n", "")

    for tz in ("Etc/GMT-2", "Etc/GMT+5"):  # POSIX signs: GMT-2 is UTC+2
        monkeypatch.setenv("TZ", tz)
        time.tzset()
        ran.clear()

        assert flash.flash(*files, port="/dev/ttyUSB0", say=lambda s: None, run=run) == 0
        sets = [c for c in ran if "RTC().datetime(" in c[-1] or c[3:5] == ["rtc", "--set"]]
        assert len(sets) == 1 and sets[0][3] == "exec", sets
        tup = ast.literal_eval(sets[0][-1].split("datetime(", 1)[1].rsplit(")", 1)[0])
        y, mo, d, wd, h, mi, s, _ = tup
        got = dt.datetime(y, mo, d, h, mi, s, tzinfo=dt.UTC)
        assert abs((got - dt.datetime.now(dt.UTC)).total_seconds()) < 30, (tz, tup)
        assert wd == got.weekday()
    monkeypatch.delenv("TZ")
    time.tzset()


@pytest.mark.db
async def test_self_test_on_a_simulated_node_gets_a_reading_accepted(fw_app, dsn, clock, tmp_path):
    world = await make_world(dsn, fw_app.cfg, ("fridge01",))
    r1, r2 = rom(21), rom(22)
    cfg = node_config(fw_app, world, "fridge01", {r1: "front", r2: "back"})
    n = SimNode(
        tmp_path / "n",
        cfg,
        fw_app.tls.ca_der(),
        {
            "epoch0": int(clock.now.timestamp()),
            "probes": [{"rom": r1, "temp": 4.5}, {"rom": r2, "fault": "absent"}],
        },
    )
    mp = micropython()
    assert mp is not None
    env = dict(os.environ, MICROPYPATH=f".frozen:{FIRMWARE}:{n.lib}", OPENSENSE_SIM=str(n.dir))
    import asyncio

    r = await asyncio.to_thread(
        subprocess.run,
        [str(mp), "-X", "heapsize=160k", str(FIRMWARE / "selftest.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    out = r.stdout + r.stderr
    assert "SELFTEST OK" in out, out
    assert "probes on the bus: 1" in out and "absent" in out and "4.5000 C" in out
    got = await rows(dsn, world)
    assert [(label, v) for label, _, v in got] == [("front", 4.5)]
    # a reading the server refuses (here: 6 hours in the future) fails the self-test
    n.set(epoch0=int(clock.now.timestamp()) + 6 * 3600)
    r = await asyncio.to_thread(
        subprocess.run,
        [str(mp), "-X", "heapsize=160k", str(FIRMWARE / "selftest.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    n.close()  # its directory lock and console log
    assert "SELFTEST FAILED: the server refused the reading" in r.stdout, r.stdout + r.stderr
    assert "future" in r.stdout


def test_self_test_gives_up_on_a_broker_that_never_answers(tmp_path: Path):
    """The broker's port accepts the connection and then says nothing (a firewall that
    blackholes, a hung broker). The self-test must fail within its socket timeouts and
    say so. It hung for good when it imported umqtt.simple before installing the
    firmware's socket shim (the bare socket has no timeout; issue 17 item 6)."""
    import socket

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)
    r1 = rom(23)
    cfg = {
        "wifi": {"ssid": "shop", "password": "password1"},
        "server": {"host": "localhost", "mqtt_port": silent.getsockname()[1]},
        "account": "acc_selftest",
        "device_id": "dev_selftest",
        "local_id": "fridge01",
        "token": "ds_live_selftest",
        "probes": {r1: {"label": "front"}},
        "io_timeout_s": 2,
        "wdt_s": 60,
    }
    ca = make_ca()[1].public_bytes(serialization.Encoding.DER)
    n = SimNode(tmp_path / "n", cfg, ca, {"probes": [{"rom": r1, "temp": 4.5}]})
    mp = micropython()
    assert mp is not None
    env = dict(os.environ, MICROPYPATH=f".frozen:{FIRMWARE}:{n.lib}", OPENSENSE_SIM=str(n.dir))
    try:
        r = subprocess.run(
            [str(mp), "-X", "heapsize=160k", str(FIRMWARE / "selftest.py")],
            env=env,
            capture_output=True,
            text=True,
            timeout=40,
        )
    except subprocess.TimeoutExpired as e:
        raise AssertionError("the self-test hung on a silent broker") from e
    finally:
        silent.close()
        n.close()
    assert "SELFTEST FAILED: could not reach the broker" in r.stdout, r.stdout + r.stderr


def test_mpremote_installs_the_plan_on_a_virtual_chip(files, tmp_path: Path):
    """The real mpremote, over a pty, into the MicroPython unix port whose root
    filesystem is littlefs on a flash image: every planned file lands at its path on
    the "chip", byte for byte. (The unix port has no RTC and no ESP32 board, so the
    clock step and the self-test are not run here; the self-test runs on a simulated
    node above.)"""
    import hashlib
    import shutil as sh
    import time

    if sh.which("socat") is None:
        pytest.skip("socat is not installed (apt-get install socat)")
    mp = micropython()
    assert mp is not None
    img, tty = tmp_path / "flash.img", tmp_path / "tty"
    env = dict(
        os.environ,
        PTYROOT_IMG=str(img),
        PTYROOT_FIRMWARE=str(FIRMWARE),
        MICROPYPATH=".frozen",
    )
    chip = subprocess.Popen(
        [
            "socat",
            f"PTY,link={tty},raw,echo=0",
            f"EXEC:{mp} -i {Path(__file__).parent / 'firmware' / 'ptyroot.py'},pty,raw,echo=0,stderr",
        ],
        env=env,
    )
    try:
        deadline = time.monotonic() + 10
        while not tty.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)

        def run(c: list[str]) -> subprocess.CompletedProcess[str]:
            if flash.is_rtc_cmd(c) or c[-1] == "import selftest":
                return subprocess.CompletedProcess(c, 0, "SELFTEST OK (not on this rig)\n", "")
            # `resume`: the unix port cannot soft-reset, an ESP32 would
            return subprocess.run(
                [*c[:3], "resume", *c[3:]], capture_output=True, text=True, timeout=60
            )

        said: list[str] = []
        assert flash.flash(*files, port=str(tty), say=said.append, run=run) == 0
    finally:
        chip.terminate()
        chip.wait(10)
    r = subprocess.run(
        [str(mp), str(Path(__file__).parent / "firmware" / "ptyls.py"), str(img), str(FIRMWARE)],
        capture_output=True,
        text=True,
        env=dict(os.environ, MICROPYPATH=".frozen"),
        timeout=60,
    )
    on_chip = dict(line.split() for line in r.stdout.splitlines())
    copies = flash.check(*files, say=lambda s: None)["copies"]
    assert len(on_chip) == len(copies), r.stdout + r.stderr
    for c in copies:
        assert on_chip[c.dest] == hashlib.sha256(c.src.read_bytes()).hexdigest(), c.dest
