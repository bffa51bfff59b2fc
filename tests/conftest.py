"""Fixtures by service: database (fixtures/database.py), clock, server app."""

pytest_plugins = [
    "tests.fixtures.clock",
    "tests.fixtures.database",
    "tests.fixtures.server",
    "tests.fixtures.processes",
    "tests.fixtures.mosquitto",
    "tests.fixtures.notify",
    "tests.fixtures.firmware",
]
