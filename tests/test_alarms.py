"""Alarms end to end with an injected clock, real PostgreSQL, a real SMTP server,
a Bot API double and a signature-checking webhook receiver. The background loops
are off in most tests; each test drives the evaluator and the sender one step at
a time (the same functions the loops call), so what happens when is exact."""

from __future__ import annotations

import asyncio
import re
from datetime import datetime, timedelta
from typing import Any

import psycopg
import pytest

from opensense.alarms import dispatch, evaluator
from opensense.api.jsonutil import rfc3339
from opensense.api.keys import ALARMS_HTTP as HTTP
from opensense.api.keys import CONFIG, POOL
from opensense.app import create_app
from opensense.settings import Config

from .fixtures.clock import FakeClock
from .fixtures.notify import BOT_TOKEN, FakeTelegram, Mailbox, WebhookReceiver
from .fixtures.server import World, make_world, test_config

pytestmark = pytest.mark.db

TG_SECRET = "tg-hook-secret"


def alarm_config(clock: FakeClock, smtp: Mailbox, tg: FakeTelegram, **over: Any) -> Config:
    base: dict[str, Any] = dict(
        alarms_enabled=False,
        telegram_bot_token=BOT_TOKEN,
        telegram_api_base=tg.url,
        telegram_webhook_secret=TG_SECRET,
        smtp_host="127.0.0.1",
        smtp_port=smtp.port,  # type: ignore[attr-defined]
        smtp_tls="none",
        mail_from="alerts@opensense.test",
        # the local webhook receiver (fixtures/notify.py) listens on 127.0.0.1: allowed
        # explicitly here; tests/test_attack_dispatch.py holds the default (refused)
        webhook_allow_private=True,
    )
    base.update(over)
    return test_config(clock, **base)


@pytest.fixture
async def setup(aiohttp_client, dsn, clock, smtp, telegram, webhook):
    cfg = alarm_config(clock, smtp, telegram)
    app = create_app(cfg, dsn)
    client = await aiohttp_client(app)
    world = await make_world(dsn, cfg, ("fridge01",))
    webhook.now = lambda: clock().timestamp()
    return client, world, app


async def ingest(
    client, world: World, clock: FakeClock, values, every_min: float = 1.0, start=None
):
    """POST readings one minute apart ending now (or from `start`), 30 a request."""
    start = start or clock() - timedelta(minutes=every_min * (len(values) - 1))
    ms = [
        {"type": "temperature", "value": v, "ts": rfc3339(start + timedelta(minutes=i * every_min))}
        for i, v in enumerate(values)
    ]
    cid = None
    for i in range(0, len(ms), 30):
        r = await client.post(
            "/v1/ingest",
            json={"device": "fridge01", "measurements": ms[i : i + 30]},
            headers=world.dev_auth("fridge01"),
        )
        assert r.status == 200, await r.text()
        cid = (await r.json())["channels"][0]["channel_id"]
    return cid


async def evaluate(app) -> None:
    pool, now = app[POOL], app[CONFIG].clock()
    while (await evaluator.evaluate_dirty(pool, now)).channels:
        pass
    await evaluator.tick_due(pool, now)
    await evaluator.check_devices(pool, now)
    await evaluator.renotify(pool, now)
    await evaluator.silences(pool, now)


async def send(app, client) -> None:
    while await dispatch.dispatch_due(app[POOL], app[CONFIG], app[HTTP]):
        pass


async def events(client, world, **q) -> list[dict[str, Any]]:
    r = await client.get("/v1/events", params=q, headers=world.auth)
    assert r.status == 200
    return (await r.json())["data"]


async def link_telegram(client, world, chat_id: int, roles=("shift",)) -> None:
    r = await client.post("/v1/telegram/link", json={"roles": list(roles)}, headers=world.auth)
    assert r.status == 201
    code = (await r.json())["code"]
    update = {"update_id": 1, "message": {"message_id": 1, "chat": {"id": chat_id, "type": "group"},
                                          "text": f"/start {code}"}}  # fmt: skip
    r = await client.post(
        "/v1/telegram/webhook", json=update, headers={"X-Telegram-Bot-Api-Secret-Token": TG_SECRET}
    )
    assert r.status == 200


async def email_target(client, app, world, smtp: Mailbox, addr: str, roles=()) -> str:
    """Add an email recipient and confirm it (double opt-in) from the email it gets."""
    r = await client.post(
        "/v1/targets", json={"path": "email", "address": addr, "roles": list(roles)},
        headers=world.auth,
    )  # fmt: skip
    assert r.status == 201, await r.text()
    tid = (await r.json())["id"]
    mails: list[Any] = []
    for _ in range(100):
        if app is not None:
            await send(app, client)
        mails = [m for m in smtp.to(addr) if "Confirm" in m["Subject"]]
        if mails:
            break
        await asyncio.sleep(0.05)
    found = re.search(r"token=([\w-]+)", mails[0].get_payload(decode=True).decode())
    assert found is not None
    # the link shows a page with a button (GET changes nothing); the button POSTs
    r = await client.get("/v1/targets/verify", params={"token": found.group(1)})
    assert r.status == 200 and "<form" in await r.text()
    r = await client.post("/v1/targets/verify", params={"token": found.group(1)})
    assert r.status == 200 and "Confirmed" in await r.text()
    smtp.messages.remove(mails[0])
    return tid


