"""The OpenAPI document against the running server: the router and the document name
the same operations, and schemathesis finds no answer the document does not allow."""

from __future__ import annotations

import asyncio
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
import schemathesis
from aiohttp import web
from schemathesis.engine import events, from_schema

from opensense.app import create_app
from opensense.devices import store
from opensense.openapi import TTN_EXAMPLE, document

from .fixtures.server import World, make_world, test_config

pytestmark = pytest.mark.db


def _real_clock() -> datetime:
    return datetime.now(UTC)


MAX_EXAMPLES = 10
# cases the run sends at least: well below what it sends today (printed in the summary),
# far above what a run that quietly skipped phases or operations would
MIN_CASES = 1000
OPERATOR_TOKEN = "operator-test-token"
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
)
METHODS = {"get", "post", "put", "patch", "delete"}


def _router_operations(app: web.Application) -> set[tuple[str, str]]:
    out = set()
    for route in app.router.routes():
        if route.method == "HEAD":
            continue
        info = route.resource.get_info() if route.resource else {}
        path = info.get("path") or info.get("formatter")
        assert path, route
        out.add((route.method.lower(), path))
    return out


def _documented_operations(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {(m, p) for p, item in doc["paths"].items() for m in item if m in METHODS}


async def test_every_route_is_documented_and_every_operation_served(client):
    served = _router_operations(client.app)
    r = await client.get("/v1/openapi.json")
    assert r.status == 200
    served_doc = await r.json()
    assert served_doc == json.loads(json.dumps(document()))
    assert served_doc["openapi"].startswith("3.1")
    documented = _documented_operations(served_doc)
    assert len(documented) >= 25
    assert served - documented == set(), "served but not in /v1/openapi.json"
    assert documented - served == set(), "documented but not served"
    # path parameters use aiohttp's {name} placeholders on both sides
    for _, path in documented:
        assert not re.search(r"[:<>]", path), path


# --- schemathesis against the live app -------------------------------------------------


def test_every_check_named_is_one_schemathesis_has():
    # schemathesis' config takes any name under "checks" and never runs an unknown one;
    # the live run below also asserts each of these ran by name
    import schemathesis.specs.openapi.checks  # noqa: F401 - registers the OpenAPI checks
    from schemathesis.checks import CHECKS as REGISTRY

    known = set(REGISTRY.get_all_names())
    assert set(CHECKS) <= known, sorted(set(CHECKS) - known)
    assert len(CHECKS) == len(set(CHECKS)) >= 4


async def _lorawan_setup(dsn: str, world: World) -> str:
    """A whk_ token, and fridge02 answering to the dev_eui of the document's TTN example."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        _, tok = await store.create_token(conn, world.account, "whk", 4, "ttn")
        await conn.execute(
            "UPDATE devices SET dev_eui = %s WHERE id = %s",
            (TTN_EXAMPLE["end_device_ids"]["dev_eui"], world.device_ids["fridge02"]),
        )
    return tok


@dataclass
class Outcome:
    failures: list[str] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)  # "<operation> <status>"
    checks: Counter[str] = field(default_factory=Counter)  # "<check> <status>"
    cases: int = 0  # test cases run (requests sent and checked)

    def summary(self) -> str:
        lines = [f"{k}: {v}" for k, v in sorted(self.statuses.items())]
        lines += [f"check {k}: {v}" for k, v in sorted(self.checks.items())]
        return "\n".join(lines)


def _config(world: World, whk: str) -> schemathesis.Config:
    return schemathesis.Config.from_dict(
        {
            "seed": 20261124,
            "generation": {
                "max-examples": MAX_EXAMPLES,
                "deterministic": True,
                "database": "none",
                "mode": "all",
            },
            "phases": {
                "examples": {"enabled": True},
                "coverage": {"enabled": True},
                "fuzzing": {"enabled": True},
                "stateful": {"enabled": False},
            },
            "checks": {"enabled": False, **{name: {"enabled": True} for name in CHECKS}},
            "auth": {
                "openapi": {
                    "userToken": {"bearer": world.api_token},
                    "deviceToken": {"bearer": world.devices["fridge01"]},
                    "shellyToken": {"api_key": world.devices["fridge01"]},
                    "webhookToken": {"api_key": whk},
                    "operatorToken": {"bearer": OPERATOR_TOKEN},
                }
            },
            "request-timeout": 10,
        }
    )


def _run(schema: Any, out: Outcome) -> None:
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            label = event.recorder.label
            for checks in event.recorder.checks.values():
                for check in checks:
                    out.checks[f"{check.name} {check.status.value}"] += 1
                    if check.failure_info is not None:
                        f = check.failure_info
                        out.failures.append(
                            f"{label} [{check.name}] {f.failure.title}\n"
                            f"{f.failure.message}\n{f.code_sample}"
                        )
            for inter in event.recorder.interactions.values():
                if inter.response is not None:
                    out.statuses[f"{label} {inter.response.status_code}"] += 1
                    out.cases += 1
        elif isinstance(event, events.NonFatalError):
            out.failures.append(f"{event.label}: {event.info.title}\n{event.info.message}")
        elif isinstance(event, events.FatalError):
            out.failures.append(f"fatal: {event.exception!r}")


def _run_schemathesis(base_url: str, world: World, whk: str) -> Outcome:
    schema = schemathesis.openapi.from_url(
        f"{base_url}/v1/openapi.json", config=_config(world, whk)
    )
    schema.config.update(base_url=base_url)
    out = Outcome()
    # Ingest first: the management pass may rotate or delete the ingest device (it
    # reuses ids it has seen in answers), after which ingest could only answer 401.
    _run(schema.include(path_regex="^/v1/ingest"), out)
    _run(schema.exclude(path_regex="^/v1/ingest"), out)
    return out


@pytest.mark.e2e
async def test_schemathesis_finds_no_failure(aiohttp_server, new_database):
    # a database of its own: the run creates what it likes, and the example's dev_eui
    # (unique across accounts) is free
    dsn = new_database()
    cfg = test_config(
        _real_clock,  # type: ignore[arg-type]
        ingest_rate_per_min=100_000,
        read_rate_per_min=100_000,
        export_interval_s=0,
        operator_token=OPERATOR_TOKEN,
    )
    world = await make_world(dsn, cfg, ("fridge01", "fridge02"))
    whk = await _lorawan_setup(dsn, world)
    server = await aiohttp_server(create_app(cfg, dsn))
    base_url = str(server.make_url("")).rstrip("/")
    out = await asyncio.to_thread(_run_schemathesis, base_url, world, whk)
    print(out.summary())
    print("cases:", out.cases)
    assert not out.failures, f"{len(out.failures)} schemathesis failures:\n\n" + "\n\n".join(
        out.failures
    )
    # every check named in CHECKS ran, by that name, and passed on many answers (a
    # misspelled name is accepted by schemathesis' config and would simply never run)
    ran = {k.rsplit(" ", 1)[0] for k in out.checks}
    assert ran == set(CHECKS), (sorted(ran), CHECKS)
    documented = _documented_operations(document())
    for name in CHECKS:
        assert out.checks[f"{name} success"] >= len(documented), (name, out.summary())
    assert out.cases >= MIN_CASES, (out.cases, MIN_CASES)
    # the run reached every operation, and the happy paths too
    reached = {tuple(k.rsplit(" ", 1)[0].split(" ", 1)) for k in out.statuses}
    documented.discard(("get", "/v1/openapi.json"))  # schemathesis skips the schema itself
    assert {(m.upper(), p) for m, p in documented} <= reached
    for op in ("POST /v1/ingest 200", "GET /v1/ingest/shelly 200", "POST /v1/ingest/lorawan 200"):
        assert out.statuses[op] > 0, op
