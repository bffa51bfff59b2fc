"""The embedded broker (amqtt in the server process): TLS with certificate
verification, per-device credentials, the device ACL, and a reading stored before
its PUBACK."""

from __future__ import annotations

import asyncio
import json
import os
from datetime import timedelta
from typing import Any

import psycopg
import pytest

from opensense.api.jsonutil import rfc3339
from opensense.api.keys import MQTT, WRITER
from opensense_contract import topics

from .fixtures.processes import free_port
from .fixtures.server import World, make_world, test_config
from .mqtt_node import Node

pytestmark = pytest.mark.db


@pytest.fixture
async def mqtt_app(fw_app: Any) -> Any:
    """The server with its embedded TLS broker (tests/fixtures/firmware.py's fw_app)."""
    fw_app.ca = str(fw_app.tls.ca_cert)
    return fw_app


async def node(app: Any, world: World, local_id: str = "fridge01", **kw: Any) -> Node:
    n = Node(
        "localhost",
        app.cfg.mqtt_port,
        world.device_ids[local_id],
        world.devices[local_id],
        ca_file=app.ca,
        **kw,
    )
    return n


def reading(value: float = 4.2, **extra: Any) -> bytes:
    return json.dumps({"measurements": [{"type": "temperature", "value": value, **extra}]}).encode()


async def stored(dsn: str, world: World) -> list[float]:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT m.value FROM measurements m JOIN channels c ON c.num = m.channel_num"
            " WHERE c.account_id = %s ORDER BY m.ts",
            (world.account,),
        )
        return [r[0] for r in await cur.fetchall()]


async def test_publish_over_tls_is_stored_before_puback(mqtt_app, dsn, clock):
    world = await make_world(dsn, mqtt_app.cfg)
    n = await node(mqtt_app, world)
    assert str(await asyncio.to_thread(n.connect)) == "Success"
    t = topics.topic(world.account, "fridge01")
    assert await asyncio.to_thread(n.publish, t, reading(4.2))
    # the PUBACK came after the commit: the row is there now, no waiting
    assert await stored(dsn, world) == [4.2]
    r = await mqtt_app.get("/v1/channels", headers=world.auth)
    cid = (await r.json())["data"][0]["id"]
    r = await mqtt_app.get(
        f"/v1/channels/{cid}/measurements",
        headers=world.auth,
        params={"to": rfc3339(clock.now + timedelta(seconds=1))},
    )
    assert [v for _, v in (await r.json())["data"]] == [4.2]
    # a resend (lost PUBACK) is a duplicate, not a second row: the store says it skipped
    # exactly that one reading (the primary key on (channel, ts) alone would keep the
    # rows at one whatever the ingest did, so only the count can fail)
    counters = mqtt_app.app[MQTT].ingest.counters
    assert (counters.stored, counters.deduplicated) == (1, 0)
    assert await asyncio.to_thread(n.publish, t, reading(4.2, ts=(await r.json())["data"][0][0]))
    assert (counters.stored, counters.deduplicated) == (1, 1)
    assert await stored(dsn, world) == [4.2]
    await asyncio.to_thread(n.close)


async def test_a_new_nodes_session_takes_the_batch_writer_once_its_channels_exist(
    mqtt_app, dsn, clock
):
    """The session's device is read at CONNECT, before a brand-new node has channels:
    its first publish creates them (a transaction of its own), and the session then
    knows them, so the next publishes ride the group-commit writer; so does a
    publish after a further new channel."""
    world = await make_world(dsn, mqtt_app.cfg)
    writer = mqtt_app.app[WRITER]
    n = await node(mqtt_app, world)
    assert str(await asyncio.to_thread(n.connect)) == "Success"
    t = topics.topic(world.account, "fridge01")

    def msg(kind: str, value: float) -> bytes:
        clock.advance(seconds=1)
        return json.dumps({"measurements": [{"type": kind, "value": value}]}).encode()

    before = writer.requests
    assert await asyncio.to_thread(n.publish, t, msg("temperature", 4.0))
    assert writer.requests == before  # created its channel: not the writer
    assert await asyncio.to_thread(n.publish, t, msg("temperature", 4.1))
    assert writer.requests == before + 1
    assert await asyncio.to_thread(n.publish, t, msg("humidity", 50.0))
    assert writer.requests == before + 1
    assert await asyncio.to_thread(n.publish, t, msg("humidity", 51.0))
    assert await asyncio.to_thread(n.publish, t, msg("temperature", 4.2))
    assert writer.requests == before + 3
    assert sorted(await stored(dsn, world)) == [4.0, 4.1, 4.2, 50.0, 51.0]
    await asyncio.to_thread(n.close)