async def add_targets(client, world, webhook: WebhookReceiver, app=None, smtp=None) -> None:
    for addr, roles in (("shift@example.test", ["shift"]), ("boss@example.test", ["manager"]),
                        ("all@example.test", [])):  # fmt: skip
        await email_target(client, app, world, smtp, addr, roles)
    r = await client.post(
        "/v1/targets", json={"path": "webhook", "address": webhook.url}, headers=world.auth
    )
    assert r.status == 201
    webhook.secret = (await r.json())["secret"]


async def test_door_open_ten_minutes_is_no_alarm(setup, clock, smtp, telegram):
    client, world, app = setup
    await ingest(client, world, clock, [3.5] * 5 + [7.5] * 10 + [4.0] * 10)
    await evaluate(app)
    await send(app, client)
    assert await events(client, world) == []
    assert smtp.messages == [] and telegram.sent() == []


async def test_compressor_failure_escalates_until_acknowledged_then_clears(
    setup, clock, smtp, telegram, webhook
):
    client, world, app = setup
    await add_targets(client, world, webhook, app, smtp)
    await link_telegram(client, world, 777)
    assert "Linked" in telegram.sent()[0]["text"]
    r = await client.put(
        f"/v1/sites/{world.site}/escalation",
        json={
            "steps": [
                {"delay_min": 0, "to": "on_shift"},
                {"delay_min": 15, "to": "manager"},
                {"delay_min": 30, "to": "everyone"},
            ]
        },  # fmt: skip
        headers=world.auth,
    )
    assert r.status == 200

    # the compressor dies: 4 °C, then rising past 5 °C; 20 min of readings, committed now
    cid = await ingest(client, world, clock, [4.0] * 3 + [6.0 + i * 0.1 for i in range(20)])
    await evaluate(app)
    evs = await events(client, world)
    assert len(evs) == 1
    ev = evs[0]
    out_at = clock() - timedelta(minutes=19)
    assert ev["state"] == "alarm" and ev["kind"] == "range" and ev["channel_id"] == cid
    assert ev["started_at"] == rfc3339(out_at)
    assert ev["alarm_at"] == rfc3339(out_at + timedelta(minutes=15))

    await send(app, client)
    # step 0: the shift (email + Telegram group) and every webhook
    assert [m["Subject"] for m in smtp.to("shift@example.test")] == ["[ALARM] Shop temperature"]
    assert smtp.to("boss@example.test") == [] and smtp.to("all@example.test") == []
    tg = [p for p in telegram.sent() if p["chat_id"] == "777" and "ALARM" in p["text"]]
    assert len(tg) == 1
    button = tg[0]["reply_markup"]["inline_keyboard"][0][0]
    assert button["callback_data"] == f"ack:{ev['id']}"
    assert [w["type"] for w in webhook.received] == ["alarm_opened"]
    assert webhook.received[0]["data"]["event_id"] == ev["id"] and webhook.rejected == 0

    # the engine running again (a restart, a replay) sends nothing twice
    await evaluate(app)
    await send(app, client)
    assert len(smtp.messages) == 1 and len(webhook.received) == 1

    # 15 min later nobody acknowledged: the manager
    clock.advance(minutes=16)
    await send(app, client)
    assert [m["Subject"] for m in smtp.to("boss@example.test")] == ["[ALARM] Shop temperature"]
    assert smtp.to("all@example.test") == []

    # the manager acknowledges with the corrective action: the last step never goes out
    r = await client.post(
        f"/v1/events/{ev['id']}/ack",
        json={
            "by": "Maria (manager)",
            "note": "compressor tripped",
            "cause": "breaker",
            "action": "reset breaker, moved stock to cold room 2",
            "product": "kept: core temperature 6.1 °C after 40 min",
        },  # fmt: skip
        headers=world.auth,
    )
    assert r.status == 200, await r.text()
    acked = await r.json()
    assert acked["state"] == "acknowledged" and acked["acknowledged_by"] == "Maria (manager)"
    assert acked["ack_product"].startswith("kept")
    r = await client.post(
        f"/v1/events/{ev['id']}/ack", json={"by": "x", "note": "again"}, headers=world.auth
    )
    assert r.status == 409 and (await r.json())["error"]["code"] == "event_state"
    clock.advance(minutes=20)
    await send(app, client)
    assert smtp.to("all@example.test") == []
    assert [w["type"] for w in webhook.received] == ["alarm_opened", "alarm_ack"]

    # back in range, held for the clear delay (same as grace): cleared at its true time
    back = clock() - timedelta(minutes=16)
    await ingest(client, world, clock, [4.0] * 17)
    await evaluate(app)
    await send(app, client)
    ev = (await events(client, world))[0]
    assert ev["state"] == "cleared" and ev["cleared_by"] == "system"
    assert ev["cleared_at"] == rfc3339(back + timedelta(minutes=15))
    assert [w["type"] for w in webhook.received] == ["alarm_opened", "alarm_ack", "alarm_cleared"]
    assert "[CLEARED]" in smtp.to("shift@example.test")[-1]["Subject"]

    r = await client.get("/v1/outbound-log", headers=world.auth)
    log = (await r.json())["data"]
    assert {e["path"] for e in log} == {"email", "telegram", "webhook"}
    assert all(e["status"] == "ok" for e in log)


