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
    assert "/lib/umqtt/simple.mpy" in dests and "/lib/urequests.mpy" in dests
    assert "/sense/fq.mpy" in dests and "/hw/esp32.mpy" in dests and "/main.py" in dests
    assert "/hw/sim.mpy" not in dests  # the simulated board stays on the computer
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
        (lambda c: c.update(cadance=120), "cadance: not a config key"),
        (lambda c: c["server"].update(port=8883), "server.port: not a config key"),
    ],
)
def test_a_bad_config_is_refused_before_anything_is_written(files, change, expect):
    cfg = good_config()
    change(cfg)
    files[0].write_text(json.dumps(cfg))
    with pytest.raises(flash.InstallError) as e:
        flash.flash(*files, port="/dev/null", run=lambda c: pytest.fail(f"ran {c}"))
    assert expect in str(e.value)


def test_a_queue_the_flash_cannot_hold_is_refused_at_check(files, tmp_path: Path):
    # issue 17 item 5: 16 MB were accepted and the node ran out of flash at ~1.7 MB
    from opensense.node.deps import ensure

    copies, errors = flash.compile_mpy(flash.plan(*files, ensure()), tmp_path / "build")
    room = flash.queue_room(copies)
    assert not errors and 1_500_000 <= room < 2 * 1024 * 1024  # the default fits
    for too_much in (16_000_000, room + 1):
        problem = flash.queue_problem(good_config() | {"queue_bytes": too_much}, copies)
        assert problem and "queue_bytes" in problem and str(room) in problem
    assert flash.queue_problem(good_config() | {"queue_bytes": room}, copies) is None
    assert flash.queue_problem(good_config(), copies) is None
    files[0].write_text(json.dumps(good_config() | {"queue_bytes": 16_000_000}))
    with pytest.raises(flash.InstallError) as e:
        flash.check(*files, say=lambda s: None)
    assert "queue_bytes" in str(e.value) and str(room) in str(e.value)


def test_modules_go_to_the_chip_as_mpy_and_stale_sources_are_removed(files):
    # issue 17 item 4: source imports cost the heap the IDF needs for TLS
    ran: list[list[str]] = []

    def run(c: list[str]) -> subprocess.CompletedProcess[str]:
        ran.extend(flash.segments(c))
        return subprocess.CompletedProcess(c, 0, "SELFTEST OK\n", "")

    st = flash.check(*files, say=lambda s: None)
    dests = {c.dest: c.src for c in st["copies"]}
    assert "/sense/node.mpy" in dests and "/lib/umqtt/simple.mpy" in dests
    assert "/main.py" in dests and not [d for d in dests if d.endswith(".py") and d != "/main.py"]
    head = dests["/sense/node.mpy"].read_bytes()[:4]
    assert head[:2] == b"M\x06", head  # .mpy version 6: MicroPython 1.20 and later
    flash.flash(*files, port="/dev/ttyUSB0", say=lambda s: None, run=run)
    rm = [c for c in ran if c[3] == "exec" and "os.remove" in c[-1]]
    cps = [i for i, c in enumerate(ran) if c[3:5] == ["fs", "cp"]]
    assert len(rm) == 1 and ran.index(rm[0]) < cps[0]
    assert "'/sense/node.py'" in rm[0][-1] and "'/main.py'" not in rm[0][-1]


class TlsListener:
    """A TLS listener on 127.0.0.1 with a certificate for `hosts` signed by `ca`,
    completing handshakes until closed (the broker as the installer meets it)."""

    def __init__(self, tmp: Path, ca: Any, hosts: list[str], tls13_only: bool = False) -> None:
        import socket
        import ssl
        import threading

        from opensense.mqtt.ca import write_pair

        key, cert = make_server_cert(ca[0], ca[1], hosts)
        kp, cp = write_pair(tmp, "srv-" + "-".join(hosts), key, cert)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cp, kp)
        if tls13_only:
            ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]

        def serve() -> None:
            while True:
                try:
                    c, _ = self.sock.accept()
                except OSError:
                    return
                try:
                    with ctx.wrap_socket(c, server_side=True) as t:
                        t.recv(1)
                except (OSError, ssl.SSLError):
                    pass

        threading.Thread(target=serve, daemon=True).start()

    def close(self) -> None:
        import socket

        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept(): a bare close does not
        except OSError:
            pass
        self.sock.close()


