"""The third-party doors driven with the payloads the networks and devices document
(issue 15): The Things Stack v3 webhooks, ChirpStack v4 `up` events, Shelly H&T
Gen2/Gen3 URL actions. Each fixture's source is cited where it is loaded (and in
tests/fixtures/doors/README.md); each test checks what was stored, to value and unit.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from opensense.status import components, probes

from .fixtures.server import World

pytestmark = pytest.mark.db

FIXTURES = Path(__file__).parent / "fixtures" / "doors"
# The Things Stack v3, Data Formats, "Uplink Messages":
# https://www.thethingsindustries.com/docs/the-things-stack/concepts/data-formats/
# decoded_payload in the flat shape TTS's JavaScript formatter returns:
# https://www.thethingsindustries.com/docs/integrations/payload-formatters/javascript/uplink/
TTS_UPLINK = "tts_uplink.json"
# same page, "Join-accept Messages"
TTS_JOIN = "tts_join_accept.json"
# ChirpStack v4 "Event types", `up` and `join`, JSON marshaler:
# https://www.chirpstack.io/docs/chirpstack/integrations/events.html
CS_UP = "chirpstack_up.json"
CS_JOIN = "chirpstack_join.json"
TTS_EUI = "0004A30B001C0530"
CS_EUI = "0101010101010101"


def load(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / name).read_text())


def stamp(clock: Any, minutes_ago: float) -> str:
    """A network timestamp at the test clock, with the nanoseconds TTS sends."""
    t = clock.now - timedelta(minutes=minutes_ago)
    return t.strftime("%Y-%m-%dT%H:%M:%S") + ".801459963Z"


def tts(clock: Any, **decoded: Any) -> dict[str, Any]:
    """The documented TTS uplink, its times moved to now (2020 is past retention),
    its decoded payload replaced when given."""
    up = load(TTS_UPLINK)
    up["received_at"] = stamp(clock, 1)
    up["uplink_message"]["received_at"] = stamp(clock, 1)
    if decoded:
        up["uplink_message"]["decoded_payload"] = decoded
    return up


def chirpstack(clock: Any) -> dict[str, Any]:
    up = load(CS_UP)
    up["time"] = stamp(clock, 2)
    return up


async def webhook_token(client: Any, world: World) -> str:
    r = await client.post("/v1/tokens", json={"kind": "whk", "name": "lns"}, headers=world.auth)
    assert r.status == 201, await r.text()
    return str((await r.json())["token"])


async def set_eui(client: Any, world: World, local_id: str, eui: str | None) -> dict[str, Any]:
    r = await client.patch(f"/v1/devices/{local_id}", json={"dev_eui": eui}, headers=world.auth)
    assert r.status == 200, await r.text()
    return dict(await r.json())


async def readings(dsn: str, device_id: str) -> list[tuple[str, str, str, float, Any]]:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT c.kind, c.label, c.unit, m.value, m.ts FROM measurements m"
            " JOIN channels c ON c.num = m.channel_num WHERE c.device_id = %s"
            " ORDER BY c.kind, c.label, m.ts",
            (device_id,),
        )
        return [(r[0], r[1], r[2], r[3], r[4]) for r in await cur.fetchall()]


async def tray_rows(dsn: str, account: str) -> list[tuple[str, str | None, str | None]]:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT state, device_id, reason FROM unassigned_uplinks WHERE account_id = %s"
            " ORDER BY id",
            (account,),
        )
        return [(r[0], r[1], r[2]) for r in await cur.fetchall()]


def post(client: Any, whk: str, body: Any, path: str = "/v1/ingest/lorawan", **params: str) -> Any:
    # the webhook token as TTS/ChirpStack send it: an additional header
    return client.post(path, json=body, params=params, headers={"Authorization": f"Bearer {whk}"})


# --- The Things Stack v3 -----------------------------------------------------------


async def test_tts_documented_uplink_with_flat_decoded_payload_is_stored_to_value_and_unit(
    client, world: World, clock, dsn
):
    """The flat decoded_payload TTS formatters produce used to answer 200 and store
    only RSSI and SNR (the temperature was dropped, no alarm could fire)."""
    whk = await webhook_token(client, world)
    await set_eui(client, world, "fridge01", TTS_EUI.lower())  # case is ignored
    up = tts(clock)
    r = await post(client, whk, up)
    assert r.status == 200, await r.text()
    ans = await r.json()
    assert ans["accepted"] == 5 and ans["deduplicated"] == 0
    got = await readings(dsn, world.device_ids["fridge01"])
    at = clock.now - timedelta(minutes=1)  # the network's reception time, not ours
    assert [(k, lbl, u, v) for k, lbl, u, v, _ in got] == [
        ("battery", "", "%", 87.0),
        ("humidity", "", "%", 61.2),
        ("signal", "", "dBm", -35.0),
        ("snr", "", "dB", 5.2),
        ("temperature", "", "°C", 3.5),
    ]
    assert {ts.replace(microsecond=0) for *_, ts in got} == {at}


@pytest.mark.parametrize(
    "decoded, named",
    [
        ({"temperature": 1.0, "luminosity": 0.64}, "luminosity"),  # TTS's formatter example
        ({"measurments": [{"type": "temperature", "value": 3.5}]}, "measurments"),  # a typo
        ({"temprature": 3.5}, "temprature"),
    ],
)
async def test_tts_unknown_key_is_refused_naming_it_and_kept_where_the_operator_sees_it(
    client, world: World, clock, dsn, decoded, named
):
    whk = await webhook_token(client, world)
    await set_eui(client, world, "fridge01", TTS_EUI)
    r = await post(client, whk, tts(clock, **decoded))
    assert r.status == 400, await r.text()
    err = (await r.json())["error"]
    assert err["code"] == "invalid_measurement" and repr(named) in err["message"]
    assert await readings(dsn, world.device_ids["fridge01"]) == []  # not even the RSSI
    # the tray, the device's health and the status page show it
    rows = await tray_rows(dsn, world.account)
    assert [(s, d) for s, d, _ in rows] == [("refused", world.device_ids["fridge01"])]
    assert named in (rows[0][2] or "")
    r = await client.get("/v1/devices/fridge01", headers=world.auth)
    problem = (await r.json())["uplink_problem"]
    assert problem["state"] == "refused" and named in problem["reason"]
    r = await client.get("/v1/lorawan/unassigned", headers=world.auth)
    assert [x["state"] for x in (await r.json())["data"]] == ["refused"]
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        fig = await probes.lorawan(conn, clock.now)
    assert fig is not None and fig["filed_24h"]["refused"] >= 1
    _, text = components.RULES["ingest_http"]({"lorawan": fig})
    assert "refused" in text


async def test_a_null_in_the_decoded_payload_is_absent_listed_and_kept_as_partial(
    client, world: World, clock, dsn
):
    whk = await webhook_token(client, world)
    await set_eui(client, world, "fridge01", TTS_EUI)
    r = await post(client, whk, tts(clock, temperature=3.5, humidity=None))
    assert r.status == 200, await r.text()
    ans = await r.json()
    assert ans["accepted"] == 3 and ans["ignored"] == ["uplink_message.decoded_payload.humidity"]
    kinds = [k for k, *_ in await readings(dsn, world.device_ids["fridge01"])]
    assert kinds == ["signal", "snr", "temperature"]
    rows = await tray_rows(dsn, world.account)
    assert [(s, d) for s, d, _ in rows] == [("partial", world.device_ids["fridge01"])]
    assert "humidity" in (rows[0][2] or "")


async def test_tts_redelivered_uplink_is_stored_once_and_the_answer_says_so(
    client, world: World, clock, dsn
):
    whk = await webhook_token(client, world)
    await set_eui(client, world, "fridge01", TTS_EUI)
    up = tts(clock)
    first = await (await post(client, whk, up)).json()
    clock.advance(minutes=3)  # the network retries later; our clock moved
    r = await post(client, whk, up)
    assert r.status == 200
    again = await r.json()
    assert first["accepted"] == 5
    assert again["accepted"] == 0 and again["deduplicated"] == 5 and again["duplicate"] is True
    assert len(await readings(dsn, world.device_ids["fridge01"])) == 5
    # without a session key: the application server's correlation id is the identity,
    # even with no reception time in the body (our clock would have differed)
    up2 = tts(clock, temperature=4.0)
    del up2["uplink_message"]["session_key_id"], up2["uplink_message"]["received_at"]
    del up2["received_at"]
    up2["correlation_ids"][0] = "as:up:01HZZZZZZZZZZZZZZZZZZZZZZZ"
    assert (await (await post(client, whk, up2)).json())["accepted"] == 3
    clock.advance(seconds=30)
    dup = await (await post(client, whk, up2)).json()
    assert dup["duplicate"] is True and dup["accepted"] == 0
    assert len(await readings(dsn, world.device_ids["fridge01"])) == 8


async def test_simulated_uplink_answers_200_stores_no_reading_and_is_kept_as_a_test(
    client, world: World, clock, dsn
):
    whk = await webhook_token(client, world)
    await set_eui(client, world, "fridge01", TTS_EUI)
    up = tts(clock)
    up["simulated"] = True  # "Simulate uplink" in the TTS console
    r = await post(client, whk, up)
    assert r.status == 200, await r.text()
    ans = await r.json()
    assert ans["simulated"] is True and ans["accepted"] == 0
    assert await readings(dsn, world.device_ids["fridge01"]) == []
    r = await client.get("/v1/lorawan/unassigned?state=simulated", headers=world.auth)
    rows = (await r.json())["data"]
    assert [(x["state"], x["device_id"]) for x in rows] == [
        ("simulated", world.device_ids["fridge01"])
    ]
    # a simulated uplink is never assignable into readings
    r = await client.post(
        f"/v1/lorawan/unassigned/{rows[0]['id']}/assign",
        json={"device_id": "fridge01"},
        headers=world.auth,
    )
    assert r.status == 409 and (await r.json())["error"]["code"] == "conflict"
    assert await readings(dsn, world.device_ids["fridge01"]) == []


async def test_tts_path_suffix_and_non_uplink_messages_are_answered_2xx(
    client, world: World, clock, dsn
):
    whk = await webhook_token(client, world)
    await set_eui(client, world, "fridge01", TTS_EUI)
    # a webhook with per-message paths: base URL + "/uplink", "/join", ...
    r = await post(client, whk, tts(clock), "/v1/ingest/lorawan/uplink")
    assert r.status == 200 and (await r.json())["accepted"] == 5
    r = await post(client, whk, load(TTS_JOIN), "/v1/ingest/lorawan/join")
    assert r.status == 200, await r.text()
    assert (await r.json())["ignored_event"] == "join_accept"
    r = await post(client, whk, load(TTS_JOIN))
    assert r.status == 200
    assert len(await readings(dsn, world.device_ids["fridge01"])) == 5
    assert await tray_rows(dsn, world.account) == []


# --- ChirpStack v4 -----------------------------------------------------------------


async def test_chirpstack_v4_up_event_is_stored_deduplicated_and_other_events_ignored(
    client, world: World, clock, dsn
):
    whk = await webhook_token(client, world)
    await set_eui(client, world, "fridge02", CS_EUI)
    up = chirpstack(clock)
    # ChirpStack's HTTP integration POSTs to the URL with ?event=up
    r = await post(client, whk, up, event="up")
    assert r.status == 200, await r.text()
    assert (await r.json())["accepted"] == 5
    got = await readings(dsn, world.device_ids["fridge02"])
    assert [(k, lbl, u, v) for k, lbl, u, v, _ in got] == [
        ("battery", "", "%", 92.0),
        ("signal", "", "dBm", -36.0),
        ("snr", "", "dB", 10.5),
        ("temperature", "", "°C", -18.4),
        ("temperature", "probe", "°C", -21.25),  # the <kind>_<label> rule
    ]
    assert {ts.replace(microsecond=0) for *_, ts in got} == {clock.now - timedelta(minutes=2)}
    again = await (await post(client, whk, up, event="up")).json()
    assert again["duplicate"] is True and again["accepted"] == 0
    for event, body in (("join", load(CS_JOIN)), ("status", {"deviceInfo": {}}), ("ack", {})):
        r = await post(client, whk, body, event=event)
        assert r.status == 200, (event, await r.text())
        assert (await r.json())["ignored_event"] == event
    assert len(await readings(dsn, world.device_ids["fridge02"])) == 5


# --- the tray ----------------------------------------------------------------------


async def test_unknown_dev_eui_assigned_later_yields_its_readings_exactly_once(
    client, world: World, clock, dsn
):
    whk = await webhook_token(client, world)
    up = tts(clock)
    for _ in range(2):  # delivered, then re-delivered
        r = await post(client, whk, up)
        assert r.status == 202 and (await r.json())["unassigned"] is True
    later = tts(clock, temperature=3.9)
    later["uplink_message"]["f_cnt"] = 26
    later["uplink_message"]["received_at"] = stamp(clock, 0.5)
    assert (await post(client, whk, later)).status == 202
    r = await client.get("/v1/lorawan/unassigned", headers=world.auth)
    tray = (await r.json())["data"]
    assert [(x["state"], x["dev_eui"]) for x in tray] == [("unassigned", TTS_EUI)] * 2
    r = await client.post(
        f"/v1/lorawan/unassigned/{tray[0]['id']}/assign",
        json={"device_id": "fridge02"},
        headers=world.auth,
    )
    assert r.status == 200, await r.text()
    ans = await r.json()
    assert ans["dev_eui"] == TTS_EUI and ans["accepted"] == 5 + 3 and ans["remaining"] == 0
    assert [u["state"] for u in ans["uplinks"]] == ["assigned", "assigned"]
    dev = world.device_ids["fridge02"]
    got = await readings(dsn, dev)
    temps = [(v, ts.replace(microsecond=0)) for k, _, _, v, ts in got if k == "temperature"]
    assert temps == [
        (3.5, clock.now - timedelta(minutes=1)),
        (3.9, clock.now - timedelta(seconds=30)),
    ]
    # assigning again, or the network re-delivering now: still once
    for uid in (tray[0]["id"], tray[1]["id"]):
        r = await client.post(
            f"/v1/lorawan/unassigned/{uid}/assign",
            json={"device_id": "fridge02"},
            headers=world.auth,
        )
        assert r.status == 409 and "assigned already" in (await r.json())["error"]["message"]
    r = await post(client, whk, up)
    assert r.status == 200 and (await r.json())["duplicate"] is True
    assert len(await readings(dsn, dev)) == 8
    r = await client.get("/v1/devices/fridge02", headers=world.auth)
    assert (await r.json())["dev_eui"] == TTS_EUI
    assert (await (await client.get("/v1/lorawan/unassigned", headers=world.auth)).json())[
        "data"
    ] == []
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT actor, data FROM audit_log WHERE account_id = %s AND action = 'lorawan.assign'",
            (world.account,),
        )
        rows = await cur.fetchall()
    assert len(rows) == 1 and rows[0][0].startswith("tok_") and rows[0][1]["accepted"] == 8


async def test_an_uplink_assigned_twice_over_a_dev_eui_change_is_still_stored_once(
    client, world: World, clock, dsn
):
    """Assigned, the DevEUI cleared, the network re-delivers, assigned again: the
    second replay finds the uplink's identity claimed and stores nothing."""
    whk = await webhook_token(client, world)
    up = tts(clock)
    assert (await post(client, whk, up)).status == 202
    uid = (await (await client.get("/v1/lorawan/unassigned", headers=world.auth)).json())["data"][
        0
    ]["id"]
    r = await client.post(
        f"/v1/lorawan/unassigned/{uid}/assign", json={"device_id": "fridge01"}, headers=world.auth
    )
    assert (await r.json())["accepted"] == 5
    await set_eui(client, world, "fridge01", None)
    assert (await post(client, whk, up)).status == 202
    uid2 = (await (await client.get("/v1/lorawan/unassigned", headers=world.auth)).json())["data"][
        0
    ]["id"]
    r = await client.post(
        f"/v1/lorawan/unassigned/{uid2}/assign", json={"device_id": "fridge01"}, headers=world.auth
    )
    assert r.status == 200, await r.text()
    ans = await r.json()
    assert ans["accepted"] == 0 and ans["uplinks"][0]["deduplicated"] == 5
    assert len(await readings(dsn, world.device_ids["fridge01"])) == 5