async def test_a_calibration_change_reaches_the_live_session_at_once(mqtt_app, dsn, clock):
    """A session keeps its device's channels (with their offsets) from CONNECT: a
    PATCH of the offset makes the next reading on the same session get the new one,
    in this process at once and in the others by NOTIFY (here: a channel change
    announced for the device alone is heard by the listener too)."""
    world = await make_world(dsn, mqtt_app.cfg)
    n = await node(mqtt_app, world)
    assert str(await asyncio.to_thread(n.connect)) == "Success"
    t = topics.topic(world.account, "fridge01")

    def msg(value: float) -> bytes:
        clock.advance(seconds=1)
        return reading(value)

    assert await asyncio.to_thread(n.publish, t, msg(4.0))  # creates the channel
    assert await asyncio.to_thread(n.publish, t, msg(4.0))  # the session knows it now
    r = await mqtt_app.get("/v1/channels", headers=world.auth)
    cid = (await r.json())["data"][0]["id"]
    r = await mqtt_app.patch(f"/v1/channels/{cid}", headers=world.auth, json={"offset": 1.5})
    assert r.status == 200, await r.text()
    assert await asyncio.to_thread(n.publish, t, msg(4.0))
    assert await stored(dsn, world) == [4.0, 4.0, 5.5]
    # another process's PATCH reaches this one by NOTIFY only
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute('UPDATE channels SET "offset" = -0.5 WHERE id = %s', (cid,))
        await conn.execute(
            "SELECT pg_notify('opensense_channels_changed', %s)", (world.device_ids["fridge01"],)
        )
    for _ in range(100):
        assert await asyncio.to_thread(n.publish, t, msg(4.0))
        if (await stored(dsn, world))[-1] == 3.5:
            break
        await asyncio.sleep(0.05)
    assert (await stored(dsn, world))[-1] == 3.5
    await asyncio.to_thread(n.close)


async def test_a_moved_device_s_new_channel_gets_its_new_site_s_default_rule(mqtt_app, dsn, clock):
    """A session keeps its device from CONNECT, its site's vertical with it: a move
    reads it again (in this process before the answer, in the others by the NOTIFY
    opensense_channels_changed, which drops the external consumer's cache too), so a
    probe first heard after the move gets the new site's default rule."""
    world = await make_world(dsn, mqtt_app.cfg)  # a chilled storage site
    n = await node(mqtt_app, world)
    assert str(await asyncio.to_thread(n.connect)) == "Success"
    t = topics.topic(world.account, "fridge01")
    clock.advance(seconds=1)
    assert await asyncio.to_thread(n.publish, t, reading(4.0, label="a"))
    r = await mqtt_app.post(
        "/v1/sites", headers=world.auth, json={"name": "Cold room", "vertical": "frozen"}
    )
    assert r.status == 201, await r.text()
    frozen = (await r.json())["id"]
    dev = world.device_ids["fridge01"]
    r = await mqtt_app.post(f"/v1/devices/{dev}/move", headers=world.auth, json={"site_id": frozen})
    assert r.status == 200, await r.text()  # (this process's sessions: before the answer)
    clock.advance(seconds=1)
    assert await asyncio.to_thread(n.publish, t, reading(-20.0, label="b"))
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT c.label, r.params FROM rules r JOIN channels c ON c.id = r.channel_id"
            " WHERE c.device_id = %s ORDER BY c.label",
            (dev,),
        )
        rules = {label: params for label, params in await cur.fetchall()}
    assert rules["a"] == {"ok_min": -2.0, "ok_max": 5.0}  # made on the chilled site
    assert rules["b"] == {"ok_min": -24.0, "ok_max": -18.0}  # the frozen site's
    await asyncio.to_thread(n.close)


