"""Fixtures by service: database (fixtures/database.py), clock, server app."""

pytest_plugins = [
    "tests.fixtures.clock",
    "tests.fixtures.database",
    "tests.fixtures.server",
    "tests.fixtures.processes",
    "tests.fixtures.mosquitto",
    "tests.fixtures.notify",
    "tests.fixtures.firmware",
    "tests.fixtures.browser",
]


def pytest_collection_modifyitems(config, items):  # type: ignore[no-untyped-def]
    # mutation runs take minutes, and the bench-rig scenarios run as a pass of their
    # own beside the main one (tools/test.sh): each only when asked for by name (-m)
    import pytest

    asked = config.getoption("markexpr") or ""
    for mark, why in (
        ("mutation", "a mutation run: select it with -m mutation"),
        ("hil", "a bench-rig scenario: tools/test.sh runs them with -m hil"),
    ):
        if mark in asked:
            continue
        skip = pytest.mark.skip(reason=why)
        for item in items:
            if item.get_closest_marker(mark) is not None:
                item.add_marker(skip)