async def test_assign_refuses_a_device_with_another_dev_eui_and_discard_is_audited(
    client, world: World, clock, dsn
):
    whk = await webhook_token(client, world)
    await set_eui(client, world, "fridge01", "70B3D57ED0000001")
    assert (await post(client, whk, tts(clock))).status == 202
    tray = (await (await client.get("/v1/lorawan/unassigned", headers=world.auth)).json())["data"]
    uid = tray[0]["id"]
    r = await client.post(
        f"/v1/lorawan/unassigned/{uid}/assign", json={"device_id": "fridge01"}, headers=world.auth
    )
    assert r.status == 409 and "70B3D57ED0000001" in (await r.json())["error"]["message"]
    assert await readings(dsn, world.device_ids["fridge01"]) == []
    r = await client.delete(f"/v1/lorawan/unassigned/{uid}", headers=world.auth)
    assert r.status == 204
    r = await client.delete(f"/v1/lorawan/unassigned/{uid}", headers=world.auth)
    assert r.status == 409
    r = await client.get("/v1/lorawan/unassigned?state=discarded", headers=world.auth)
    assert [x["id"] for x in (await r.json())["data"]] == [uid]
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM audit_log WHERE account_id = %s AND action = 'lorawan.discard'",
            (world.account,),
        )
        assert await cur.fetchone() == (1,)