async def test_wrong_token_plain_tcp_and_another_devices_topic_are_refused(mqtt_app, dsn, clock):
    world = await make_world(dsn, mqtt_app.cfg, ("fridge01", "fridge02"))
    bad = Node(
        "localhost",
        mqtt_app.cfg.mqtt_port,
        world.device_ids["fridge01"],
        world.devices["fridge02"],
        ca_file=mqtt_app.ca,
    )
    assert str(await asyncio.to_thread(bad.connect)) != "Success"
    await asyncio.to_thread(bad.close)

    plain = await node(mqtt_app, world, tls=False)
    with pytest.raises(OSError):
        rc = await asyncio.to_thread(plain.connect, 3)
        if rc is None:  # no CONNACK over plain TCP: the TLS listener never answered
            raise OSError("no CONNACK over plain TCP")
    await asyncio.to_thread(plain.close)

    n = await node(mqtt_app, world)
    assert str(await asyncio.to_thread(n.connect)) == "Success"
    other = topics.topic(world.account, "fridge02")
    await asyncio.to_thread(n.publish, other, reading(9.9))
    granted = await asyncio.to_thread(n.subscribe, topics.topic(world.account, "fridge02", "cmd/#"))
    assert granted and granted[0].is_failure
    mine = await asyncio.to_thread(n.subscribe, topics.topic(world.account, "fridge01", "cmd/#"))
    assert mine and not mine[0].is_failure
    assert await stored(dsn, world) == []  # the foreign publish was dropped
    await asyncio.to_thread(n.close)


async def test_rejections_answer_on_err_and_qos0_is_dropped_and_counted(mqtt_app, dsn, clock):
    world = await make_world(dsn, mqtt_app.cfg)
    n = await node(mqtt_app, world)
    await asyncio.to_thread(n.connect)
    await asyncio.to_thread(n.subscribe, topics.topic(world.account, "fridge01", "err"))
    t = topics.topic(world.account, "fridge01")
    assert await asyncio.to_thread(
        n.publish, t, json.dumps({"measurements": [{"type": "radiation", "value": 1}]}).encode()
    )
    msg = await asyncio.to_thread(n.next_message)
    assert msg is not None
    err = json.loads(msg[1])["error"]
    assert err["code"] == "unknown_kind" and "radiation" in err["message"]
    await asyncio.to_thread(n.publish, t, reading(3.0), 0)
    msg = await asyncio.to_thread(n.next_message)
    assert msg is not None and "QoS 0" in json.loads(msg[1])["error"]["message"]
    assert await stored(dsn, world) == []
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT qos0_dropped FROM devices WHERE id = %s", (world.device_ids["fridge01"],)
        )
        assert (await cur.fetchone())[0] == 1
    await asyncio.to_thread(n.close)


