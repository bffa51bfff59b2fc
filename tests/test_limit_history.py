"""The limits in force over time, as the HACCP report and the channel page's chart
draw them (alarms/history.py): a channel's default rule holds from the channel's
beginning (its buffered history, sent after its first reading, was judged by it),
limits set through PATCH /v1/channels hold from then on (before stop 35 neither read
them: they showed as always in force), and a rule made through the API has no limits
before it was made."""

from __future__ import annotations

from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import psycopg
import pytest

from opensense.api.jsonutil import rfc3339
from opensense.reports import data as rd
from opensense.reports import load
from opensense.web import channel as chart

from .fixtures.server import World

pytestmark = pytest.mark.db


def reading(t: Any, v: float = 3.0) -> dict[str, Any]:
    return {"type": "temperature", "label": "air", "value": v, "ts": rfc3339(t)}


async def test_a_default_rules_limits_hold_from_the_start_and_a_channel_patch_from_then_on(
    client: Any, world: World, clock: Any, dsn: str
) -> None:
    auth = world.dev_auth("fridge01")
    t0 = clock.now
    # the channel comes with its first reading, and its site's default rule with it
    # (chilled storage: -2..5 °C; no audit row of its own)
    r = await client.post(
        "/v1/ingest", json={"device": "fridge01", "measurements": [reading(t0)]}, headers=auth
    )
    assert r.status == 200
    cid = (await r.json())["channels"][0]["channel_id"]
    # then five hours of readings it buffered (oldest first)
    history = [reading(t0 - timedelta(minutes=10 * i)) for i in range(30, 0, -1)]
    r = await client.post(
        "/v1/ingest", json={"device": "fridge01", "measurements": history}, headers=auth
    )
    assert r.status == 200
    clock.advance(minutes=30)
    changed = clock.now
    r = await client.patch(f"/v1/channels/{cid}", json={"ok_max": 4.0}, headers=world.auth)
    assert r.status == 200
    clock.advance(minutes=30)
    made = clock.now
    r = await client.post(
        f"/v1/channels/{cid}/rules",
        json={"kind": "range", "params": {"ok_min": 1.0, "ok_max": 6.0}, "grace_min": 5},
        headers=world.auth,
    )
    assert r.status == 201, await r.text()
    clock.advance(minutes=30)

    lo = t0 - timedelta(hours=12)
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute("SELECT num, name FROM channels WHERE id = %s", (cid,))
        num, name = await cur.fetchone()  # type: ignore[misc]
        user = SimpleNamespace(account_id=world.account)
        ch = SimpleNamespace(id=cid, num=num, name=name)
        lines = await chart.thresholds(conn, user, ch, lo)  # type: ignore[arg-type]
        report = await load._thresholds(
            conn, world.account, cid, lo.timestamp(), clock.now.timestamp()
        )
    at = chart.epoch
    by = {(x["rule"], x["label"]): x["steps"] for x in lines}
    default, other = sorted({x["rule"] for x in lines}, key=[x["rule"] for x in lines].index)
    # the chart: the default rule's limits from the range's start, the PATCH's from then
    assert by[(default, "lower limit")] == [[at(lo), -2.0]]
    assert by[(default, "upper limit")] == [[at(lo), 5.0], [at(changed), 4.0]]
    # the rule made through the API: none before it was made
    assert by[(other, "upper limit")] == [[at(lo), None], [at(made), 6.0]]
    # the report (its channel's first range rule, the default one): the same history,
    # and who changed it
    assert report[0] == rd.Threshold(None, -2.0, 5.0)
    assert [(x.since, x.ok_min, x.ok_max) for x in report[1:]] == [(changed.timestamp(), -2.0, 4.0)]
    assert report[1].who.startswith("tok_")