async def test_another_accounts_tray_row_is_not_found(client, world: World, clock, dsn, config):
    from .fixtures.server import make_world

    other = await make_world(dsn, config, ("x1",))
    whk = await webhook_token(client, world)
    assert (await post(client, whk, tts(clock))).status == 202
    uid = (await (await client.get("/v1/lorawan/unassigned", headers=world.auth)).json())["data"][
        0
    ]["id"]
    for method, path, body in (
        ("POST", f"/v1/lorawan/unassigned/{uid}/assign", {"device_id": "x1"}),
        ("DELETE", f"/v1/lorawan/unassigned/{uid}", None),
    ):
        r = await client.request(method, path, json=body, headers=other.auth)
        assert r.status == 404 and (await r.json())["error"]["code"] == "uplink_not_found"
    r = await client.get("/v1/lorawan/unassigned", headers=other.auth)
    assert (await r.json())["data"] == []
    assert [s for s, *_ in await tray_rows(dsn, world.account)] == ["unassigned"]


async def test_assign_replays_a_bounded_number_and_says_how_many_remain(
    client, world: World, clock, dsn, monkeypatch
):
    from opensense.ingest import tray

    monkeypatch.setattr(tray, "MAX_REPLAY", 1)
    whk = await webhook_token(client, world)
    for i in range(2):
        up = tts(clock, temperature=3.0 + i)
        up["uplink_message"]["f_cnt"] = i
        up["uplink_message"]["received_at"] = stamp(clock, 2 - i)
        assert (await post(client, whk, up)).status == 202
    rows = (await (await client.get("/v1/lorawan/unassigned", headers=world.auth)).json())["data"]
    r = await client.post(
        f"/v1/lorawan/unassigned/{rows[0]['id']}/assign",
        json={"device_id": "fridge01"},
        headers=world.auth,
    )
    ans = await r.json()
    assert ans["remaining"] == 1 and [u["id"] for u in ans["uplinks"]] == [rows[0]["id"]]
    r = await client.post(
        f"/v1/lorawan/unassigned/{rows[1]['id']}/assign",
        json={"device_id": "fridge01"},
        headers=world.auth,
    )
    assert (await r.json())["remaining"] == 0
    temps = [
        v
        for k, _, _, v, _ in await readings(dsn, world.device_ids["fridge01"])
        if k == "temperature"
    ]
    assert temps == [3.0, 4.0]