async def test_lwt_info_and_commands(mqtt_app, dsn, clock):
    world = await make_world(dsn, mqtt_app.cfg)
    lwt = topics.topic(world.account, "fridge01", "lwt")
    n = await node(mqtt_app, world, will=(lwt, b"offline"))
    await asyncio.to_thread(n.connect)
    assert await asyncio.to_thread(n.publish, lwt, b"online")
    info = {"fw_version": "0.3.1", "model": "diy_esp32", "reset_cause": "power_on"}
    assert await asyncio.to_thread(
        n.publish, topics.topic(world.account, "fridge01", "info"), json.dumps(info).encode()
    )
    dev = await (
        await mqtt_app.get(f"/v1/devices/{world.device_ids['fridge01']}", headers=world.auth)
    ).json()
    assert dev["fw_version"] == "0.3.1"
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT connected, info FROM devices WHERE id = %s", (world.device_ids["fridge01"],)
        )
        connected, stored_info = await cur.fetchone()
    assert connected is True and stored_info["reset_cause"] == "power_on"

    await asyncio.to_thread(n.subscribe, topics.topic(world.account, "fridge01", "cmd/#"))
    r = await mqtt_app.post(
        f"/v1/devices/{world.device_ids['fridge01']}/identify", headers=world.auth
    )
    assert r.status == 202
    msg = await asyncio.to_thread(n.next_message)
    assert msg is not None and msg[0].endswith("/cmd/identify")
    r = await mqtt_app.patch(
        f"/v1/devices/{world.device_ids['fridge01']}", json={"cadence_s": 30}, headers=world.auth
    )
    assert r.status == 200
    msg = await asyncio.to_thread(n.next_message)
    assert msg == (topics.topic(world.account, "fridge01", "cmd/cadence"), b"30")

    # the connection drops without DISCONNECT: the will marks the device offline
    n.client._sock.close()  # type: ignore[union-attr]
    for _ in range(50):
        async with await psycopg.AsyncConnection.connect(dsn) as conn:
            cur = await conn.execute(
                "SELECT connected FROM devices WHERE id = %s", (world.device_ids["fridge01"],)
            )
            if (await cur.fetchone())[0] is False:
                break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("the device was not marked offline")
    n.client.loop_stop()


async def test_a_cadence_change_that_never_reached_the_node_is_sent_again_on_its_info(
    mqtt_app, dsn, clock
):
    """Desired against reported: a node's info (sent on every connect) reports its
    cadence; one other than the device's brings the retained cmd/cadence again, as
    when a PATCH's command was lost (the embedded broker restarted and kept retained
    messages in memory only, it was down, or a relay was lost in a leader's restart)."""
    world = await make_world(dsn, mqtt_app.cfg)
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        # the change is committed; its command never went out
        await conn.execute(
            "UPDATE devices SET cadence_s = 120 WHERE id = %s", (world.device_ids["fridge01"],)
        )
    n = await node(mqtt_app, world)
    await asyncio.to_thread(n.connect)
    await asyncio.to_thread(n.subscribe, topics.topic(world.account, "fridge01", "cmd/#"))
    info = topics.topic(world.account, "fridge01", "info")
    assert await asyncio.to_thread(n.publish, info, json.dumps({"cadence": 60}).encode())
    msg = await asyncio.to_thread(n.next_message)
    assert msg == (topics.topic(world.account, "fridge01", "cmd/cadence"), b"120")
    # a node on the device's cadence, or one whose info does not say, gets nothing;
    # one repeating its stale info gets the command once a minute, not once each
    for said in ({"cadence": 120}, {"fw_version": "0.3.1"}, {"cadence": True}):
        assert await asyncio.to_thread(n.publish, info, json.dumps(said).encode())
    for _ in range(20):
        assert await asyncio.to_thread(n.publish, info, json.dumps({"cadence": 60}).encode())
    assert await asyncio.to_thread(n.next_message, 1.0) is None
    await asyncio.to_thread(n.close)


