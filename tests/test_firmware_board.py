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