async def test_a_tray_flood_costs_only_its_senders_account(
    client, world: World, clock, dsn, config
):
    """Filing into the tray is counted per account: over the allowance an unknown
    DevEUI is 429 and a refusal is answered but not filed; another account files on."""
    from .fixtures.server import make_world

    whk = await webhook_token(client, world)
    limit = config.ingest_rate_per_min
    for i in range(limit):
        up = tts(clock)
        up["uplink_message"]["f_cnt"] = i
        assert (await post(client, whk, up)).status == 202
    up = tts(clock)
    up["uplink_message"]["f_cnt"] = limit
    r = await post(client, whk, up)
    assert r.status == 429 and (await r.json())["error"]["code"] == "rate_limited"
    r = await post(client, whk, tts(clock, luminosity=1))
    assert r.status == 400  # still answered, naming the key
    assert len(await tray_rows(dsn, world.account)) == limit
    other = await make_world(dsn, config, ("y1",))
    owhk = await webhook_token(client, other)
    assert (await post(client, owhk, tts(clock))).status == 202
    assert len(await tray_rows(dsn, other.account)) == 1


async def test_dev_eui_is_set_changed_and_cleared_by_patch_and_audited(
    client, world: World, clock, dsn
):
    d = await set_eui(client, world, "fridge01", "70b3d57ed0000001")
    assert d["dev_eui"] == "70B3D57ED0000001"
    r = await client.patch(
        "/v1/devices/fridge02", json={"dev_eui": "70B3D57ED0000001"}, headers=world.auth
    )
    assert r.status == 409 and (await r.json())["error"]["code"] == "conflict"
    r = await client.patch("/v1/devices/fridge02", json={"dev_eui": "xyz"}, headers=world.auth)
    assert r.status == 400
    await set_eui(client, world, "fridge01", TTS_EUI)
    whk = await webhook_token(client, world)
    assert (await post(client, whk, tts(clock))).status == 200  # matches the new one
    d = await set_eui(client, world, "fridge01", None)
    assert d["dev_eui"] is None
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT data FROM audit_log WHERE account_id = %s AND action = 'device.update'"
            " ORDER BY seq",
            (world.account,),
        )
        changes = [r[0]["dev_eui"] for r in await cur.fetchall()]
    assert changes == [
        {"from": None, "to": "70B3D57ED0000001"},
        {"from": "70B3D57ED0000001", "to": TTS_EUI},
        {"from": TTS_EUI, "to": None},
    ]


