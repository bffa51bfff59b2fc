"""Issue 11, the site gateway (items 12, 13, 14 and the gateway half of 19), each
performed through the real server (PostgreSQL) and, where the gateway takes part,
its real objects or process:

- 12: a gateway's local alert with a made-up `opened_at` (2099) must not silence the
  site's later alarms; local alerts expire without a clear; alerts of a rotated or
  deleted gateway stop counting;
- 13: every server-validated rule kind through the gateway's sync reaches its local
  engine with the right parameters (absence rules used to get 0 s);
- 14: the local HTTP door refuses bodies it cannot bound before reading them and
  asks for the token first;
- 19: a device token rotated on the server stops working at the site broker at
  once (pushed, not at the next periodic sync), and the node connected with it is
  dropped.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import psycopg
import pytest

from opensense.alarms import engine
from opensense.gateway import service as gateways
from opensense_gateway import rules as gw_rules
from opensense_gateway.config import Config as GwConfig
from opensense_gateway.main import Gateway
from opensense_gateway.uplink import Api

from .fixtures.server import World

pytestmark = pytest.mark.db


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def make_gateway(dsn: str, world: World) -> tuple[str, str]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        gw, token = await gateways.create_gateway(conn, world.account, world.site, "back room", 4)
    return gw["id"], token


async def channel_of(client: Any, world: World, local_id: str) -> str:
    r = await client.post(
        "/v1/ingest",
        headers=world.dev_auth(local_id),
        json={"device": local_id, "measurements": [{"type": "temperature", "value": 4}]},
    )
    assert r.status == 200, await r.text()
    return str((await r.json())["channels"][0]["channel_id"])


# --- 13: every rule kind through the gateway's sync ------------------------------------


async def test_every_rule_kind_reaches_the_gateway_engine_with_its_params(
    client, world: World, dsn, tmp_path: Path
):
    ch1 = await channel_of(client, world, "fridge01")
    ch2 = await channel_of(client, world, "fridge02")
    # one valid rule of every kind the server knows: a new kind fails here until the
    # gateway contract says whether (and how) a gateway runs it
    samples: dict[str, dict[str, Any]] = {
        "range": {"ok_min": -2, "ok_max": 5},
        "delta": {"max_delta": 3, "interval_s": 600},
        "derivative": {"min_rate": -2, "max_rate": 2},
        "absence": {"max_gap_s": 900},
        "comparison": {"other_channel_id": ch2, "op": "gt", "offset": 1},
    }
    assert set(samples) == set(engine.RULE_KINDS)
    made = {}
    for kind, params in samples.items():
        r = await client.post(
            f"/v1/channels/{ch1}/rules",
            headers=world.auth,
            json={"kind": kind, "params": params, "grace_min": 5},
        )
        assert r.status == 201, (kind, await r.text())  # the server validated it
        made[kind] = (await r.json())["id"]

    _, token = await make_gateway(dsn, world)
    cfg = GwConfig(
        state_dir=str(tmp_path / "gw"),
        server_url=str(client.make_url("")).rstrip("/"),
        server_token=token,
        mqtt_host="",
    )
    gw = Gateway(cfg)
    try:
        answer = await asyncio.to_thread(gw.sync, Api(cfg))
        assert answer.status == 200, answer.body
        local = {r.id: r for r in gw.rules if r.device is not None}
        runs = set(answer.body["rule_kinds"])
        assert runs == set(gateways.GATEWAY_RULE_KINDS) <= set(engine.RULE_KINDS)
        for kind, rid in made.items():
            if kind not in runs:
                # the server does not send what the gateway does not run
                assert rid not in local and all(r["kind"] in runs for r in answer.body["rules"])
                continue
            rule = local[rid]
            assert (rule.kind, rule.device, rule.type, rule.grace_min) == (
                kind,
                "fridge01",
                "temperature",
                5,
            )
            assert rule.params == {k: float(v) for k, v in samples[kind].items()}
        # and the local engine acts on them: absence after max_gap_s + grace, not 0 s
        absence = local[made["absence"]]
        assert gw_rules.absence_seconds(absence) == 900
        st, ev = gw_rules.check_absence(absence, gw_rules.State(), 1000.0, 1000.0 + 900 + 300)
        assert ev is None
        st, ev = gw_rules.check_absence(absence, st, 1000.0, 1000.0 + 900 + 301)
        assert ev is not None and ev.what == "open"
        rng = local[made["range"]]
        assert gw_rules.in_range(rng, 5.0) and not gw_rules.in_range(rng, 5.01)
        assert gw_rules.in_range(rng, -2.0) and not gw_rules.in_range(rng, -2.01)
    finally:
        gw.store.close()