def test_the_tls_handshake_to_the_broker_is_checked_before_flashing(files, tmp_path: Path):
    # issue 17 item 10: a broker certificate without the address nodes use failed only
    # on the node, after the install
    ca = make_ca()
    der = ca[1].public_bytes(serialization.Encoding.DER)
    good = TlsListener(tmp_path, ca, ["localhost"])
    other_ca = TlsListener(tmp_path, make_ca(), ["localhost"])
    only13 = TlsListener(tmp_path, ca, ["localhost"], tls13_only=True)
    try:
        assert flash.tls_problem("localhost", good.port, der) == ("", "")
        problem, _ = flash.tls_problem("127.0.0.1", good.port, der)  # not on the certificate
        assert "OPENSENSE_MQTT_HOSTNAMES" in problem and "'127.0.0.1'" in problem
        problem, _ = flash.tls_problem("localhost", other_ca.port, der)
        assert "signed by the CA" in problem
        problem, _ = flash.tls_problem("localhost", only13.port, der)
        assert "TLS 1.2" in problem
        from .fixtures.processes import free_port

        problem, warning = flash.tls_problem("localhost", free_port(), der)  # nobody there
        assert not problem and "could not reach" in warning
        # node check refuses before anything is compiled or written
        files[1].write_bytes(der)
        cfg = good_config()
        cfg["server"] = {"host": "127.0.0.1", "mqtt_port": good.port}
        files[0].write_text(json.dumps(cfg))
        with pytest.raises(flash.InstallError) as e:
            flash.flash(*files, port="/dev/null", run=lambda c: pytest.fail(f"ran {c}"))
        assert "server.host" in str(e.value) and "OPENSENSE_MQTT_HOSTNAMES" in str(e.value)
    finally:
        for s in (good, other_ca, only13):
            s.close()


def test_changed_mqtt_hostnames_issue_the_server_certificate_again(tmp_path: Path):
    # issue 17 item 10: a name added to OPENSENSE_MQTT_HOSTNAMES was ignored after the
    # first start, so nodes using it refused the broker
    from cryptography import x509

    from opensense.mqtt.ca import cert_hosts, ensure_tls, write_pair

    def server(files: Any) -> x509.Certificate:
        return x509.load_pem_x509_certificate(files.server_cert.read_bytes())

    first = ensure_tls(tmp_path, ["localhost"])
    ca = first.ca_cert.read_bytes()
    assert cert_hosts(server(first)) == {"localhost"}
    again = ensure_tls(tmp_path, ["localhost", "192.168.1.20"])
    assert cert_hosts(server(again)) == {"localhost", "192.168.1.20"}
    assert again.ca_cert.read_bytes() == ca  # the same CA: installed nodes keep working
    kept = server(again)
    assert server(ensure_tls(tmp_path, ["localhost", "192.168.1.20"])) == kept  # no churn
    # a certificate from elsewhere (e.g. Let's Encrypt) is used as it is
    other_key, other_ca = make_ca()
    key, cert = make_server_cert(other_key, other_ca, ["mqtt.example.com"])
    write_pair(tmp_path / "mqtt-tls", "server", key, cert)
    assert server(ensure_tls(tmp_path, ["localhost"])) == cert


def test_ca_der_from_another_folder_makes_no_new_ca(tmp_path: Path, monkeypatch, capsys):
    # issue 17 item 11: the default state directory is relative; `opensense ca --der`
    # run elsewhere silently made a new CA that no broker used
    from opensense.cli import main

    monkeypatch.delenv("OPENSENSE_STATE_DIR", raising=False)
    monkeypatch.delenv("OPENSENSE_ENV_FILE", raising=False)
    server_dir, elsewhere = tmp_path / "srv", tmp_path / "elsewhere"
    server_dir.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(server_dir)
    assert main(["ca", "--new", "--der", str(tmp_path / "first.der")]) == 0  # the first, said
    err = capsys.readouterr().err
    state = (server_dir / ".opensense").resolve()
    assert f"state directory {state}" in err and "made a new CA" in err  # said, absolutely
    monkeypatch.chdir(elsewhere)
    assert main(["ca", "--der", str(tmp_path / "second.der")]) == 2
    err = capsys.readouterr().err
    assert f"no state directory at {(elsewhere / '.opensense').resolve()}" in err
    assert not (elsewhere / ".opensense").exists() and not (tmp_path / "second.der").exists()
    monkeypatch.setenv("OPENSENSE_STATE_DIR", str(state))
    assert main(["ca", "--der", str(tmp_path / "second.der")]) == 0
    assert "made a new CA" not in capsys.readouterr().err
    assert (tmp_path / "second.der").read_bytes() == (tmp_path / "first.der").read_bytes()