async def test_acknowledge_from_the_telegram_button(setup, clock, telegram, smtp):
    client, world, app = setup
    await link_telegram(client, world, -1001, roles=())
    await ingest(client, world, clock, [9.0] * 20)
    await evaluate(app)
    await send(app, client)
    ev = (await events(client, world))[0]
    msg = [p for p in telegram.sent() if "ALARM" in p["text"]][0]
    data = msg["reply_markup"]["inline_keyboard"][0][0]["callback_data"]
    press = {"update_id": 2, "callback_query": {
        "id": "cbq-1", "from": {"id": 42, "username": "chef_anna"}, "data": data,
        "message": {"message_id": 9, "chat": {"id": -1001}}}}  # fmt: skip
    hdr = {"X-Telegram-Bot-Api-Secret-Token": TG_SECRET}
    r = await client.post("/v1/telegram/webhook", json=press, headers=hdr)
    assert r.status == 200
    answers = telegram.sent("answerCallbackQuery")
    assert answers[-1]["callback_query_id"] == "cbq-1" and "Acknowledged" in answers[-1]["text"]
    ev = (await events(client, world))[0]
    assert ev["state"] == "acknowledged" and ev["acknowledged_by"] == "telegram:chef_anna"
    # another chat's button press cannot acknowledge this account's alarm
    press["callback_query"]["message"]["chat"]["id"] = 5  # type: ignore[index]
    press["callback_query"]["id"] = "cbq-2"  # type: ignore[index]
    await client.post("/v1/telegram/webhook", json=press, headers=hdr)
    assert "may not" in telegram.sent("answerCallbackQuery")[-1]["text"]
    r = await client.post("/v1/telegram/webhook", json=press, headers={})
    assert r.status == 403


async def test_nightly_defrost_inside_a_window_is_no_alarm(setup, clock, smtp):
    client, world, app = setup
    cid = await ingest(client, world, clock, [3.0])
    ch = await (await client.get(f"/v1/channels/{cid}", headers=world.auth)).json()
    rule_id = ch["rules"][0]["id"]
    # the defrost starts 50 min ago, in the site's time zone (Europe/Berlin)
    from zoneinfo import ZoneInfo

    local = (clock() - timedelta(minutes=50)).astimezone(ZoneInfo("Europe/Berlin"))
    rr = f"FREQ=DAILY;BYHOUR={local.hour};BYMINUTE={local.minute}"
    r = await client.patch(
        f"/v1/rules/{rule_id}",
        json={"windows": [{"rrule": rr, "duration_min": 45, "params": {"ok_max": 12}}]},
        headers=world.auth,
    )
    assert r.status == 200, await r.text()
    r = await client.patch(
        f"/v1/rules/{rule_id}", json={"windows": [{"rrule": "FREQ=SOMETIMES", "duration_min": 5}]},
        headers=world.auth,
    )  # fmt: skip
    assert r.status == 422 and (await r.json())["error"]["code"] == "invalid_rule"
    await ingest(client, world, clock, [10.0] * 40 + [6.0] * 5 + [4.0] * 5)
    await evaluate(app)
    assert await events(client, world) == []


async def test_late_readings_after_a_six_hour_outage_open_events_at_true_times(setup, clock, smtp):
    client, world, app = setup
    await email_target(client, app, world, smtp, "night@example.test")
    t0 = clock() - timedelta(hours=8)
    # 1 h before the outage, with a hole (minutes 10..29) that arrives last of all
    await ingest(client, world, clock, [3.0] * 10, start=t0)
    await ingest(client, world, clock, [3.0] * 30, start=t0 + timedelta(minutes=30))
    await evaluate(app)
    # the node buffered six hours; it arrives now, newest first in one burst
    outage = t0 + timedelta(hours=1)
    values = [3.0] * 60 + [9.0] * 120 + [3.0] * 180
    await ingest(client, world, clock, values, start=outage)
    await evaluate(app)
    evs = await events(client, world)
    range_evs = [e for e in evs if e["kind"] == "range"]
    assert len(range_evs) == 1
    e = range_evs[0]
    warm = outage + timedelta(hours=1)
    assert e["started_at"] == rfc3339(warm)
    assert e["alarm_at"] == rfc3339(warm + timedelta(minutes=15))
    assert e["cleared_at"] == rfc3339(warm + timedelta(hours=2, minutes=15))
    await send(app, client)
    subjects = [m["Subject"] for m in smtp.to("night@example.test")]
    assert subjects == ["[OpenSense] 2 notifications"] or subjects == [
        "[ALARM] Shop temperature",
        "[CLEARED] Shop temperature",
    ]

    # older readings that arrive later still (out of order) rewind and replay: a
    # 20-min excursion inside the first hour, before everything judged so far
    await ingest(client, world, clock, [9.0] * 20, start=t0 + timedelta(minutes=10))
    await evaluate(app)
    evs = [e for e in await events(client, world) if e["kind"] == "range"]
    assert len(evs) == 2
    early = min(evs, key=lambda e: e["started_at"])
    assert early["started_at"] == rfc3339(t0 + timedelta(minutes=10))
    assert early["alarm_at"] == rfc3339(t0 + timedelta(minutes=25))
    assert early["cleared_at"] == rfc3339(t0 + timedelta(minutes=45))
    assert [x for x in evs if x["id"] != early["id"]][0]["id"] == e["id"]  # untouched
    # replaying everything again changes nothing (idempotent recompute)
    cid = e["channel_id"]
    r = await client.post(f"/v1/channels/{cid}/recompute", headers=world.auth)
    assert r.status == 202
    await evaluate(app)
    again = [e for e in await events(client, world) if e["kind"] == "range"]
    assert sorted(x["id"] for x in again) == sorted(x["id"] for x in evs)