async def test_a_silent_connection_is_cut_after_its_keep_alive(mqtt_app, dsn, clock):
    """MQTT 3.1.1 §3.1.2.10: 1.5 x keep alive without a packet and the broker closes the
    connection, publishing the will (the broker's own timer, not amqtt's per-packet
    wait_for). A node that keeps pinging stays connected; the measurements each sent
    before are stored and acknowledged (the PUBACK-only path)."""
    world = await make_world(dsn, mqtt_app.cfg, ("fridge01", "fridge02"))
    silent, talker = "fridge01", "fridge02"
    nodes = {}
    for local in (silent, talker):
        lwt = topics.topic(world.account, local, "lwt")
        n = await node(mqtt_app, world, local, will=(lwt, b"offline"))
        assert str(await asyncio.to_thread(n.connect, 10, 2)) == "Success"
        assert await asyncio.to_thread(n.publish, lwt, b"online")
        assert await asyncio.to_thread(n.publish, topics.topic(world.account, local), reading(3.0))
        nodes[local] = n

    async def connected(local: str) -> bool:
        async with await psycopg.AsyncConnection.connect(dsn) as conn:
            cur = await conn.execute(
                "SELECT connected FROM devices WHERE id = %s", (world.device_ids[local],)
            )
            return bool((await cur.fetchone())[0])

    quiet = asyncio.get_running_loop().time()  # (its last packet: the PUBLISH above)
    # the socket stays open and nothing is sent on it (loop_stop may take a second)
    await asyncio.to_thread(nodes[silent].client.loop_stop)
    while await connected(silent):
        assert asyncio.get_running_loop().time() - quiet < 10, "never cut"
        await asyncio.sleep(0.1)
    waited = asyncio.get_running_loop().time() - quiet
    assert waited >= 2.5, f"cut after {waited:.1f} s, before 1.5 x its keep alive of 2 s"
    assert await connected(talker)  # its PINGREQs count as packets
    assert not nodes[talker].disconnected.is_set()
    assert await stored(dsn, world) == [3.0, 3.0]
    nodes[talker].close()


async def test_rotation_closes_the_live_session_and_refuses_the_old_token(mqtt_app, dsn, clock):
    world = await make_world(dsn, mqtt_app.cfg)
    n = await node(mqtt_app, world)
    assert str(await asyncio.to_thread(n.connect)) == "Success"
    r = await mqtt_app.post(
        f"/v1/devices/{world.device_ids['fridge01']}/rotate-token", headers=world.auth
    )
    new_token = (await r.json())["ingest_token"]
    assert await asyncio.to_thread(n.disconnected.wait, 10), "the live session was not closed"
    await asyncio.to_thread(n.client.loop_stop)
    again = await node(mqtt_app, world)
    assert str(await asyncio.to_thread(again.connect)) != "Success"
    await asyncio.to_thread(again.close)
    world.devices["fridge01"] = new_token
    fresh = await node(mqtt_app, world)
    assert str(await asyncio.to_thread(fresh.connect)) == "Success"
    assert await asyncio.to_thread(
        fresh.publish, topics.topic(world.account, "fridge01"), reading(5.0)
    )
    await asyncio.to_thread(fresh.close)


