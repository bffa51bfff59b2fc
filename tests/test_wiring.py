"""The post-merge wiring between alarms, audit and status, against real PostgreSQL,
with the injected clock:

- every real alarm lifecycle step is an audit row in the step's transaction (a
  replay or a recompute writes none);
- every alarm configuration change is an audit row naming the API token;
- the alarm loops report into the status page's health registry;
- a tampered audit row fails the audit job, the audit component, and opens a P0.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from opensense import jobs
from opensense.alarms import tasks
from opensense.alarms.lifecycle import Change, transition
from opensense.api.jsonutil import rfc3339
from opensense.api.keys import STATUS
from opensense.app import create_app
from opensense.audit.note import generate_key
from opensense.audit.trail import iso

from .fixtures.database import owner_of
from .fixtures.server import make_world
from .test_alarms import (
    TG_SECRET,
    alarm_config,
    email_target,
    evaluate,
    events,
    ingest,
    link_telegram,
    send,
)
from .test_audit import _cfg, _tamper, _verify

pytestmark = pytest.mark.db


@pytest.fixture
async def setup(aiohttp_client, dsn, clock, smtp, telegram, webhook):
    """As tests/test_alarms.py: an app with the loops off, a tenant with fridge01."""
    cfg = alarm_config(clock, smtp, telegram)
    app = create_app(cfg, dsn)
    client = await aiohttp_client(app)
    world = await make_world(dsn, cfg, ("fridge01",))
    webhook.now = lambda: clock().timestamp()
    return client, world, app


async def audit_rows(dsn: str, account: str, since: int = -1) -> list[dict[str, Any]]:
    """The account's rows after seq `since` (a first uplink's channel.create left out)."""
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT seq, at, actor, action, subject, data FROM audit_log"
            " WHERE account_id = %s AND seq > %s ORDER BY seq",
            (account, since),
        )
        cols = ("seq", "at", "actor", "action", "subject", "data")
        rows = [dict(zip(cols, r, strict=True)) for r in await cur.fetchall()]
        return [r for r in rows if r["action"] != "channel.create"]


async def head(dsn: str, account: str) -> int:
    rows = await audit_rows(dsn, account)
    return rows[-1]["seq"] if rows else -1


async def token_id(dsn: str, account: str) -> str:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT id FROM tokens WHERE account_id = %s AND kind = 'ua_live'", (account,)
        )
        row = await cur.fetchone()
        assert row is not None
        return str(row[0])


# --- 1. the alarm lifecycle --------------------------------------------------------------


async def test_every_lifecycle_step_is_audited_once_at_the_injected_time(
    setup, dsn, clock, tmp_path
):
    client, world, app = setup
    tok = await token_id(dsn, world.account)
    start = await head(dsn, world.account)

    # too warm for 20 min: the alarm opens (grace 15 min)
    cid = await ingest(client, world, clock, [9.0] * 20)
    await evaluate(app)
    (ev,) = await events(client, world)
    rows = await audit_rows(dsn, world.account, start)
    assert [(r["action"], r["actor"], r["subject"]) for r in rows] == [
        ("alarm.open", "system", ev["id"])
    ]
    opened = rows[0]
    assert opened["at"] == clock()  # the injected clock, not the wall clock
    assert opened["data"]["channel_id"] == cid and opened["data"]["kind"] == "range"
    assert opened["data"]["at"] == iso(clock() - timedelta(minutes=4))  # the true time
    assert opened["data"]["started_at"] == iso(clock() - timedelta(minutes=19))

    # the engine running again, and a recompute replaying 24 h, find the event: no row
    # but the recompute itself (a configuration action)
    await evaluate(app)
    r = await client.post(f"/v1/channels/{cid}/recompute", headers=world.auth)
    assert r.status == 202
    await evaluate(app)
    rows = await audit_rows(dsn, world.account, start)
    assert [(r["action"], r["actor"]) for r in rows] == [
        ("alarm.open", "system"),
        ("channel.recompute", tok),
    ]

    # acknowledged with who and the corrective action; the API token is the carrier
    clock.advance(minutes=3)
    note = {"note": "door left open", "cause": "delivery", "action": "closed it",
            "product": "kept"}  # fmt: skip
    r = await client.post(
        f"/v1/events/{ev['id']}/ack", json={"by": "Maria", **note}, headers=world.auth
    )
    assert r.status == 200, await r.text()
    # a refused step (acknowledged already) writes nothing
    r = await client.post(
        f"/v1/events/{ev['id']}/ack", json={"by": "Tom", "note": "x"}, headers=world.auth
    )
    assert r.status == 409
    rows = await audit_rows(dsn, world.account, start)
    ack = rows[-1]
    assert (ack["action"], ack["actor"], ack["subject"], ack["at"]) == (
        "alarm.ack",
        "Maria",
        ev["id"],
        clock(),
    )
    assert ack["data"] == {**note, "by": "Maria", "via": tok, "channel_id": cid,
                           "device_id": ev["device_id"], "rule_id": ev["rule_id"],
                           "kind": "range", "at": iso(clock())}  # fmt: skip

    # back in range for the clear delay: the engine clears it
    clock.advance(minutes=20)
    await ingest(client, world, clock, [4.0] * 17)
    await evaluate(app)
    rows = await audit_rows(dsn, world.account, start)
    assert rows[-1]["action"] == "alarm.clear" and rows[-1]["actor"] == "system"
    assert "by" not in rows[-1]["data"]

    # a second alarm, cleared by a person with a note
    clock.advance(minutes=30)
    await ingest(client, world, clock, [9.0] * 20)
    await evaluate(app)
    ev2 = next(e for e in await events(client, world) if e["id"] != ev["id"])
    r = await client.post(
        f"/v1/events/{ev2['id']}/clear",
        json={"by": "Tom", "note": "fridge emptied and switched off"},
        headers=world.auth,
    )
    assert r.status == 200, await r.text()
    rows = await audit_rows(dsn, world.account, start)
    assert [r["action"] for r in rows[-2:]] == ["alarm.open", "alarm.clear"]
    assert rows[-1]["actor"] == "Tom" and rows[-1]["subject"] == ev2["id"]
    assert rows[-1]["data"]["note"] == "fridge emptied and switched off"
    assert rows[-1]["data"]["via"] == tok

    # the device goes silent, then comes back
    mark = rows[-1]["seq"]
    clock.advance(seconds=121)
    await evaluate(app)
    clock.advance(minutes=10)
    await ingest(client, world, clock, [4.0])
    await evaluate(app)
    rows = [
        r for r in await audit_rows(dsn, world.account, mark) if r["action"].startswith("device.")
    ]
    assert [(r["action"], r["actor"]) for r in rows] == [
        ("device.offline", "system"),
        ("device.online", "system"),
    ]
    assert rows[0]["subject"] == rows[1]["subject"]
    assert rows[0]["data"]["device_id"] == world.device_ids["fridge01"]

    # the whole chain, with these rows in it, verifies
    assert await _verify(dsn, _cfg(tmp_path, clock), world.account) == []


async def test_acknowledge_from_telegram_is_audited_with_the_chat(setup, dsn, clock, telegram):
    client, world, app = setup
    await link_telegram(client, world, -2002, roles=())
    await ingest(client, world, clock, [9.0] * 20)
    await evaluate(app)
    await send(app, client)
    (ev,) = await events(client, world)
    press = {"update_id": 2, "callback_query": {
        "id": "cbq-1", "from": {"id": 42, "username": "chef_anna"}, "data": f"ack:{ev['id']}",
        "message": {"message_id": 9, "chat": {"id": -2002}}}}  # fmt: skip
    r = await client.post(
        "/v1/telegram/webhook", json=press, headers={"X-Telegram-Bot-Api-Secret-Token": TG_SECRET}
    )
    assert r.status == 200
    row = (await audit_rows(dsn, world.account))[-1]
    assert (row["action"], row["actor"], row["subject"]) == (
        "alarm.ack",
        "telegram:chef_anna",
        ev["id"],
    )
    assert row["data"]["via"] == "telegram:chat:-2002"
    assert row["data"]["note"] == "acknowledged from Telegram"


async def test_transition_outside_a_transaction_is_refused(dsn, clock):
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        with pytest.raises(RuntimeError, match="inside the caller's transaction"):
            await transition(conn, Change("ack", clock(), clock(), event_id="evt_nothing"))


# --- 2. configuration changes ------------------------------------------------------------


async def test_every_alarm_config_change_is_audited_with_the_token(
    setup, dsn, clock, smtp, telegram, webhook
):
    client, world, app = setup
    tok = await token_id(dsn, world.account)
    cid = await ingest(client, world, clock, [4.0])
    start = await head(dsn, world.account)
    h = world.auth

    r = await client.post(
        f"/v1/channels/{cid}/rules",
        json={"kind": "range", "params": {"ok_max": 8}, "grace_min": 30},
        headers=h,
    )
    assert r.status == 201, await r.text()
    rule = await r.json()
    r = await client.patch(f"/v1/rules/{rule['id']}", json={"grace_min": 20}, headers=h)
    assert r.status == 200
    r = await client.patch(f"/v1/rules/{rule['id']}", json={"grace_min": -1}, headers=h)
    assert r.status == 422  # refused: no row
    r = await client.delete(f"/v1/rules/{rule['id']}", headers=h)
    assert r.status == 200
    tgt = await email_target(client, app, world, smtp, "cook@example.test")
    r = await client.post(
        "/v1/targets", json={"path": "webhook", "address": webhook.url}, headers=h
    )
    assert r.status == 201
    r = await client.delete(f"/v1/targets/{tgt}", headers=h)
    assert r.status == 200
    await link_telegram(client, world, 555)
    r = await client.put(
        f"/v1/sites/{world.site}/escalation", json={"steps": [{"delay_min": 0, "to": "everyone"}]},
        headers=h,
    )  # fmt: skip
    assert r.status == 200
    r = await client.post(
        "/v1/silences",
        json={"from": rfc3339(clock()), "to": rfc3339(clock() + timedelta(hours=1)),
              "reason": "deep clean"},
        headers=h,
    )  # fmt: skip
    assert r.status == 201
    r = await client.post(f"/v1/channels/{cid}/recompute", headers=h)
    assert r.status == 202
    # the test alarm changes no configuration: it is in outbound_log, not the trail
    before = await head(dsn, world.account)
    r = await client.post("/v1/notifications/test", json={"by": "QA"}, headers=h)
    assert r.status == 200
    assert await head(dsn, world.account) == before

    rows = await audit_rows(dsn, world.account, start)
    got = [(r["action"], r["actor"]) for r in rows]
    assert got == [
        ("rule.create", tok),
        ("rule.update", tok),
        ("rule.delete", tok),
        ("target.create", tok),
        ("target.verify", "email:cook@example.test"),
        ("target.create", tok),
        ("target.delete", tok),
        ("telegram.link_code", tok),
        ("target.create", "telegram:chat:555"),
        ("escalation.update", tok),
        ("silence.create", tok),
        ("channel.recompute", tok),
    ]
    by = {r["action"]: r for r in rows}
    assert by["rule.create"]["data"]["params"] == {"ok_max": 8}
    assert by["rule.update"]["data"]["grace_min"] == {"from": 30, "to": 20}
    assert by["rule.delete"]["subject"] == rule["id"]
    assert by["target.delete"]["data"]["address"] == "cook@example.test"
    assert rows[8]["data"]["address"] == "555" and rows[8]["data"]["path"] == "telegram"
    assert by["escalation.update"]["data"]["to"] == [{"delay_min": 0, "to": "everyone"}]
    assert by["silence.create"]["data"]["reason"] == "deep clean"
    assert all(r["at"] == clock() for r in rows)  # the injected clock
    # no secret in any row: the webhook's signing secret and the link code
    assert "whsec_" not in str(rows)


# --- 3. loop health on the status page -----------------------------------------------------


def _comp(snap: dict[str, Any], cid: str) -> dict[str, Any]:
    return next(c for c in snap["components"] if c["id"] == cid)


async def _snap(client: Any) -> dict[str, Any]:
    await client.app[STATUS].tick()
    r = await client.get("/status.json")
    return await r.json()


async def test_alarm_loops_report_their_health(aiohttp_client, new_database, clock, smtp, telegram):
    dsn = new_database()
    cfg = alarm_config(clock, smtp, telegram, operator_token="op")
    client = await aiohttp_client(create_app(cfg, dsn))
    await client.app[STATUS].pause()
    app = client.app
    assert _comp(await _snap(client), "rule_engine")["state"] == "unknown"

    state: dict[str, float] = {}  # cleared before each pass: the time sweep runs too
    state.clear()
    await tasks.evaluator_work(app, True, state)
    await tasks.sender_work(app, True, {})
    snap = await _snap(client)
    assert _comp(snap, "rule_engine")["state"] == "operational"
    assert _comp(snap, "dispatch_email")["state"] == "operational"

    # a real failure: the evaluator's table is gone
    # the fault is injected as the tables' owner: the app role may not rename them
    async with await psycopg.AsyncConnection.connect(owner_of(dsn), autocommit=True) as conn:
        await conn.execute("ALTER TABLE alarm_dirty RENAME TO alarm_dirty_gone")
        await conn.execute("ALTER TABLE outbox RENAME TO outbox_gone")
    state.clear()
    await tasks.evaluator_work(app, True, state)
    await tasks.sender_work(app, True, {})
    snap = await _snap(client)
    assert _comp(snap, "rule_engine")["state"] == "outage"
    assert _comp(snap, "dispatch_email")["state"] == "outage"
    assert "sender" in _comp(snap, "dispatch_email")["detail"]
    r = await client.get("/v1/status/internal", headers={"Authorization": "Bearer op"})
    internal = await r.json()
    assert "alarm_dirty" in str(internal)  # the operator sees why; the public page does not
    assert "alarm_dirty" not in str(snap)

    async with await psycopg.AsyncConnection.connect(owner_of(dsn), autocommit=True) as conn:
        await conn.execute("ALTER TABLE alarm_dirty_gone RENAME TO alarm_dirty")
        await conn.execute("ALTER TABLE outbox_gone RENAME TO outbox")
    state.clear()
    await tasks.evaluator_work(app, True, state)
    await tasks.sender_work(app, True, {})
    snap = await _snap(client)
    assert _comp(snap, "rule_engine")["state"] == "operational"
    assert _comp(snap, "dispatch_email")["state"] == "operational"


# --- 4. audit integrity: tamper -> verify fails -> component fails -> P0 ----------------


async def test_a_tampered_audit_row_opens_a_p0(aiohttp_client, new_database, clock, tmp_path: Path):
    from .test_status import cfg_for

    dsn = new_database()
    cfg = cfg_for(clock, state_dir=tmp_path, audit_origin="test.invalid/audit")
    generate_key(tmp_path / "audit" / "signing.key", "test.invalid/audit")  # keygen
    client = await aiohttp_client(create_app(cfg, dsn))
    await client.app[STATUS].pause()
    w = await make_world(dsn, cfg)
    assert _comp(await _snap(client), "audit")["state"] == "unknown"

    verify_job = next(j for j in jobs.JOBS if j.name == "audit_verify")
    checkpoint = next(j for j in jobs.JOBS if j.name == "audit_checkpoint")
    async with AsyncConnectionPool(
        dsn, min_size=1, max_size=2, kwargs={"autocommit": True}
    ) as pool:
        ran = await jobs.run_due(pool, cfg, (verify_job, checkpoint))
        assert [r.split(": ")[:2] for r in ran] == [
            ["audit_verify", "ok"],
            ["audit_checkpoint", "ok"],
        ]
        snap = await _snap(client)
        assert _comp(snap, "audit")["state"] == "operational"

        # a superuser edits a row behind the trigger's back
        rows = await audit_rows(dsn, w.account)
        async with await psycopg.AsyncConnection.connect(dsn) as conn:
            cur = await conn.execute(
                "SELECT id FROM audit_log WHERE account_id = %s AND seq = %s",
                (w.account, rows[-1]["seq"]),
            )
            (victim,) = await cur.fetchone()  # type: ignore[misc]
        _tamper(dsn, f"UPDATE audit_log SET actor = 'cli:mallory' WHERE id = {victim}")

        clock.advance(hours=1, seconds=1)
        ran = await jobs.run_due(pool, cfg, (verify_job,))
        assert ran[0].startswith("audit_verify: failed: AuditBroken")
        assert f"row id {victim}" in ran[0]
        # the daily checkpoint refuses to sign over it
        clock.advance(days=1)
        ran = await jobs.run_due(pool, cfg, (checkpoint,))
        assert ran[0].startswith("audit_checkpoint: failed: AuditBroken")
    opened_at = clock()
    snap = await _snap(client)
    assert _comp(snap, "audit")["state"] == "outage"
    assert "mallory" not in str(snap) and f"row id {victim}" not in str(snap)
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        # (a day without backups also opened backup_old, P2: not this test's business)
        cur = await conn.execute(
            "SELECT class, condition, opened_at FROM incidents WHERE condition LIKE 'audit%'"
        )
        assert await cur.fetchall() == [("P0", "audit_integrity", opened_at)]
    r = await client.get("/v1/status/internal", headers={"Authorization": "Bearer op-secret"})
    assert f"row id {victim}" in str(await r.json())  # the operator is told which row


async def test_one_pass_over_two_accounts_writes_each_accounts_row(setup, dsn, clock, tmp_path):
    """The evaluator writes a pass's rows at its end, account after account: each
    account's chain gets its own row, and both chains verify."""
    client, world, app = setup
    from opensense.api.keys import CONFIG

    other = await make_world(dsn, app[CONFIG], ("fridge01",))
    await ingest(client, world, clock, [9.0] * 20)
    await ingest(client, other, clock, [9.0] * 20)
    await evaluate(app)  # both channels in one pass
    for w in (world, other):
        (ev,) = await events(client, w)
        rows = await audit_rows(dsn, w.account)
        assert [(r["action"], r["subject"]) for r in rows if r["action"].startswith("alarm")] == [
            ("alarm.open", ev["id"])
        ]
        assert await _verify(dsn, _cfg(tmp_path, clock), w.account) == []