async def test_readings_waiting_for_the_engine_hold_back_the_grace_timer(setup, clock, smtp):
    """A channel in grace whose newer readings are stored but not judged yet (a pass
    still to come: the gather, a pass over its budget, a busy engine) is not ticked
    into an alarm: grace ran out "with no new reading" only if none came. The pass
    judges them; the tick acts when none is waiting."""
    client, world, app = setup
    await email_target(client, app, world, smtp, "waiting@example.test")
    pool, now = app[POOL], clock()
    t0 = now - timedelta(minutes=20)  # the excursion: grace 15 min, due 5 min ago
    await ingest(client, world, clock, [3.0] * 5 + [9.0], start=t0 - timedelta(minutes=5))
    while (await evaluator.evaluate_dirty(pool, now)).channels:
        pass
    # back in range a minute later: stored and marked for the engine, not judged yet
    await ingest(client, world, clock, [3.0], start=t0 + timedelta(minutes=1))
    assert await evaluator.tick_due(pool, now) == 0
    await evaluate(app)
    await send(app, client)
    assert await events(client, world) == []
    assert smtp.to("waiting@example.test") == []
    # out of range again and nothing after it: the grace running out opens the alarm
    t1 = now - timedelta(minutes=16)
    await ingest(client, world, clock, [9.0], start=t1)
    while (await evaluator.evaluate_dirty(pool, now)).channels:
        pass
    assert await evaluator.tick_due(pool, now) >= 1
    (e,) = [x for x in await events(client, world) if x["kind"] == "range"]
    assert e["started_at"] == rfc3339(t1) and e["alarm_at"] == rfc3339(t1 + timedelta(minutes=15))


async def test_the_events_worst_value_counts_readings_after_it_opened(setup, clock):
    """Issue 18 item 5: grace 15 min, 8.0, 8.5 at +14 min and 9.7 at +21 min is an
    event whose worst value is 9.7 — in one request, split over two, and late."""
    client, world, app = setup
    t0 = clock() - timedelta(hours=6)

    def at(minute: float):
        return t0 + timedelta(minutes=minute)

    async def post(minute: float, value: float) -> None:
        await ingest(client, world, clock, [value], start=at(minute))

    async def worst(since) -> list[Any]:
        return [e["value"] for e in await events(client, world)
                if e["kind"] == "range" and e["started_at"] == rfc3339(since)]  # fmt: skip

    # in order, one request: 8.0, 8.5 at +14, 9.7 at +21, back in range at +30
    await ingest(client, world, clock, [8.0] + [8.5] * 13 + [8.5] * 7 + [9.7] + [3.0] * 30,
                 start=at(0))  # fmt: skip
    await evaluate(app)
    assert await worst(at(0)) == [9.7]
    # split over requests, each evaluated before the next arrives
    await post(120, 8.0)
    await post(134, 8.5)
    await evaluate(app)
    await post(141, 9.7)
    await evaluate(app)
    assert await worst(at(120)) == [9.7]
    await post(160, 3.0)
    await evaluate(app)
    # late: 8.0, 8.5 at +14 and 9.0 at +30 are judged; 9.7 at +21 arrives afterwards
    await post(240, 8.0)
    await post(254, 8.5)
    await post(270, 9.0)
    await evaluate(app)
    assert await worst(at(240)) == [9.0]
    await post(261, 9.7)
    await evaluate(app)
    assert await worst(at(240)) == [9.7]
    # the replay ran through the earlier event's clearing: it closed that one, and left
    # the still open one open (a checkpoint once held the later open events)
    late = [e for e in await events(client, world) if e["started_at"] == rfc3339(at(240))]
    assert late[0]["cleared_at"] is None
    # a steady rise in one request: a peak per reading, applied as the last one
    await post(280, 3.0)
    await evaluate(app)
    await ingest(client, world, clock, [6.0 + 0.2 * i for i in range(31)], start=at(330))
    await evaluate(app)
    assert await worst(at(330)) == [12.0]


