"""The background evaluator keeps each channel's rules between passes (issue 14,
"ingest cost"; migration 0028, `evaluator.MetaCache`), and a change is judged by the
very next pass:

- a pass over channels whose rules did not change reads none of them;
- a rule edited, added, disabled or deleted through the API, a site's time zone, a
  device moved to another site: the next pass reads that channel's rules again and
  judges by the new ones (an edit that the cache missed would judge by the old);
- every change to what the rules' statement reads moves the channel's `meta_rev`,
  also when made by hand in SQL, and leaves the other channels' alone.
- a channel's state row comes with the channel (its first reading), so a rule edit
  from then on moves its `meta_rev`; a pass that makes a missing row itself keeps
  nothing of it: an edit committed while that pass runs moves no `meta_rev` (the row
  is not visible to its trigger).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import psycopg
import pytest

from opensense.alarms import evaluator
from opensense.api.keys import POOL
from opensense.settings import Config
from opensense.web import board

from .fixtures.clock import FakeClock
from .fixtures.server import World, post_temperature, test_config


@pytest.fixture
def config(clock: FakeClock) -> Config:
    return test_config(clock, alarms_enabled=False, ingest_rate_per_min=10_000)


_send = post_temperature


async def _pass(client: Any, clock: FakeClock, metas: evaluator.MetaCache) -> None:
    while (await evaluator.evaluate_dirty(client.app[POOL], clock(), metas=metas)).channels:
        pass


async def _one(dsn: str, sql: str, *args: Any) -> Any:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        row = await (await conn.execute(sql, args)).fetchone()
    assert row is not None
    return row[0]


async def _status(dsn: str, cid: str) -> str:
    return str(await _one(dsn, "SELECT status FROM alarm_state WHERE channel_id = %s", cid))


async def _num(dsn: str, cid: str) -> int:
    return int(await _one(dsn, "SELECT num FROM channels WHERE id = %s", cid))


@pytest.mark.db
async def test_the_next_pass_judges_by_a_rule_edited_since_the_last(
    client: Any, world: World, clock: FakeClock, dsn: str
) -> None:
    """What the cache holds for the channel: the same object while nothing changed (a
    pass that read the rules again would have put a new one), another after each
    change, and the alarms follow the new rules. (Other tests' channels may be
    judged by the same passes: only this channel's entry is looked at.)"""
    metas = evaluator.MetaCache()
    t = clock() - timedelta(minutes=30)
    cid = await _send(client, world, "fridge01", 4.0, t)  # default rule: -2..5 °C
    num = await _num(dsn, cid)
    await _pass(client, clock, metas)
    first = metas.held([num])[num]  # (its state row came with the channel: kept at once)

    await _send(client, world, "fridge01", 4.5, t + timedelta(minutes=1))
    await _pass(client, clock, metas)
    assert metas.held([num])[num] == first and metas.held([num])[num][1] is first[1]
    assert await _status(dsn, cid) == "ok"

    rule = await _one(dsn, "SELECT id FROM rules WHERE channel_id = %s", cid)
    r = await client.patch(
        f"/v1/rules/{rule}",
        json={"params": {"ok_min": -2.0, "ok_max": 4.0}, "grace_min": 0},
        headers=world.auth,
    )
    assert r.status == 200, await r.text()
    await _send(client, world, "fridge01", 4.5, t + timedelta(minutes=2))
    await _pass(client, clock, metas)
    second = metas.held([num])[num]
    assert second[0] != first[0]  # read again, and judged by the new limit
    assert second[1].rules[0].params["ok_max"] == 4.0
    assert await _status(dsn, cid) == "alarm"

    r = await client.patch(f"/v1/rules/{rule}", json={"enabled": False}, headers=world.auth)
    assert r.status == 200, await r.text()
    await _send(client, world, "fridge01", 9.0, t + timedelta(minutes=3))
    await _pass(client, clock, metas)
    third = metas.held([num])[num]
    assert third[0] != second[0] and third[1].rules == []
    n = await _one(dsn, "SELECT count(*) FROM events WHERE channel_id = %s", cid)
    assert n == 1  # the disabled rule raised nothing more

    r = await client.post(
        f"/v1/channels/{cid}/rules",
        json={"kind": "range", "params": {"ok_max": 8.0}, "grace_min": 0},
        headers=world.auth,
    )
    assert r.status == 201, await r.text()
    await _send(client, world, "fridge01", 9.5, t + timedelta(minutes=4))
    await _pass(client, clock, metas)
    assert metas.held([num])[num][0] != third[0]
    n = await _one(dsn, "SELECT count(*) FROM events WHERE channel_id = %s", cid)
    assert n == 2  # the new rule's alarm


# Each change to what META_SQL reads, made by hand, on fridge01's channel or what
# holds it; {ch}, {dev}, {site}: its channel, device and site ids.
CHANGES = {
    "rule added": "INSERT INTO rules (id, channel_id, kind, params)"
    " VALUES ('rul_x', '{ch}', 'range', '{{\"ok_max\": 3}}')",
    "rule edited": "UPDATE rules SET params = '{{\"ok_max\": 3}}' WHERE channel_id = '{ch}'",
    "rule disabled": "UPDATE rules SET enabled = false WHERE channel_id = '{ch}'",
    "rule deleted": "DELETE FROM rules WHERE channel_id = '{ch}'",
    "site's time zone": "UPDATE sites SET timezone = 'Asia/Tokyo' WHERE id = '{site}'",
    "device moved": "UPDATE devices SET site_id = '{other_site}' WHERE id = '{dev}'",
}


@pytest.mark.db
@pytest.mark.parametrize("change", list(CHANGES))
async def test_every_change_the_rules_statement_sees_moves_meta_rev(
    client: Any, world: World, clock: FakeClock, dsn: str, change: str
) -> None:
    t = clock() - timedelta(minutes=30)
    ch = await _send(client, world, "fridge01", 4.0, t)
    other = await _send(client, world, "fridge02", 4.0, t)
    await _pass(client, clock, evaluator.MetaCache())
    sql = "SELECT meta_rev FROM alarm_state WHERE channel_id = %s"
    before = {c: await _one(dsn, sql, c) for c in (ch, other)}
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        other_site = f"{world.site}_other"
        await conn.execute(
            "INSERT INTO sites (id, account_id, name, vertical, timezone)"
            " SELECT %s, account_id, 'Other', vertical, timezone FROM sites WHERE id = %s",
            (other_site, world.site),
        )
        sql_change = CHANGES[change].format(
            ch=ch, dev=world.device_ids["fridge01"], site=world.site, other_site=other_site
        )
        await conn.execute(sql_change)
    assert await _one(dsn, sql, ch) > before[ch]
    if change != "site's time zone":  # (fridge02 shares the site)
        assert await _one(dsn, sql, other) == before[other]


@pytest.mark.db
async def test_a_rule_edited_while_the_first_pass_makes_the_channels_state_is_seen(
    client: Any, world: World, clock: FakeClock, dsn: str
) -> None:
    """The demo's freezer (opensense/demo.py): its channel comes with its first reading and
    its limits are set at once. When the edit commits after the first pass has read the
    rules but before that pass's new `alarm_state` row is committed, the edit's trigger
    finds no row to move (the pass's is not visible to it yet): the pass must not keep
    what it read, or every later pass judges by the old limits (the demo then opened a
    freezer alarm on its whole history, CI of stop 33)."""
    metas = evaluator.MetaCache()
    t = clock() - timedelta(minutes=30)
    cid = await _send(client, world, "fridge01", 4.0, t)  # default rule: -2..5 °C
    num = await _num(dsn, cid)
    # the channel's state row as a channel made before the rows came with it has none
    # (the pass makes it)
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("DELETE FROM alarm_state WHERE channel_id = %s", (cid,))
    async with await psycopg.AsyncConnection.connect(dsn) as edit:
        # the edit made, its trigger run (no state row yet), not committed
        await edit.execute(
            "UPDATE rules SET params = '{\"ok_max\": 3}', grace_min = 0 WHERE channel_id = %s",
            (cid,),
        )
        await _pass(client, clock, metas)  # the first pass: reads the old rules
        assert await _status(dsn, cid) == "ok"
        assert metas.held([num]) == {}  # and keeps nothing: it made the state row
        await edit.commit()
    await _send(client, world, "fridge01", 4.0, t + timedelta(minutes=1))
    await _pass(client, clock, metas)
    assert metas.held([num])[num][1].rules[0].params["ok_max"] == 3
    assert await _status(dsn, cid) == "alarm"  # judged by the edited limit


@pytest.mark.db
async def test_a_new_channel_comes_with_its_state_row(
    client: Any, world: World, clock: FakeClock, dsn: str
) -> None:
    """Made in the transaction that makes the channel and its default rule, before any
    pass: a rule edit from then on moves its `meta_rev`."""
    cid = await _send(client, world, "fridge01", 4.0, clock() - timedelta(minutes=5))
    before = await _one(dsn, "SELECT meta_rev FROM alarm_state WHERE channel_id = %s", cid)
    # not judged yet, and the API and the overview say so, as before the row came
    r = await client.get(f"/v1/channels/{cid}/alarm-state", headers=world.auth)
    assert r.status == 200, await r.text()
    got = await r.json()
    assert got["status"] == "no_data" and got["last_ts"] is None, got
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        devices = await board.board(conn, world.account, clock())
    assert [c.status for d in devices for c in d.cards if c.channel_id == cid] == ["none"]
    rule = await _one(dsn, "SELECT id FROM rules WHERE channel_id = %s", cid)
    r = await client.patch(
        f"/v1/rules/{rule}", json={"params": {"ok_min": -2.0, "ok_max": 4.0}}, headers=world.auth
    )
    assert r.status == 200, await r.text()
    after = await _one(dsn, "SELECT meta_rev FROM alarm_state WHERE channel_id = %s", cid)
    assert after > before