async def test_server_killed_mid_stream_stores_every_reading_exactly_once(
    dsn, server_processes, tmp_path
):
    """10,000 readings from 4 nodes (QoS 1, persistent sessions). The server, and with
    it the embedded broker, is SIGKILLed once and restarted gracefully once in the
    middle; the nodes reconnect and resend what was not acknowledged."""
    import threading
    import time
    from datetime import UTC, datetime

    from opensense.api.jsonutil import rfc3339 as ts_text

    from .fixtures.clock import FakeClock

    os.chmod(tmp_path, 0o755)
    port = free_port()
    srv = server_processes(
        OPENSENSE_MQTT="embedded",
        OPENSENSE_MQTT_PORT=str(port),
        OPENSENSE_STATE_DIR=str(tmp_path),
        OPENSENSE_INGEST_RATE_PER_MIN="1000000",
    )
    devices = ("n1", "n2", "n3", "n4")
    world = await make_world(dsn, test_config(FakeClock(datetime.now(UTC))), devices)
    ca = str(tmp_path / "mqtt-tls" / "ca.pem")
    per_node = 2500
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(days=1)

    def run_node(local_id: str, progress: dict[str, int]) -> int:
        n = Node(
            "localhost",
            port,
            world.device_ids[local_id],
            world.devices[local_id],
            ca_file=ca,
            clean=False,
        )
        n.client.reconnect_delay_set(min_delay=0.1, max_delay=1)
        n.client.max_inflight_messages_set(20)
        while True:  # the node boots while the broker may be down: keep trying
            try:
                n.connect()
                break
            except OSError:
                time.sleep(0.2)
        acks: set[int] = set()
        lock = threading.Lock()

        def on_publish(client: Any, userdata: Any, mid: int, rc: Any, props: Any) -> None:
            with lock:
                acks.add(mid)

        n.client.on_publish = on_publish
        mids = []
        t = topics.topic(world.account, local_id)
        for i in range(per_node):
            body = json.dumps(
                {
                    "measurements": [
                        {
                            "type": "temperature",
                            "value": round(2 + (i % 50) / 10, 1),
                            "ts": ts_text(start + timedelta(seconds=i * 30)),
                        }
                    ]
                }
            )
            # queued by paho even while disconnected, and sent (again) after reconnecting
            mids.append(n.client.publish(t, body, qos=1).mid)
            progress[local_id] = i
            if i % 200 == 0:
                time.sleep(0.05)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # every publish is acknowledged in the end
            with lock:
                acked = sum(1 for m in mids if m in acks)
            if acked == len(mids):
                break
            time.sleep(0.1)
        n.client.disconnect()
        n.client.loop_stop()
        return acked

    progress: dict[str, int] = {}
    tasks = [asyncio.create_task(asyncio.to_thread(run_node, d, progress)) for d in devices]

    async def rows() -> int:
        async with await psycopg.AsyncConnection.connect(dsn) as conn:
            cur = await conn.execute(
                "SELECT count(*) FROM measurements m"
                " JOIN channels c ON c.num = m.channel_num WHERE c.account_id = %s",
                (world.account,),
            )
            got = await cur.fetchone()
            assert got is not None
            return int(got[0])

    async def stored_at_least(n: int) -> int:
        # rows in the database, not publishes queued in the clients: the kill must land
        # while the server is storing (as the Mosquitto test does)
        deadline = asyncio.get_running_loop().time() + 120
        while (got := await rows()) < n:
            assert asyncio.get_running_loop().time() < deadline, (got, n)
            await asyncio.sleep(0.05)
        return got

    total = per_node * len(devices)
    at_kill = await stored_at_least(total // 5)
    srv.kill()  # the server and its broker die at once
    assert at_kill < total, at_kill  # mid-delivery: most readings still to come
    await asyncio.sleep(0.5)
    await asyncio.to_thread(srv.start)
    while sum(progress.values()) < total * 7 // 10:  # noqa: ASYNC110 - set from threads
        await asyncio.sleep(0.05)
    srv.proc.terminate()  # a graceful restart as well, while the nodes still publish
    srv.proc.wait(30)
    await asyncio.to_thread(srv.start)
    acked = await asyncio.wait_for(asyncio.gather(*tasks), 240)
    assert acked == [per_node] * len(devices)

    # Exactly every reading: the count proves none was lost. (A count of distinct
    # (channel, ts) would prove nothing more: the primary key makes it equal by
    # construction, and a resend is skipped as a duplicate, never stored twice.)
    assert await rows() == total


async def test_mosquitto_pub_tool_over_tls(mqtt_app, dsn, clock):
    """The stock mosquitto_pub client, verifying the broker with the CA, is stored too."""
    world = await make_world(dsn, mqtt_app.cfg)
    args = [
        "mosquitto_pub",
        "-h",
        "localhost",
        "-p",
        str(mqtt_app.cfg.mqtt_port),
        "--cafile",
        mqtt_app.ca,
        "-u",
        world.device_ids["fridge01"],
        "-P",
        world.devices["fridge01"],
        "-i",
        world.device_ids["fridge01"],
        "-q",
        "1",
        "-t",
        topics.topic(world.account, "fridge01"),
        "-m",
        reading(6.5).decode(),
    ]
    proc = await asyncio.create_subprocess_exec(*args, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err
    assert await stored(dsn, world) == [6.5]
    # and with a wrong password it is refused
    bad = args[:]
    tok = world.devices["fridge01"]
    bad[bad.index("-P") + 1] = tok[:-1] + ("a" if tok[-1] != "a" else "b")
    proc = await asyncio.create_subprocess_exec(*bad, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode != 0