async def test_flapping_around_the_limit_is_one_event(setup, clock):
    client, world, app = setup
    await ingest(client, world, clock, [6.0] * 20 + [4.9, 5.1] * 30 + [4.0] * 20)
    await evaluate(app)
    evs = await events(client, world)
    assert len(evs) == 1 and evs[0]["state"] == "cleared"


async def test_device_going_silent_is_reported_and_back_online(setup, clock, smtp, webhook):
    client, world, app = setup
    await add_targets(client, world, webhook, app, smtp)
    await ingest(client, world, clock, [3.0] * 3)
    await evaluate(app)
    clock.advance(seconds=119)  # cadence 60 s: offline after 2 x cadence
    await evaluate(app)
    assert await events(client, world) == []
    clock.advance(seconds=2)
    await evaluate(app)
    evs = await events(client, world)
    assert [e["kind"] for e in evs] == ["device_offline"]
    await send(app, client)
    assert [w["type"] for w in webhook.received] == ["device_offline"]
    assert "[OFFLINE]" in smtp.to("all@example.test")[0]["Subject"]
    clock.advance(minutes=30)
    await ingest(client, world, clock, [3.0])
    await evaluate(app)
    await send(app, client)
    evs = await events(client, world)
    assert evs[0]["state"] == "cleared"
    assert [w["type"] for w in webhook.received] == ["device_offline", "device_online"]


async def test_silence_window_mutes_notifications_not_the_alarm(setup, clock, smtp, webhook):
    client, world, app = setup
    await email_target(client, app, world, smtp, "q@example.test")
    r = await client.post(
        "/v1/targets", json={"path": "webhook", "address": webhook.url}, headers=world.auth
    )
    webhook.secret = (await r.json())["secret"]
    r = await client.post(
        "/v1/silences",
        json={
            "from": rfc3339(clock() - timedelta(hours=1)),
            "to": rfc3339(clock() + timedelta(hours=1)),
            "reason": "deep clean",
        },  # fmt: skip
        headers=world.auth,
    )
    assert r.status == 201
    await ingest(client, world, clock, [9.0] * 20)
    await evaluate(app)
    await send(app, client)
    assert len(await events(client, world)) == 1
    assert smtp.messages == []
    # webhooks hear the silence itself, once when it opens and once when it closes
    assert [w["type"] for w in webhook.received] == ["silence_opened"]
    assert webhook.received[0]["data"]["reason"] == "deep clean"
    clock.advance(hours=1, minutes=1)
    await ingest(client, world, clock, [9.0])
    await evaluate(app)
    await evaluate(app)
    await send(app, client)
    assert [w["type"] for w in webhook.received] == ["silence_opened", "silence_closed"]


async def test_acknowledged_alarm_renotifies_while_still_out_of_range(setup, clock, smtp):
    client, world, app = setup
    await email_target(client, app, world, smtp, "r@example.test")
    cid = await ingest(client, world, clock, [3.0])
    ch = await (await client.get(f"/v1/channels/{cid}", headers=world.auth)).json()
    r = await client.patch(
        f"/v1/rules/{ch['rules'][0]['id']}", json={"renotify_min": 30}, headers=world.auth
    )
    assert r.status == 200
    clock.advance(minutes=20)
    await ingest(client, world, clock, [9.0] * 20)
    await evaluate(app)
    ev = (await events(client, world))[0]
    await send(app, client)
    await client.post(
        f"/v1/events/{ev['id']}/ack", json={"by": "Tom", "note": "on it"}, headers=world.auth
    )
    clock.advance(minutes=29)
    await ingest(client, world, clock, [9.5] * 29)
    await evaluate(app)
    await send(app, client)
    told = ["[ALARM] Shop temperature", "[ACKNOWLEDGED] Shop temperature"]
    assert [m["Subject"] for m in smtp.to("r@example.test")] == told
    clock.advance(minutes=2)
    await evaluate(app)
    await send(app, client)
    subjects = [m["Subject"] for m in smtp.to("r@example.test")]
    assert subjects == [*told, "[STILL IN ALARM] Shop temperature"]
    clock.advance(minutes=5)
    await ingest(client, world, clock, [9.5] * 7)
    await evaluate(app)
    await send(app, client)
    assert len(smtp.to("r@example.test")) == 3  # the next reminder is 30 min later


