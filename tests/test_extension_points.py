"""Adding a rule kind or a notification path is one entry in its table (plus its
docs): a throwaway of each, put into the tables alone (monkeypatched), shows up in the
API's validation, the OpenAPI document, the docs check and the alarm flow. Real
PostgreSQL; the throwaway path's send records what it was given."""

from __future__ import annotations

from typing import Any

import pytest

from opensense.alarms import paths, rule_kinds
from opensense.alarms.paths import NotifyPath, Outcome
from opensense.api.keys import CONFIG, POOL
from opensense.app import create_app
from opensense.openapi import document
from opensense.status import probes
from opensense_contract import rules as contract

from .fixtures.server import make_world, test_config
from .test_alarms import evaluate, events, ingest, send
from .test_docs import undocumented_notification_paths, undocumented_rule_kinds

pytestmark = pytest.mark.db


def enums_with(doc: Any, member: str) -> list[list[Any]]:
    """Every enum in the document that lists `member`."""
    found: list[list[Any]] = []

    def walk(x: Any) -> None:
        if isinstance(x, dict):
            if isinstance(x.get("enum"), list) and member in x["enum"]:
                found.append(x["enum"])
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(doc)
    return found


@pytest.fixture
async def world_app(aiohttp_client, dsn, clock):
    cfg = test_config(clock, alarms_enabled=False)
    app = create_app(cfg, dsn)
    client = await aiohttp_client(app)
    world = await make_world(dsn, cfg, ("fridge01",))
    return client, world, app


@pytest.fixture
def hot_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    """`hot`: a reading above `limit`, declared in the contract and the behaviours only."""
    monkeypatch.setitem(
        contract.RULE_KINDS,
        "hot",
        contract.RuleKind(
            "hot", "value above limit", (contract.Param("limit", "the limit", required=True),)
        ),
    )

    def breach(_r: Any, params: Any, _st: Any, _ts: Any, value: float, _l: Any) -> bool:
        return value > float(params["limit"])

    monkeypatch.setitem(rule_kinds.BEHAVIOURS, "hot", rule_kinds.RuleBehaviour("hot", breach))


async def test_a_throwaway_rule_kind_shows_up_everywhere(world_app, clock, hot_kind):
    client, world, app = world_app
    cid = await ingest(client, world, clock, [2.0])
    # validation: the API takes the new kind, with its params checked as declared
    r = await client.post(
        f"/v1/channels/{cid}/rules", json={"kind": "hot", "params": {}}, headers=world.auth
    )
    assert r.status == 422 and "limit" in (await r.json())["error"]["message"]
    r = await client.post(
        f"/v1/channels/{cid}/rules",
        json={"kind": "hot", "params": {"limit": 3}, "grace_min": 0, "clear_min": 0},
        headers=world.auth,
    )
    assert r.status == 201, await r.text()
    # OpenAPI: every kind enum (the rule, the new-rule body) lists it
    kinds = enums_with(document(), "absence")
    assert kinds and all("hot" in e for e in kinds)
    # docs: the check flags the kind and its parameter as undocumented
    assert undocumented_rule_kinds() == ["hot", "hot.limit"]
    # the engine judges it by its behaviour: 4.0 is in range for the preset, hot here
    await ingest(client, world, clock, [4.0, 4.0])
    await evaluate(app)
    assert [e["kind"] for e in await events(client, world)] == ["hot"]


async def test_a_throwaway_notification_path_shows_up_everywhere(
    world_app, clock, monkeypatch: pytest.MonkeyPatch
):
    client, world, app = world_app
    sent: list[dict[str, Any]] = []

    async def send_pager(s: paths.Send) -> Outcome:
        sent.append({"address": s.address, "secret": s.secret, "kind": s.msg["kind"]})
        return Outcome("ok", 200)

    async def check(_cfg: Any, address: str) -> str | None:
        return None if address.startswith("pager:") else "address must be pager:<number>"

    monkeypatch.setitem(
        paths.PATHS,
        "pager",
        NotifyPath(
            "pager", "a pager", send_pager, people=True, secret=lambda: "pg_secret", check=check
        ),
    )
    # validation: the API adds it, with its own address check and secret
    r = await client.post(
        "/v1/targets", json={"path": "pager", "address": "nope"}, headers=world.auth
    )
    assert r.status == 400 and "pager:<number>" in (await r.json())["error"]["message"]
    r = await client.post(
        "/v1/targets", json={"path": "pager", "address": "pager:42"}, headers=world.auth
    )
    assert r.status == 201, await r.text()
    assert (await r.json())["secret"] == "pg_secret"
    r = await client.post(
        "/v1/targets", json={"path": "carrier-pigeon", "address": "x"}, headers=world.auth
    )
    assert "pager" in (await r.json())["error"]["message"]
    # OpenAPI: the target's path enum and the new-target body's enum list it
    doc = document()
    assert enums_with(doc, "telegram") and all("pager" in e for e in enums_with(doc, "telegram"))
    assert enums_with(doc, "webhook") and all("pager" in e for e in enums_with(doc, "webhook"))
    # docs: the check flags it as undocumented
    assert undocumented_notification_paths() == ["pager"]
    # dispatch: an alarm (the preset: above 5 °C for 15 min) goes out through its send
    await ingest(client, world, clock, [9.0] * 20)
    await evaluate(app)
    assert [e["kind"] for e in await events(client, world)] == ["range"]
    await send(app, client)
    assert sent == [{"address": "pager:42", "secret": "pg_secret", "kind": "alarm_opened"}]
    # the status page's probe counts its attempts
    async with app[POOL].connection() as conn:
        figures = await probes.dispatch(conn, app[CONFIG].clock())
    assert figures["pager"]["attempts_5m"] == 1
