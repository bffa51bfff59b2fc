"""One pipeline for every door (issue 12): a reading from POST /v1/ingest, from MQTT
(the MqttIngest both brokers hand their publishes to) and from the site gateway's
batch door ends in the same function, `opensense.ingest.pipeline.reading_row`, where
it becomes a row of its channel (the calibration offset; each door checks the unit
with `check_unit` before). The test wraps that
one function, drives the three doors, sees each door's reading pass through it, and
reads what was stored."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from opensense.api.jsonutil import rfc3339
from opensense.gateway import store as gateways
from opensense.ingest import pipeline
from opensense.mqtt.ingest import MqttIngest
from opensense_contract import topics

from .fixtures.server import World

pytestmark = pytest.mark.db


async def test_http_mqtt_and_gateway_readings_end_in_the_same_pipeline_function(
    client: Any, world: World, dsn: str, clock: Any, monkeypatch: pytest.MonkeyPatch
):
    passed: list[tuple[str, float]] = []  # (channel id, value before the offset)
    real = pipeline.reading_row

    def spy(channel: pipeline.Channel, ts: Any, value: float) -> Any:
        passed.append((channel.id, value))
        return real(channel, ts, value)

    monkeypatch.setattr(pipeline, "reading_row", spy)
    now = clock().replace(microsecond=0)
    at = [now - timedelta(minutes=m) for m in (3, 2, 1)]

    # the HTTP door (it creates the channel; a calibration offset is then set on it)
    r = await client.post(
        "/v1/ingest",
        headers=world.dev_auth("fridge01"),
        json={
            "device": "fridge01",
            "measurements": [{"type": "temperature", "value": 4.0, "ts": rfc3339(at[0])}],
        },
    )
    assert r.status == 200, await r.text()
    (ch,) = (await r.json())["channels"]
    channel_id = ch["channel_id"]
    r = await client.patch(f"/v1/channels/{channel_id}", json={"offset": 0.5}, headers=world.auth)
    assert r.status == 200, await r.text()

    # the MQTT door, as the embedded broker and the external consumer call it
    mqtt = MqttIngest(client.app)
    dev = await mqtt.authenticate(world.device_ids["fridge01"], world.devices["fridge01"])
    body = {"measurements": [{"type": "temperature", "value": 5.0, "ts": rfc3339(at[1])}]}
    t = topics.parse(topics.topic(world.account, "fridge01"))
    assert t is not None
    assert await mqtt.handle(dev, t, json.dumps(body).encode(), qos=1) is None

    # the gateway's batch door
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        _, gw_token = await gateways.create_gateway(conn, world.account, world.site, "back room", 4)
    series = {"device": "fridge01", "type": "temperature", "ts": [at[2].timestamp()]}
    r = await client.post(
        "/v1/gateway/ingest",
        headers={"Authorization": f"Bearer {gw_token}"},
        json={"batch": "b1", "series": [series | {"values": [6.0]}]},
    )
    assert r.status == 200, await r.text()
    assert (await r.json())["accepted"] == 1

    assert passed == [(channel_id, 4.0), (channel_id, 5.0), (channel_id, 6.0)]
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT m.ts, m.value FROM measurements m JOIN channels c ON c.num = m.channel_num"
            " WHERE c.id = %s ORDER BY m.ts",
            (channel_id,),
        )
        stored = [(ts.astimezone(UTC), v) for ts, v in await cur.fetchall()]
    # the offset set after the first reading applies to the two later ones, whatever
    # their door
    assert stored == [(at[0], 4.0), (at[1], 5.5), (at[2], 6.5)]
    assert all(isinstance(ts, datetime) for ts, _ in stored)