async def test_test_alarm_goes_through_every_path_and_is_logged(
    setup, clock, smtp, telegram, webhook
):
    client, world, app = setup
    await add_targets(client, world, webhook, app, smtp)
    await link_telegram(client, world, 555)
    r = await client.post("/v1/notifications/test", json={"by": "installer"}, headers=world.auth)
    assert r.status == 200
    results = (await r.json())["results"]
    assert {x["path"] for x in results} == {"email", "telegram", "webhook"}
    assert all(x["status"] == "ok" for x in results), results
    # (the test notifications only: the outbox is the database's, and a message another
    # test left in it may go out through this app's dispatcher meanwhile)
    tests = [m for m in smtp.messages if m["Subject"] == "[TEST] OpenSense test notification"]
    assert len(tests) == 3 and webhook.received[-1]["type"] == "test"
    telegram.fail = 403  # the bot was removed from the group
    r = await client.post("/v1/notifications/test", json={"by": "installer"}, headers=world.auth)
    tg = [x for x in (await r.json())["results"] if x["path"] == "telegram"][0]
    assert tg["status"] == "failed" and tg["code"] == 403
    log = (await (await client.get("/v1/outbound-log", headers=world.auth)).json())["data"]
    assert log[0]["kind"] == "test" and any(e["status"] == "dropped" for e in log)


async def test_a_path_failing_five_minutes_is_reported_through_the_others(
    setup, clock, smtp, telegram
):
    client, world, app = setup
    clock.advance(hours=6)  # path health is global: clear of the other tests' attempts
    await email_target(client, app, world, smtp, "ops@example.test")
    await link_telegram(client, world, 999)
    telegram.fail = 502
    await ingest(client, world, clock, [9.0] * 20)
    await evaluate(app)
    for _ in range(8):  # retried with backoff while Telegram answers 502
        await send(app, client)
        clock.advance(minutes=1)
    opened = await dispatch.check_paths(app[POOL], clock())
    assert opened == ["telegram"]
    await send(app, client)
    assert any("DISPATCH FAILING" in m["Subject"] for m in smtp.to("ops@example.test"))
    assert await dispatch.check_paths(app[POOL], clock()) == []  # reported once


async def test_one_evaluator_per_channel_across_processes(dsn, clock, smtp, telegram):
    """Two apps (two 'processes') with live loops on one database: every reading is
    judged once, the alarm opens once, the message goes out once."""
    cfg = alarm_config(clock, smtp, telegram, alarms_enabled=True, alarm_sweep_s=0.2)
    apps = [create_app(cfg, dsn) for _ in range(2)]
    from aiohttp.test_utils import TestClient, TestServer

    clients = [TestClient(TestServer(a)) for a in apps]
    for c in clients:
        await c.start_server()
    try:
        world = await make_world(dsn, cfg, ("fridge01",))
        await email_target(clients[0], None, world, smtp, "one@example.test")
        for i in range(20):
            await ingest(
                clients[i % 2], world, clock, [9.0], start=clock() - timedelta(minutes=20 - i)
            )
        for _ in range(100):
            if smtp.to("one@example.test"):
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)
        assert len(smtp.to("one@example.test")) == 1
        async with await psycopg.AsyncConnection.connect(dsn) as conn:
            cur = await conn.execute(
                "SELECT count(*) FROM events WHERE account_id = %s", (world.account,)
            )
            assert (await cur.fetchone())[0] == 1
    finally:
        for c in clients:
            await c.close()


async def test_outbox_survives_a_restart_and_sends_once(aiohttp_client, dsn, clock, smtp, telegram):
    """The alarm commits with its outbox rows; a server stopped before sending sends
    after the restart, once."""
    cfg = alarm_config(clock, smtp, telegram)
    first = create_app(cfg, dsn)
    client = await aiohttp_client(first)
    world = await make_world(dsn, cfg, ("fridge01",))
    await email_target(client, first, world, smtp, "rs@example.test")
    await ingest(client, world, clock, [9.0] * 20)
    await evaluate(first)
    await client.close()  # stopped before the sender ran
    assert smtp.to("rs@example.test") == []
    second = create_app(cfg, dsn)
    client2 = await aiohttp_client(second)
    await evaluate(second)
    await send(second, client2)
    await send(second, client2)
    assert [m["Subject"] for m in smtp.to("rs@example.test")] == ["[ALARM] Shop temperature"]


async def test_webhook_answers_decide_drop_retry_and_retry_after(setup, clock, webhook):
    client, world, app = setup
    r = await client.post(
        "/v1/targets", json={"path": "webhook", "address": webhook.url}, headers=world.auth
    )
    webhook.secret = (await r.json())["secret"]
    webhook.status = 429
    await ingest(client, world, clock, [9.0] * 20)
    await evaluate(app)
    await send(app, client)
    async with app[POOL].connection() as conn:
        cur = await conn.execute(
            "SELECT status, attempts, due_at FROM outbox WHERE account_id = %s", (world.account,)
        )
        status, attempts, due = await cur.fetchone()
    assert status == "pending" and attempts == 1 and due == clock() + timedelta(seconds=30)
    webhook.status = 410  # gone: a 4xx other than 429 is dropped, not retried
    clock.advance(seconds=31)
    await send(app, client)
    async with app[POOL].connection() as conn:
        cur = await conn.execute(
            "SELECT status FROM outbox WHERE account_id = %s", (world.account,)
        )
        assert (await cur.fetchone())[0] == "dropped"
    log = (await (await client.get("/v1/outbound-log", headers=world.auth)).json())["data"]
    # a webhook's 429 is the customer's endpoint, not the path: "rejected" (retried;
    # not counted as the webhook path failing service-wide, docs/status.md)
    assert [(e["status"], e["code"]) for e in log] == [("dropped", 410), ("rejected", 429)]
    assert webhook.received == [] and webhook.rejected == 0