def _cli(dsn: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OPENSENSE_DATABASE_URL": dsn, "OPENSENSE_STATE_DIR": str(tmp_path)}
    return subprocess.run(
        [sys.executable, "-m", "opensense.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


async def test_cli_lists_assigns_and_discards_the_tray_and_sets_a_dev_eui(
    client, world: World, clock, dsn, tmp_path
):
    whk = await webhook_token(client, world)
    assert (await post(client, whk, tts(clock))).status == 202
    other = tts(clock)
    other["end_device_ids"]["dev_eui"] = CS_EUI
    assert (await post(client, whk, other)).status == 202
    acc = ["--account", world.account]
    r = _cli(dsn, tmp_path, "lorawan", "unassigned", *acc)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [x["dev_eui"] for x in rows] == [TTS_EUI, CS_EUI]
    r = _cli(dsn, tmp_path, "lorawan", "assign", str(rows[0]["id"]), "--device", "fridge01", *acc)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["accepted"] == 5
    r = _cli(dsn, tmp_path, "lorawan", "assign", str(rows[0]["id"]), "--device", "fridge01", *acc)
    assert r.returncode == 1 and "conflict" in r.stderr
    assert len(await readings(dsn, world.device_ids["fridge01"])) == 5
    r = _cli(dsn, tmp_path, "lorawan", "discard", str(rows[1]["id"]), *acc)
    assert r.returncode == 0 and json.loads(r.stdout)["state"] == "discarded"
    r = _cli(dsn, tmp_path, "device", "set-dev-eui", "fridge02", "--dev-eui", CS_EUI, *acc)
    assert r.returncode == 0 and json.loads(r.stdout)["dev_eui"] == CS_EUI
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT action, actor FROM audit_log WHERE account_id = %s AND action IN"
            " ('lorawan.assign', 'lorawan.discard', 'device.update') ORDER BY seq",
            (world.account,),
        )
        acts = [(a, b.split(":")[0]) for a, b in await cur.fetchall()]
    assert acts == [("lorawan.assign", "cli"), ("lorawan.discard", "cli"), ("device.update", "cli")]


# --- Shelly H&T Gen2/Gen3 URL actions ------------------------------------------------
# URL token substitution (`${ev.tC}`, `${ev.rh}`) as the Shelly Gen2+ Webhook service
# documents it: https://shelly-api-docs.shelly.cloud/gen2/ComponentsAndServices/Webhook
# The H&T Gen3 (model S3SN-0U12A): https://shelly-api-docs.shelly.cloud/gen2/Devices/Gen3/ShellyHTG3


async def shelly(client: Any, world: World, query: str) -> Any:
    tok = world.devices["fridge01"]
    return await client.get(f"/v1/ingest/shelly?token={tok}&{query}")


async def test_shelly_gen3_battery_is_volts_by_model_or_parameter(client, world: World, dsn):
    r = await client.patch("/v1/devices/fridge01", json={"model": "S3SN-0U12A"}, headers=world.auth)
    assert r.status == 200
    r = await shelly(client, world, "temp=4.25&hum=61.5&battery=3.92")
    assert r.status == 200, await r.text()
    got = {(k, u): v for k, _, u, v, _ in await readings(dsn, world.device_ids["fridge01"])}
    assert got == {("temperature", "°C"): 4.25, ("humidity", "%"): 61.5, ("battery", "V"): 3.92}
    # another device, no model: the explicit parameter says volts (%25 is percent)
    tok = world.devices["fridge02"]
    r = await client.get(f"/v1/ingest/shelly?token={tok}&temp=5&battery=3.1&battery_unit=V")
    assert r.status == 200
    r = await client.get(f"/v1/ingest/shelly?token={tok}&temp=5&battery=3.1&battery_unit=mV")
    assert r.status == 400


async def test_shelly_battery_channel_in_the_other_unit_never_costs_the_temperature(
    client, world: World, dsn, clock
):
    # a Gen3 that reported before its model was set: its battery channel holds %
    assert (await shelly(client, world, "temp=4&battery=3.92")).status == 200
    await client.patch("/v1/devices/fridge01", json={"model": "S3SN-0U12A"}, headers=world.auth)
    clock.advance(minutes=5)
    r = await shelly(client, world, "temp=4.5&battery=3.91")
    assert r.status == 200, await r.text()
    got = await readings(dsn, world.device_ids["fridge01"])
    assert [(k, lbl, u, v) for k, lbl, u, v, _ in got] == [
        ("battery", "", "%", 3.92),  # the old channel keeps its history as it was
        ("battery", "V", "V", 3.91),  # the volts from now on, in a channel of their own
        ("temperature", "", "°C", 4.0),
        ("temperature", "", "°C", 4.5),
    ]


@pytest.mark.parametrize(
    "query, ignored",
    [
        ("temp=4.5&hum=null&battery=null", ["hum", "battery"]),  # Gen2/Gen3 `null`
        ("temp=4.5&hum=${ev.rh}", ["hum"]),  # left unsubstituted
        ("temp=4.5&hum=", ["hum"]),  # empty
        ("hum=55&temp=null&ts=null", ["ts", "temp"]),
    ],
)
async def test_shelly_values_without_a_value_are_absent_and_listed(
    client, world: World, dsn, query, ignored
):
    r = await shelly(client, world, query.replace("${", "%24%7B").replace("}", "%7D"))
    assert r.status == 200, await r.text()
    ans = await r.json()
    assert sorted(ans["ignored"]) == sorted(ignored)
    got = await readings(dsn, world.device_ids["fridge01"])
    assert len(got) == 1 and got[0][0] in ("temperature", "humidity")


@pytest.mark.parametrize(
    "query, code",
    [
        ("temp=999", "out_of_range"),
        ("temp=nan", "invalid_measurement"),
        ("hum=999&temp=4", "out_of_range"),
        ("temp=null&hum=null", "invalid_measurement"),  # nothing left to store
    ],
)
async def test_shelly_999_and_nan_stay_refused(client, world: World, dsn, query, code):
    r = await shelly(client, world, query)
    assert r.status in (400, 422) and (await r.json())["error"]["code"] == code
    assert await readings(dsn, world.device_ids["fridge01"]) == []


def test_tts_payload_fixture_is_the_documented_shape() -> None:
    """The fixture keeps the documented message's fields (a guard against trimming it
    down to what the door reads)."""
    up = load(TTS_UPLINK)
    assert {"end_device_ids", "correlation_ids", "received_at", "uplink_message"} <= set(up)
    assert {"session_key_id", "f_cnt", "frm_payload", "rx_metadata", "settings"} <= set(
        up["uplink_message"]
    )
    cs = load(CS_UP)
    assert {"deduplicationId", "deviceInfo", "fCnt", "object", "rxInfo", "txInfo"} <= set(cs)
    _ = copy.deepcopy(cs)
