"""The node's flash queue on littlefs over a RAM flash chip, under the real micropython:
a power cut at every program/erase step of a write, an acknowledgement and a drop
leaves no torn record and loses nothing committed. The heap is the ESP32's 112 KiB
plus the 64 KiB the simulated flash chip itself takes."""

from __future__ import annotations

import pytest

from .firmware.runner import case_names, mp_cases

CASES = case_names("cases_queue")


@pytest.fixture(scope="module")
def results() -> dict[str, str]:
    return mp_cases("cases_queue", heap="176k")


@pytest.mark.parametrize("name", CASES)
def test_queue_under_micropython(name: str, results: dict[str, str]) -> None:
    assert "<runner>" not in results, results["<runner>"]
    assert results.get(name) == "ok", results.get(name, "not run")