async def test_per_channel_minimum_interval_holds_a_second_alarm(setup, clock, smtp):
    client, world, app = setup
    await email_target(client, app, world, smtp, "mi@example.test")
    cid = await ingest(client, world, clock, [3.0])
    ch = await (await client.get(f"/v1/channels/{cid}", headers=world.auth)).json()
    r = await client.patch(
        f"/v1/rules/{ch['rules'][0]['id']}", json={"grace_min": 0, "clear_min": 0},
        headers=world.auth,
    )  # fmt: skip
    assert r.status == 200
    clock.advance(minutes=1)
    await ingest(client, world, clock, [9.0])  # alarm 1
    await evaluate(app)
    await send(app, client)
    clock.advance(minutes=1)
    await ingest(client, world, clock, [3.0])  # cleared
    clock.advance(minutes=1)
    await ingest(client, world, clock, [9.0])  # alarm 2, two minutes after alarm 1
    await evaluate(app)
    await send(app, client)
    assert len(await events(client, world)) == 2
    subjects = [m["Subject"] for m in smtp.to("mi@example.test")]
    assert subjects == ["[ALARM] Shop temperature", "[CLEARED] Shop temperature"]
    clock.advance(minutes=3, seconds=1)  # 5 min after the first alarm went out
    await ingest(client, world, clock, [9.0])
    await evaluate(app)
    await send(app, client)
    subjects = [m["Subject"] for m in smtp.to("mi@example.test")]
    assert subjects[-1] == "[ALARM] Shop temperature" and len(subjects) == 3


async def test_email_needs_double_opt_in_and_every_alarm_mail_can_unsubscribe(setup, clock, smtp):
    client, world, app = setup
    r = await client.post(
        "/v1/targets", json={"path": "email", "address": "new@example.test"}, headers=world.auth
    )
    assert r.status == 201 and (await r.json())["verified"] is False
    await send(app, client)
    await email_target(client, app, world, smtp, "ok@example.test")
    await ingest(client, world, clock, [9.0] * 20)
    await evaluate(app)
    await send(app, client)
    # only the confirmation went out; the alarm to the unconfirmed address is logged dropped
    assert [m["Subject"] for m in smtp.to("new@example.test")] == [
        "[OpenSense] Confirm alarm emails to this address"
    ]
    log = (await (await client.get("/v1/outbound-log", headers=world.auth)).json())["data"]
    assert any(e["kind"] == "alarm_opened" and e["status"] == "dropped" for e in log)
    mail = smtp.to("ok@example.test")[-1]
    assert mail["Subject"] == "[ALARM] Shop temperature"
    unsub = mail["List-Unsubscribe"].strip("<>")
    assert mail["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"  # RFC 8058
    r = await client.get(unsub[unsub.index("/v1/") :])  # a page with a button only
    assert r.status == 200 and "<button" in await r.text()
    r = await client.post(unsub[unsub.index("/v1/") :], data="List-Unsubscribe=One-Click")
    assert r.status == 200 and "Unsubscribed" in await r.text()
    targets = (await (await client.get("/v1/targets", headers=world.auth)).json())["data"]
    assert "ok@example.test" not in [t["address"] for t in targets]
    r = await client.get("/v1/unsubscribe", params={"token": "x" * 30})
    assert r.status == 404 and (await r.json())["error"]["code"] == "target_not_found"


async def test_an_alarm_the_site_gateway_already_raised_locally_is_not_sent_again(
    setup, clock, smtp, dsn
):
    """Issue 5: while the WAN was down the gateway woke people itself; it posts its
    local alert before it forwards the backlog. The server's engine opens the event at
    its true times from the late readings, but people are not alarmed a second time."""
    from opensense.gateway import store as gateways

    client, world, app = setup
    await email_target(client, app, world, smtp, "night@example.test")
    t0 = clock() - timedelta(hours=8)
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        gw, gw_token = await gateways.create_gateway(conn, world.account, world.site, "back", 4)
        # the server last heard the gateway before the outage (issue 11: a local alert
        # is taken only for an uplink gap the server saw)
        await conn.execute("UPDATE gateways SET last_seen_at = %s WHERE id = %s", (t0, gw["id"]))
    await ingest(client, world, clock, [3.0] * 30, start=t0)
    await evaluate(app)
    # the local alert arrives first: the gateway alerted 15 min into the excursion
    warm = t0 + timedelta(hours=2)
    alert = {
        "ref": "la-1",
        "device": "fridge01",
        "type": "temperature",
        "label": "",
        "opened_at": rfc3339(warm + timedelta(minutes=15)),
        "notified_at": rfc3339(warm + timedelta(minutes=15, seconds=2)),
        "path": "smtp",
    }
    r = await client.post(
        "/v1/gateway/local-alerts",
        headers={"Authorization": f"Bearer {gw_token}"},
        json={"alerts": [alert]},
    )
    assert r.status == 200, await r.text()
    # then the backlog: 90 warm minutes inside it
    values = [3.0] * 90 + [9.0] * 90 + [3.0] * 120
    await ingest(client, world, clock, values, start=t0 + timedelta(minutes=30))
    await evaluate(app)
    evs = [e for e in await events(client, world) if e["kind"] == "range"]
    assert len(evs) == 1 and evs[0]["started_at"] == rfc3339(warm)  # the true time
    await send(app, client)
    subjects = [m["Subject"] for m in smtp.to("night@example.test")]
    assert not any("ALARM" in s for s in subjects), subjects
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT status, payload->'local_alert'->>'path' FROM outbox"
            " WHERE event_id = %s AND kind = 'alarm_opened'",
            (evs[0]["id"],),
        )
        assert await cur.fetchall() == [("local", "smtp")]

    # a later excursion the gateway did not alert on is sent as usual (after the
    # per-channel minimum interval)
    clock.advance(minutes=30)
    await ingest(client, world, clock, [9.0] * 30, start=clock() - timedelta(minutes=29))
    await evaluate(app)
    await send(app, client)
    subjects = [m["Subject"] for m in smtp.to("night@example.test")]
    assert any(s.startswith("[ALARM]") or "notifications" in s for s in subjects), subjects


