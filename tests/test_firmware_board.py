"""The real firmware on the MicroPython unix port against a simulated board that
behaves as the ESP32 port does where the chip is unforgiving (docs/firmware.md,
issue 17): Wi-Fi that raises on a second connect(), a watchdog that resets whatever
raised, RTC memory that survives resets. No server: these are about the node staying
alive; tests/test_firmware_node.py has the server side."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from opensense.node.sim import SimNode, micropython, rom

from .fixtures.processes import free_port

pytestmark = pytest.mark.skipif(micropython() is None, reason="no micropython")


def config(**kw: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "wifi": {"ssid": "shop", "password": "password1"},
        "server": {"host": "localhost", "mqtt_port": free_port()},  # nobody listens
        "account": "acc_board",
        "device_id": "dev_board",
        "local_id": "fridge01",
        "token": "ds_live_board_test",
        "probes": {rom(1): {"label": "front"}},
        "cadence": 60,
        "io_timeout_s": 3,
        "wdt_s": 60,
    }
    cfg.update(kw)
    return cfg


@pytest.fixture
def node(tmp_path: Path) -> Any:
    made: list[SimNode] = []

    def make(cfg: dict[str, Any] | None = None, **ctl: Any) -> SimNode:
        base = {"speed": 60, "probes": [{"rom": rom(1), "temp": 4.0}]}
        base.update(ctl)
        n = SimNode(tmp_path / f"n{len(made)}", cfg or config(), b"", base)
        made.append(n)
        return n

    yield make
    for n in made:
        n.close()


def wait(pred: Callable[[], Any], within: float = 30, what: Callable[[], str] = str) -> Any:
    deadline = time.monotonic() + within
    while not (v := pred()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out: {what()}")
        time.sleep(0.1)
    return v


def ends(n: SimNode, text: str) -> list[str]:
    return [e for e in n.events() if e.endswith(text) or f" {text} " in e + " "]


def test_no_access_point_at_boot_never_connects_twice_and_joins_when_it_comes(node):
    """The access point is off at boot and a join takes 3 s: the node must not call
    connect() again while an attempt is under way (the ESP32 raises OSError('Wifi
    Internal Error'), micropython#17661, and the watchdog resets: five of those and
    the node sat in safe mode). It retries after the failure status, and joins once
    the access point is back."""
    n = node(wifi=False, wifi_connect_s=3)
    n.start()
    wait(lambda: len(ends(n, "wifi_connect")) >= 3, what=lambda: n.console()[-2000:])
    assert not ends(n, "wifi_internal_error"), n.console()[-2000:]
    assert n.restarts == 0, n.console()[-2000:]
    assert ends(n, "wifi failed 201")  # STAT_NO_AP_FOUND ends an attempt: then a retry
    n.set(wifi=True)
    wait(lambda: ends(n, "wifi up") and ends(n, "ntp"), what=lambda: "\n".join(n.events()[-20:]))
    # the access point goes away with the node joined, and comes back
    n.set(wifi=False)
    wait(lambda: ends(n, "wifi failed 200"), what=lambda: "\n".join(n.events()[-20:]))
    n.set(wifi=True)
    wait(lambda: len(ends(n, "wifi up")) >= 2, what=lambda: "\n".join(n.events()[-20:]))
    assert not ends(n, "wifi_internal_error")
    assert n.restarts == 0, n.console()[-2000:]


def test_a_crash_loop_parks_in_safe_mode_and_tries_again_after_the_timeout(node):
    """Every boot crashes (an exception in the loop): each ends in a reset, never at
    the REPL; after 5 crashes in a row the node parks in safe mode with the REPL free
    and the watchdog re-timed, and when that runs out it tries the app again. Once the
    fault is gone it runs and its crash count is cleared."""
    n = node(crash=True, speed=3600)  # safe mode's hour is one real second
    n.start()
    wait(lambda: n.parked >= 2, what=lambda: n.console()[-3000:])
    assert not n.stuck
    assert "safe mode: 5 crashes in a row" in n.console()
    # after the timeout one more try, one more crash, parked again: 5 + 1 + 1 boots
    assert n.restarts >= 7, n.console()[-3000:]
    assert "RuntimeError: simulated crash" in n.console()
    n.set(crash=False)
    wait(lambda: ends(n, "wifi_connect"), within=30, what=lambda: n.console()[-3000:])
    assert not n.stuck


def test_bad_json_config_never_leaves_the_node_at_the_repl_for_good(node, tmp_path):
    """A config that is not JSON (a torn copy): the node says so and gives the REPL to
    the installer, with the watchdog running, so it tries again later instead of
    sitting there until someone pulls the plug."""
    n = node(speed=3600)
    (n.dir / "config.json").write_text('{"wifi": {"ssid": "shop"')
    n.start()
    wait(lambda: n.parked >= 2 or n.stuck, what=lambda: n.console()[-3000:])
    assert not n.stuck, n.console()[-3000:]
    assert "config.json is not JSON" in n.console()
    (n.dir / "config.json").write_text(__import__("json").dumps(config()))
    wait(lambda: ends(n, "wifi_connect"), what=lambda: n.console()[-3000:])


def test_power_cuts_do_not_count_toward_safe_mode(node):
    """Six power cuts in a row during start-up (a fridge on a switched socket) are not
    crashes: the node must not end in safe mode."""
    n = node(wifi=False)
    n.start()
    for _ in range(6):
        wait(lambda: ends(n, "wifi_connect"), what=lambda: n.console()[-3000:])
        (n.dir / "events.log").unlink()
        n.power_cut()
    wait(lambda: ends(n, "wifi_connect"), what=lambda: n.console()[-3000:])
    assert not ends(n, "safe_mode"), n.console()[-3000:]


def test_an_rtc_in_local_time_is_not_trusted_before_ntp(node):
    """The installer's PC set the RTC to its local time, 2 h ahead of UTC (mpremote's
    `rtc --set`), and NTP does not answer yet: the node must date no reading by that
    clock (they carry uptime until NTP answers) and open no TLS connection."""
    n = node(rtc_offset=7200, ntp=False)
    n.start()
    wait(lambda: len(n.samples()) >= 3, what=lambda: n.console()[-2000:])
    dated = [s for s in n.samples() if s[1] > 0]
    assert not dated, dated[:3]  # by the installer's clock: 2 h in the future
    assert not ends(n, "connect failed"), "\n".join(n.events()[-20:])  # no TLS attempt
    n.set(ntp=True)
    wait(lambda: ends(n, "ntp") and ends(n, "connect failed"), what=lambda: n.console()[-2000:])
    for _, t, _, true in n.samples():  # every reading placed by NTP's time
        assert abs(t - true) <= 5, (t, true)


def test_the_bus_is_searched_at_boot_only_and_fake_devices_are_refused(node):
    """The 1-Wire data line is shorted: a bus search "finds" 255 all-zero devices. The
    node searches once at boot (not at every sample: seconds of bus time and the heap
    held by 255 ROMs each time), keeps none of them (ROM CRC and family code 0x28
    checked), and writes the configured resolution to its probes once they answer."""
    cfg = config(resolution=10)
    n = node(cfg, short=True)
    n.start()
    wait(lambda: ends(n, "scan 0 ok 255 rejected"), what=lambda: n.console()[-2000:])
    # five sampling ticks (cadence 60 s) on the shorted bus
    wait(lambda: int(n.events()[-1].split()[0]) >= 300, what=lambda: "\n".join(n.events()[-10:]))
    assert len(ends(n, "bus_search")) == 1, "\n".join(n.events()[-20:])
    assert not n.samples()  # a shorted line reads as zeros: never a temperature
    n.set(short=False)
    wait(lambda: len(n.samples()) >= 2, what=lambda: n.console()[-2000:])
    assert ends(n, f"resolution {rom(1)} 10"), "\n".join(n.events()[-20:])
    assert len(ends(n, "bus_search")) == 1
