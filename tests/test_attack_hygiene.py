"""Issue 11, items 18, 20, 21, 23: attacks and faults against the real server.

- 18: a LoRaWAN DevEUI is unique per account (no oracle, no squatting).
- 20: every file holding a secret is created 0600 in a 0700 state directory.
- 21: process hygiene: SIGKILL/SIGHUP leave no orphaned PostgreSQL; one runner per
  simulated node directory.
- 23: the status page does not claim what is not built, and a fresh demo is not
  degraded for a backup key it was never given.
"""

from __future__ import annotations

from typing import Any

import psycopg
from aiohttp.test_utils import TestClient

from .fixtures.server import World, make_world

# --- 18: DevEUI unique per account -------------------------------------------------

EUI = "70B3D57ED00000A1"
ONLY_B = "70B3D57ED00000B2"


def _uplink(eui: str, value: float) -> dict[str, Any]:
    return {
        "end_device_ids": {"dev_eui": eui},
        "uplink_message": {
            "decoded_payload": {"measurements": [{"type": "temperature", "value": value}]}
        },
    }


async def _webhook_token(client: TestClient, w: World) -> str:  # type: ignore[type-arg]
    r = await client.post("/v1/tokens", json={"kind": "whk", "name": "ttn"}, headers=w.auth)
    assert r.status == 201, await r.text()
    return str((await r.json())["token"])


async def _lora_device(client: TestClient, w: World, local_id: str, eui: str) -> Any:  # type: ignore[type-arg]
    body = {"site_id": w.site, "local_id": local_id, "dev_eui": eui.lower()}
    return await client.post("/v1/devices", json=body, headers=w.auth)


async def _values(dsn: str, device_id: str) -> list[float]:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT m.value FROM measurements m JOIN channels c ON c.num = m.channel_num"
            " WHERE c.device_id = %s AND c.kind = 'temperature' ORDER BY m.value",
            (device_id,),
        )
        return [float(r[0]) for r in await cur.fetchall()]


async def test_dev_eui_is_unique_per_account_not_across_accounts(
    client: TestClient,  # type: ignore[type-arg]
    dsn: str,
    config: Any,
) -> None:
    a = await make_world(dsn, config, ())
    b = await make_world(dsn, config, ())
    r = await _lora_device(client, a, "lora-a", EUI)
    assert r.status == 201, await r.text()
    dev_a = (await r.json())["id"]

    # B registers A's DevEUI: no 409 (that was an oracle telling B that A owns it),
    # and B's device is B's own
    r = await _lora_device(client, b, "lora-b", EUI)
    assert r.status == 201, await r.text()
    dev_b = (await r.json())["id"]
    assert dev_b != dev_a

    # a duplicate within one account stays a clear conflict
    r = await _lora_device(client, b, "lora-b2", EUI)
    assert r.status == 409, await r.text()
    err = (await r.json())["error"]
    assert err["code"] == "conflict" and EUI in err["message"] and "this account" in err["message"]

    whk_a, whk_b = await _webhook_token(client, a), await _webhook_token(client, b)
    r = await client.post(f"/v1/ingest/lorawan?token={whk_a}", json=_uplink(EUI, 3.5))
    assert r.status == 200, await r.text()
    r = await client.post(f"/v1/ingest/lorawan?token={whk_b}", json=_uplink(EUI, -19.0))
    assert r.status == 200, await r.text()
    # each account's uplink landed on its own device: B's squat did not take A's
    assert await _values(dsn, dev_a) == [3.5]
    assert await _values(dsn, dev_b) == [-19.0]

    # a DevEUI only B has, sent through A's webhook: A's unassigned tray, never B
    r = await _lora_device(client, b, "lora-b3", ONLY_B)
    assert r.status == 201, await r.text()
    dev_b3 = (await r.json())["id"]
    r = await client.post(f"/v1/ingest/lorawan?token={whk_a}", json=_uplink(ONLY_B, 7.0))
    assert r.status == 202 and (await r.json())["unassigned"] is True
    assert await _values(dsn, dev_b3) == []
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT account_id FROM unassigned_uplinks WHERE dev_eui = %s", (ONLY_B,)
        )
        assert [r[0] for r in await cur.fetchall()] == [a.account]