async def test_checkpoints_one_per_ten_minutes_kept_25_hours_and_a_rewind_keeps_those_before(
    setup, clock, dsn
):
    """Passes that do not rewind change a channel's stored checkpoints in place (added
    at the end, dropped past 25 h) without reading them; the stored array must be what
    writing it whole gave: one per 10 minutes of readings (at the newest reading judged
    before the pass), none older than 25 h before the newest judged reading, oldest
    first, each with the rules' state at its time. A rewind reads them whole and keeps
    those before the late reading; one pass over more than 25 h drops them all."""
    client, world, app = setup
    t0 = clock() - timedelta(hours=60)
    cid = await ingest(client, world, clock, [3.0], start=t0)
    pool = app[POOL]

    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        num, rid = await (
            await conn.execute(
                "SELECT c.num, r.id FROM channels c JOIN rules r ON r.channel_id = c.id"
                " WHERE c.id = %s AND r.kind = 'range'",
                (cid,),
            )
        ).fetchone()

        async def put(times: list[Any]) -> None:
            await conn.execute(
                "INSERT INTO measurements (channel_num, ts, value)"
                " SELECT %s, t, 3.0 FROM unnest(%s::timestamptz[]) t",
                (num, times),
            )
            await conn.execute(
                "INSERT INTO alarm_dirty (channel_num, since) VALUES (%s, %s) ON CONFLICT"
                " (channel_num) DO UPDATE SET since = least(alarm_dirty.since, excluded.since)",
                (num, min(times)),
            )
            while (await evaluator.evaluate_dirty(pool, clock(), budget_s=60)).channels:
                pass

        async def stored() -> tuple[list[Any], Any]:
            cps, last, first_at, last_at = await (
                await conn.execute(
                    "SELECT coalesce((SELECT jsonb_agg(c.cp ORDER BY c.id) FROM alarm_checkpoints c"
                    "  WHERE c.channel_num = s.channel_num), '[]'), last_ts, cp_first, cp_last"
                    " FROM alarm_state s WHERE channel_num = %s",
                    (num,),
                )
            ).fetchone()
            for at, rules, _events in cps:  # each holds the rules' state at its time
                assert rules[rid]["last_ts"] == at
            times = [datetime.fromisoformat(c[0]) for c in cps]
            # the first and last times kept beside the array (migration 0029), which the
            # passes read instead of the array: always its ends, whatever the save did
            assert (first_at, last_at) == ((times[0], times[-1]) if times else (None, None))
            return times, last

        m = timedelta(minutes=1)
        await put([t0 + 5 * m])
        for k in range(1, 162):  # 27 h: a pass per 10 minutes, readings 5 minutes apart
            await put([t0 + (10 * k) * m, t0 + (10 * k + 5) * m])
        times, last = await stored()
        assert last == t0 + 1615 * m
        made = [t0 + (10 * j + 5) * m for j in range(161)]  # at each pass's start
        assert times == [t for t in made if t >= last - timedelta(hours=25)]
        assert len(times) == 150

        # a late reading 3 h back: the rewind keeps the checkpoints before it
        late = last - timedelta(hours=3, minutes=2)
        await put([late])
        times2, last2 = await stored()
        assert last2 == last and times2 == [t for t in times if t < late]
        await put([last + 5 * m])  # the next pass adds one at the newest reading
        times3, last3 = await stored()
        assert times3 == [t for t in [*times2, last] if t >= last3 - timedelta(hours=25)]
        assert times3[-1] == last and len(times3) == len(times2)  # one in, one out

        # 26 h in one pass: the one added at its start is past 25 h too, all go
        await put([last + (10 + 10 * i) * m for i in range(156)])
        times4, last4 = await stored()
        assert last4 == last + 1560 * m and times4 == []
        assert not [e for e in await events(client, world) if e["kind"] == "range"]