def test_no_message_names_a_command_that_does_not_exist():
    # issue 17 item 12: a bad ROM id said "copy it from `opensense node scan`"
    import argparse
    import re

    from opensense.cli import build_parser

    subs = next(
        a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)
    ).choices
    texts = [*FIRMWARE.rglob("*.py"), FIRMWARE / "deps.lock", FIRMWARE / "README.md"]
    texts += [*Path(flash.__file__).parent.glob("*.py"), FIRMWARE.parent / "docs" / "firmware.md"]
    named = 0
    for f in texts:
        for m in re.finditer(r"`opensense ([a-z]+)(?: ([a-z][a-z-]*))?", f.read_text()):
            named += 1
            cmd, word = m.groups()
            assert cmd in subs, (f.name, m.group(0))
            pos = [a for a in subs[cmd]._actions if not a.option_strings and a.choices]
            if word and pos:
                assert word in pos[0].choices, (f.name, m.group(0))
    assert named >= 5


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
    sessions: list[list[str]] = []

    def run(c: list[str]) -> subprocess.CompletedProcess[str]:
        sessions.append(c)
        out = "probes on the bus: 2\nfirst reading accepted\nSELFTEST OK\n"
        return subprocess.CompletedProcess(c, 0, out if "import selftest" in c else "", "")

    said: list[str] = []
    assert flash.flash(*files, port="/dev/ttyUSB0", say=said.append, run=run) == 0
    # issue 17 item 12: one mpremote session (one connection), not one per file
    assert len(sessions) == 1 and Path(sessions[0][0]).name == "mpremote"
    ran = flash.segments(sessions[0])
    assert all(c[1:3] == ["connect", "/dev/ttyUSB0"] for c in ran)
    cps = [c[-1] for c in ran if c[3:5] == ["fs", "cp"]]
    assert ":/lib/umqtt/simple.mpy" in cps and cps[-1] == ":/ca.der"
    # the watchdog (it survives mpremote's soft reset) is re-timed before any copy, the
    # clock set, and the session ends with the self-test and a hard reset
    first_cp = next(i for i, c in enumerate(ran) if c[3:5] == ["fs", "cp"])
    assert flash.is_wdt_cmd(ran[0]) and flash.is_rtc_cmd(ran[1]) and first_cp > 1
    assert f"timeout={flash.WDT_INSTALL_S * 1000}" in ran[0][-1]
    assert ran[-2][-1] == "import selftest" and flash.is_reset_cmd(ran[-1])
    assert any("SELFTEST OK" in s for s in said)

    def broken(c: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(c, 1, "", "could not enter raw repl")

    with pytest.raises(flash.InstallError) as e:
        flash.flash(*files, port="/dev/ttyUSB0", say=said.append, run=broken)
    assert "serial monitor" in str(e.value)

    def failing_self_test(c: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(c, 1, "SELFTEST FAILED: no probe\n", "")

    with pytest.raises(flash.InstallError) as e:
        flash.flash(*files, port="/dev/ttyUSB0", say=said.append, run=failing_self_test)
    assert "the self-test failed" in str(e.value)


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
        steps = [c for session in ran for c in flash.segments(session)]
        sets = [c for c in steps if "RTC().datetime(" in c[-1] or c[3:5] == ["rtc", "--set"]]
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
            # the one session, less the steps the unix port has no hardware for
            # (watchdog, RTC, reset; the self-test runs on a simulated node above)
            steps = [
                s
                for s in flash.segments(c)
                if not (flash.is_wdt_cmd(s) or flash.is_rtc_cmd(s) or flash.is_reset_cmd(s))
                and s[-1] != "import selftest"
            ]
            # `resume`: the unix port cannot soft-reset, an ESP32 would
            one = flash.session(steps)
            r = subprocess.run(
                [*one[:3], "resume", *one[3:]], capture_output=True, text=True, timeout=120
            )
            return subprocess.CompletedProcess(
                c, r.returncode, r.stdout + "SELFTEST OK\n", r.stderr
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
