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
    # mutation runs take minutes: only when asked for by name (-m mutation)
    import pytest

    if "mutation" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="a mutation run: select it with -m mutation")
    for item in items:
        if item.get_closest_marker("mutation") is not None:
            item.add_marker(skip)
