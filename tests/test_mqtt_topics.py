"""The device ACL: pure rules, no broker."""

from __future__ import annotations

import pytest

from opensense_contract import topics

A, D = "acc_1", "fridge01"


@pytest.mark.parametrize(
    "name",
    ["opensense/acc_1/fridge01", "opensense/acc_1/fridge01/lwt", "opensense/acc_1/fridge01/info"],
)
def test_device_may_publish_its_own(name: str) -> None:
    assert topics.publish_refusal(A, D, name) is None


@pytest.mark.parametrize(
    "name",
    [
        "opensense/acc_1/fridge02",  # another device
        "opensense/acc_2/fridge01",  # another account
        "opensense/acc_1/fridge01/err",  # the server's topic
        "opensense/acc_1/fridge01/cmd/identify",
        "opensense/acc_1/fridge01/x/y",
        "other/acc_1/fridge01",
        "opensense/acc_1",
    ],
)
def test_device_may_not_publish_elsewhere(name: str) -> None:
    assert topics.publish_refusal(A, D, name)


@pytest.mark.parametrize(
    "f",
    [
        "opensense/acc_1/fridge01/cmd/#",
        "opensense/acc_1/fridge01/cmd/+",
        "opensense/acc_1/fridge01/cmd/identify",
        "opensense/acc_1/fridge01/err",
    ],
)
def test_device_may_subscribe_to_its_commands(f: str) -> None:
    assert topics.subscribe_refusal(A, D, f) is None


@pytest.mark.parametrize(
    "f",
    [
        "opensense/acc_1/+/cmd/#",
        "opensense/acc_1/#",
        "#",
        "opensense/#",
        "opensense/acc_1/fridge02/cmd/#",
        "opensense/acc_1/fridge01",
        "opensense/acc_1/fridge01/#",
        "opensense/acc_1/fridge01/cmd/other",
    ],
)
def test_device_may_not_subscribe_beyond(f: str) -> None:
    assert topics.subscribe_refusal(A, D, f)


def test_parse() -> None:
    assert topics.parse("opensense/acc_1/fridge01/cmd/identify") == topics.DeviceTopic(
        "acc_1", "fridge01", "cmd/identify"
    )
    assert topics.parse("opensense/acc_1/fridge01") == topics.DeviceTopic("acc_1", "fridge01", "")
    assert topics.parse("opensense//x") is None
