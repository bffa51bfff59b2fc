"""Firmware logic (DS18B20 decoding and faults, backoff, reboot ladder, boot loops,
payloads) under CPython and under the real micropython with an ESP32-sized heap."""

from __future__ import annotations

import sys

import pytest

from .firmware.runner import FIRMWARE, HERE, case_names, mp_cases

CASES = case_names("cases_logic")


@pytest.mark.parametrize("name", CASES)
def test_cpython(name: str) -> None:
    sys.path[:0] = [str(FIRMWARE), str(HERE)]
    try:
        mod = __import__("cases_logic")
        getattr(mod, name)()
    finally:
        del sys.path[:2]


@pytest.fixture(scope="module")
def mp_results() -> dict[str, str]:
    return mp_cases("cases_logic")


@pytest.mark.parametrize("name", CASES)
def test_micropython(name: str, mp_results: dict[str, str]) -> None:
    assert "<runner>" not in mp_results, mp_results["<runner>"]
    assert mp_results.get(name) == "ok", mp_results.get(name, "not run")
