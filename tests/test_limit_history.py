"""The limits in force over time, as the HACCP report and the channel page's chart
draw them (alarms/history.py): a channel's default rule holds from the channel's
beginning (its buffered history, sent after its first reading, was judged by it),
limits set through PATCH /v1/channels hold from then on (before stop 35 neither read
them: they showed as always in force), and a rule made through the API has no limits
before it was made."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import psycopg
import pytest

from opensense.alarms import history
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


def test_the_history_of_each_route_a_rule_is_made_and_changed_by() -> None:
    """alarms/history.py from audit rows alone: a PATCH /v1/channels that made the
    channel's range rule (no rule before: `from` null) starts it there; one that
    changed it steps it; rows that changed no limit are not steps; a rule without a
    row of its making starts at its `created_at` unless it is a channel's default."""
    t = [datetime(2026, 12, 1, h, tzinfo=UTC) for h in range(6)]
    made_by_patch = history._change(
        t[1], "tok_a", "channel.update",
        {"rule": {"id": "rul_x", "from": None, "to": {"params": {"ok_max": 5}, "grace_min": 15}}},
    )  # fmt: skip
    changed_by_patch = history._change(
        t[2], "tok_a", "channel.update",
        {"rule": {"id": "rul_x", "from": {"params": {"ok_max": 5}, "grace_min": 15},
                  "to": {"params": {"ok_max": 4}, "grace_min": 15}}},
    )  # fmt: skip
    changed_by_rule = history._change(
        t[3], "cli:chef", "rule.update", {"params": {"from": {"ok_max": 4}, "to": {"ok_max": 6}}}
    )
    assert (
        history._change(t[4], "tok_a", "channel.update", {"name": {"from": "a", "to": "b"}}) is None
    )
    assert (
        history._change(t[4], "tok_a", "rule.update", {"grace_min": {"from": 5, "to": 9}}) is None
    )
    changes = [c for c in (made_by_patch, changed_by_patch, changed_by_rule) if c is not None]
    assert len(changes) == 3
    assert history.steps(changes, {"ok_max": 6}) == [
        (None, None), (t[1], {"ok_max": 5}), (t[2], {"ok_max": 4}), (t[3], {"ok_max": 6})
    ]  # fmt: skip
    # a rule put in by hand (no row of its making): from its created_at; a default
    # rule (made with its channel): from the beginning
    updated = [c for c in (changed_by_rule,) if c is not None]
    assert history.steps(history.made(updated, False, t[0]), {"ok_max": 6}) == [
        (None, None), (t[0], {"ok_max": 4}), (t[3], {"ok_max": 6})
    ]  # fmt: skip
    assert history.steps(history.made(updated, True, t[0]), {"ok_max": 6}) == [
        (None, {"ok_max": 4}), (t[3], {"ok_max": 6})
    ]  # fmt: skip
