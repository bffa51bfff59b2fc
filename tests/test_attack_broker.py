"""Attacks on the embedded MQTT broker (amqtt in the server), performed through a real
server with its TLS listener and real PostgreSQL: session takeover without the
password, wills outside the device's topics, oversized packets, publish floods, TLS
downgrade and certificate requests, how a dropped connection is logged, and a closed
connection cut when the broker stops. Plus the shipped Mosquitto's packet size limit
and TLS settings."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import ssl
import struct
from datetime import timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psutil
import psycopg
import pytest

from opensense.api.jsonutil import rfc3339
from opensense.api.keys import MQTT
from opensense.app import create_app
from opensense.mqtt.ca import TlsFiles
from opensense_contract import topics

from .fixtures.processes import free_port
from .fixtures.server import World, make_world, rate_count, test_config
from .mqtt_node import Node

pytestmark = pytest.mark.db


def node(app: Any, world: World, local_id: str = "fridge01", **kw: Any) -> Node:
    return Node(
        "localhost",
        app.cfg.mqtt_port,
        world.device_ids[local_id],
        kw.pop("password", world.devices[local_id]),
        ca_file=str(app.tls.ca_cert),
        **kw,
    )


def reading(value: float = 4.2) -> bytes:
    return json.dumps({"measurements": [{"type": "temperature", "value": value}]}).encode()


def retained(app: Any) -> dict[str, bytes]:
    broker = app.app[MQTT].broker
    return {t: bytes(m.data) for t, m in broker._retained_messages.items()}


async def stored(dsn: str, world: World) -> list[float]:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT m.value FROM measurements m JOIN channels c ON c.num = m.channel_num"
            " WHERE c.account_id = %s ORDER BY m.ts",
            (world.account,),
        )
        return [r[0] for r in await cur.fetchall()]


def _s(b: bytes) -> bytes:
    return len(b).to_bytes(2, "big") + b


def _remaining(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def connect_packet(client_id: str, user: str, password: str) -> bytes:
    vh = _s(b"MQTT") + bytes([4, 0xC2]) + (30).to_bytes(2, "big")
    body = vh + _s(client_id.encode()) + _s(user.encode()) + _s(password.encode())
    return bytes([0x10]) + _remaining(len(body)) + body


def tls_socket(app: Any, **ctx_kw: Any) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=str(app.tls.ca_cert))
    for k, v in ctx_kw.items():
        setattr(ctx, k, v)
    raw = socket.create_connection(("localhost", app.cfg.mqtt_port), timeout=10)
    return ctx.wrap_socket(raw, server_hostname="localhost")


def connected_socket(app: Any, world: World, local_id: str = "fridge01") -> ssl.SSLSocket:
    """A device's raw TLS connection, its CONNECT accepted."""
    s = tls_socket(app)
    dev = world.device_ids[local_id]
    s.sendall(connect_packet(dev, dev, world.devices[local_id]))
    connack = s.recv(4)
    assert connack == b"\x20\x02\x00\x00", connack
    return s


def closed_by_peer(s: ssl.SSLSocket, timeout: float = 10) -> bool:
    """True once the broker closed the connection (reads EOF or a reset)."""
    s.settimeout(timeout)
    try:
        while s.recv(65536):
            pass
    except (ConnectionError, ssl.SSLError):
        return True
    except TimeoutError:
        return False
    return True


# --- 1. session takeover without a password -------------------------------------------


async def test_wrong_password_leaves_the_devices_live_session_alone(fw_app, dsn, clock):
    world = await make_world(dsn, fw_app.cfg)
    dev = world.device_ids["fridge01"]
    victim = node(fw_app, world)
    assert str(await asyncio.to_thread(victim.connect)) == "Success"
    assert await asyncio.to_thread(
        victim.subscribe, topics.topic(world.account, "fridge01", "cmd/#")
    )
    cadence = topics.topic(world.account, "fridge01", "cmd/cadence")
    # the attacker knows only the dev_ id: clean session, then persistent session
    for clean in (True, False):
        attacker = node(fw_app, world, password="ds_live_wrong_guess", clean=clean)
        attacker.client.will_set(cadence, b"86400", qos=1, retain=True)
        assert str(await asyncio.to_thread(attacker.connect)) != "Success"
        await asyncio.to_thread(attacker.close)
    # the device kept its connection and its subscriptions: commands still reach it
    assert not victim.disconnected.is_set()
    r = await fw_app.post(f"/v1/devices/{dev}/identify", headers=world.auth)
    assert r.status == 202
    msg = await asyncio.to_thread(victim.next_message)
    assert msg is not None and msg[0].endswith("/cmd/identify")
    # and nothing of the attacker's was retained for the device's next connection
    assert cadence not in retained(fw_app)
    await asyncio.to_thread(victim.close)


async def test_wrong_password_cannot_plant_a_will_on_a_persistent_session(fw_app, dsn, clock):
    world = await make_world(dsn, fw_app.cfg)
    lwt = topics.topic(world.account, "fridge01", "lwt")
    cadence = topics.topic(world.account, "fridge01", "cmd/cadence")
    victim = node(fw_app, world, clean=False, will=(lwt, b"offline"))
    assert str(await asyncio.to_thread(victim.connect)) == "Success"
    attacker = node(fw_app, world, password="ds_live_wrong_guess", clean=False)
    attacker.client.will_set(cadence, b"86400", qos=1, retain=True)
    assert str(await asyncio.to_thread(attacker.connect)) != "Success"
    await asyncio.to_thread(attacker.close)
    assert not victim.disconnected.is_set()
    # the device's connection drops: its own will goes out, not the attacker's
    victim.client._sock.close()  # type: ignore[union-attr]
    for _ in range(100):
        if retained(fw_app).get(lwt) == b"offline":
            break
        await asyncio.sleep(0.05)
    assert retained(fw_app).get(lwt) == b"offline"
    assert cadence not in retained(fw_app)
    victim.client.loop_stop()


async def test_a_client_id_other_than_the_tokens_device_is_refused(fw_app, dsn, clock):
    world = await make_world(dsn, fw_app.cfg, ("fridge01", "fridge02"))
    other = node(fw_app, world, "fridge02")
    assert str(await asyncio.to_thread(other.connect)) == "Success"
    await asyncio.to_thread(other.subscribe, topics.topic(world.account, "fridge02", "cmd/#"))
    # fridge01's valid token, fridge02's client id
    n = node(fw_app, world, "fridge01", client_id=world.device_ids["fridge02"])
    assert str(await asyncio.to_thread(n.connect)) != "Success"
    await asyncio.to_thread(n.close)
    assert not other.disconnected.is_set()
    r = await fw_app.post(
        f"/v1/devices/{world.device_ids['fridge02']}/identify", headers=world.auth
    )
    assert r.status == 202
    msg = await asyncio.to_thread(other.next_message)
    assert msg is not None and msg[0].endswith("/cmd/identify")
    await asyncio.to_thread(other.close)


async def test_the_devices_new_connection_ends_its_old_one_without_its_will(fw_app, dsn, clock):
    """A node that lost its link reconnects while the broker still holds the old
    connection: the old one is closed (not left running outside the broker's session
    table, where a revocation could not reach it), and its will does not mark the
    device offline."""
    world = await make_world(dsn, fw_app.cfg)
    dev = world.device_ids["fridge01"]
    lwt = topics.topic(world.account, "fridge01", "lwt")
    old = node(fw_app, world, will=(lwt, b"offline"))
    assert str(await asyncio.to_thread(old.connect)) == "Success"
    old.client.reconnect_delay_set(60, 60)  # paho would come back at once otherwise
    new = node(fw_app, world, will=(lwt, b"offline"))
    assert str(await asyncio.to_thread(new.connect)) == "Success"
    assert await asyncio.to_thread(new.publish, lwt, b"online")
    assert await asyncio.to_thread(old.disconnected.wait, 10), "the old connection lives on"
    await asyncio.to_thread(old.client.loop_stop)
    await asyncio.sleep(0.3)
    assert retained(fw_app).get(lwt) != b"offline"
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute("SELECT connected FROM devices WHERE id = %s", (dev,))
        assert (await cur.fetchone())[0] is True
    await asyncio.to_thread(new.subscribe, topics.topic(world.account, "fridge01", "cmd/#"))
    r = await fw_app.post(f"/v1/devices/{dev}/identify", headers=world.auth)
    assert r.status == 202
    msg = await asyncio.to_thread(new.next_message)
    assert msg is not None and msg[0].endswith("/cmd/identify")
    await asyncio.to_thread(new.close)


# --- 2. wills and the topic ACL --------------------------------------------------------


async def test_a_will_on_another_accounts_topic_is_refused_at_connect(fw_app, dsn, clock):
    a = await make_world(dsn, fw_app.cfg)
    b = await make_world(dsn, fw_app.cfg)
    target = topics.topic(b.account, "fridge01", "cmd/cadence")
    n = node(fw_app, a)
    n.client.will_set(target, b"86400", qos=1, retain=True)
    assert str(await asyncio.to_thread(n.connect)) != "Success"
    await asyncio.to_thread(n.close)
    assert target not in retained(fw_app)
    # the same device with its own lwt as will is welcome
    ok = node(fw_app, a, will=(topics.topic(a.account, "fridge01", "lwt"), b"offline"))
    assert str(await asyncio.to_thread(ok.connect)) == "Success"
    await asyncio.to_thread(ok.close)


async def test_a_will_is_checked_again_before_it_is_published(fw_app, dsn, clock):
    """Whatever put a foreign will on a live session (amqtt's resume copied a new
    CONNECT's will onto the old session), the broker does not publish it."""
    a = await make_world(dsn, fw_app.cfg)
    b = await make_world(dsn, fw_app.cfg)
    target = topics.topic(b.account, "fridge01", "cmd/cadence")
    n = node(fw_app, a, will=(topics.topic(a.account, "fridge01", "lwt"), b"offline"))
    assert str(await asyncio.to_thread(n.connect)) == "Success"
    session, _ = fw_app.app[MQTT].broker._sessions[a.device_ids["fridge01"]]
    session.will_topic, session.will_message, session.will_retain = target, b"86400", True
    n.client._sock.close()  # type: ignore[union-attr]  # no DISCONNECT: the will is due
    for _ in range(40):
        if session.transitions.state == "disconnected":
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)
    assert target not in retained(fw_app)
    n.client.loop_stop()


# --- 3. size and rate -------------------------------------------------------------------


async def test_an_oversized_publish_is_refused_from_its_header(fw_app, dsn, clock, caplog):
    caplog.set_level(logging.INFO)
    world = await make_world(dsn, fw_app.cfg)
    t = topics.topic(world.account, "fridge01").encode()
    s = await asyncio.to_thread(connected_socket, fw_app, world)
    # a 60 MB QoS 1 PUBLISH: the header and the first bytes only; the broker must not
    # wait for (or buffer) the rest
    head = bytes([0x32]) + _remaining(60_000_000) + _s(t) + b"\x00\x01"
    await asyncio.to_thread(s.sendall, head + b"{" * 1000)
    assert await asyncio.to_thread(closed_by_peer, s)
    s.close()
    assert any(
        "payload_too_large" in r.getMessage() or "at most 65536" in r.getMessage()
        for r in caplog.records
    ), "the refusal was not logged"
    # a CONNECT that announces 10 MB, before any authentication
    s = await asyncio.to_thread(tls_socket, fw_app)
    await asyncio.to_thread(s.sendall, bytes([0x10]) + _remaining(10_000_000) + b"\x00")
    assert await asyncio.to_thread(closed_by_peer, s)
    s.close()
    # a publish just under the limit is read and acknowledged (its payload is refused
    # on …/err as invalid, but the packet is within bounds)
    n = node(fw_app, world)
    assert str(await asyncio.to_thread(n.connect)) == "Success"
    assert await asyncio.to_thread(
        n.publish, topics.topic(world.account, "fridge01"), b" " * (65536 - 200)
    )
    await asyncio.to_thread(n.close)


@pytest.fixture
async def slow_app(aiohttp_client: Any, dsn: str, clock: Any, tmp_path: Path) -> Any:
    """The embedded broker with an ingest limit of 3 readings a minute per device."""
    os.chmod(tmp_path, 0o755)
    cfg = test_config(
        clock, mqtt="embedded", mqtt_port=free_port(), state_dir=tmp_path, ingest_rate_per_min=3
    )
    client = await aiohttp_client(create_app(cfg, dsn))
    client.cfg = cfg
    d = tmp_path / "mqtt-tls"
    client.tls = TlsFiles(d / "ca.pem", d / "server.pem", d / "server.key")
    return client


async def test_a_publish_flood_is_rate_limited_and_nothing_is_lost(slow_app, dsn, clock):
    world = await make_world(dsn, slow_app.cfg)
    now = clock()  # the limit counts per minute: start at the top of one
    clock.advance(seconds=60 - now.second - now.microsecond / 1e6)
    t = topics.topic(world.account, "fridge01")
    n = node(slow_app, world)
    assert str(await asyncio.to_thread(n.connect)) == "Success"
    await asyncio.to_thread(n.subscribe, topics.topic(world.account, "fridge01", "err"))
    for v in (1.0, 2.0, 3.0):
        clock.advance(seconds=1)
        assert await asyncio.to_thread(n.publish, t, reading(v))
    clock.advance(seconds=1)
    # the fourth of the minute: no PUBACK (the node keeps it), the reason on …/err,
    # and the connection closed so that the node sends it again later
    info = n.client.publish(t, reading(4.0), qos=1)
    msg = await asyncio.to_thread(n.next_message)
    assert msg is not None and json.loads(msg[1])["error"]["code"] == "rate_limited"
    assert await asyncio.to_thread(n.disconnected.wait, 10)
    assert not info.is_published()
    assert await stored(dsn, world) == [1.0, 2.0, 3.0]
    # HTTP ingest shares the device's allowance
    r = await slow_app.post(
        "/v1/ingest",
        data=reading(5.0),
        headers={"Authorization": f"Bearer {world.devices['fridge01']}"},
    )
    assert r.status == 429
    await asyncio.to_thread(n.client.loop_stop)
    # a minute later the node reconnects and resends: stored, once
    clock.advance(seconds=60)
    again = node(slow_app, world)
    assert str(await asyncio.to_thread(again.connect)) == "Success"
    assert await asyncio.to_thread(again.publish, t, reading(4.0))
    assert await stored(dsn, world) == [1.0, 2.0, 3.0, 4.0]
    await asyncio.to_thread(again.close)


async def test_mqtt_and_http_share_the_allowance_through_the_flush(slow_app, dsn, clock):
    """The broker counts in the process and writes the counts once a second
    (ratelimit.LocalCounter): its flush carries MQTT's count to the shared counter
    HTTP checks, and brings HTTP's count back to the broker."""
    world = await make_world(dsn, slow_app.cfg)
    now = clock()  # the limit counts per minute: start at the top of one
    clock.advance(seconds=60 - now.second - now.microsecond / 1e6)
    dev = world.device_ids["fridge01"]
    auth = {"Authorization": f"Bearer {world.devices['fridge01']}"}
    rate = slow_app.app[MQTT].ingest.rate
    for v in (1.0, 2.0):
        clock.advance(seconds=1)
        body = {"device": "fridge01", "measurements": [{"type": "temperature", "value": v}]}
        r = await slow_app.post("/v1/ingest", json=body, headers=auth)
        assert r.status == 200, await r.text()
    t = topics.topic(world.account, "fridge01")
    n = node(slow_app, world)
    assert str(await asyncio.to_thread(n.connect)) == "Success"
    await asyncio.to_thread(n.subscribe, topics.topic(world.account, "fridge01", "err"))
    clock.advance(seconds=1)
    flushes = rate.flushes
    assert await asyncio.to_thread(n.publish, t, reading(3.0))  # the third of 3
    # the broker's flush loop (not this test) writes the publish's count
    for _ in range(100):
        if rate.flushes > flushes:
            break
        await asyncio.sleep(0.05)
    assert await rate_count(dsn, dev) == 3
    # ... and learnt HTTP's two: the next publish is the fourth, refused, not acknowledged
    clock.advance(seconds=1)
    info = n.client.publish(t, reading(4.0), qos=1)
    msg = await asyncio.to_thread(n.next_message)
    assert msg is not None and json.loads(msg[1])["error"]["code"] == "rate_limited"
    assert await asyncio.to_thread(n.disconnected.wait, 10)
    assert not info.is_published()
    r = await slow_app.post("/v1/ingest", data=reading(5.0), headers=auth)
    assert r.status == 429 and (await r.json())["error"]["code"] == "rate_limited"
    assert await stored(dsn, world) == [1.0, 2.0, 3.0]
    await asyncio.to_thread(n.client.loop_stop)


async def test_one_devices_flood_does_not_refuse_another(slow_app, dsn, clock):
    """fridge01 floods past its allowance (refused, reconnecting, refused again) while
    fridge02 sends its three: all of fridge02's are acknowledged and stored. (How
    much the flood slows the other: tools/bench/mqtt.)"""
    world = await make_world(dsn, slow_app.cfg, ("fridge01", "fridge02"))
    now = clock()
    clock.advance(seconds=60 - now.second - now.microsecond / 1e6)
    t1, t2 = topics.topic(world.account, "fridge01"), topics.topic(world.account, "fridge02")
    start = clock()

    def at(value: float) -> bytes:  # a ts of its own, so no two readings are duplicates
        ts = rfc3339(start - timedelta(seconds=value))
        return json.dumps(
            {"measurements": [{"type": "temperature", "value": value, "ts": ts}]}
        ).encode()

    calm = node(slow_app, world, "fridge02")
    assert str(await asyncio.to_thread(calm.connect)) == "Success"

    async def flood() -> int:
        refused = 0
        for round_ in range(3):
            n = node(slow_app, world, "fridge01")
            assert str(await asyncio.to_thread(n.connect)) == "Success"
            for i in range(6):
                if not await asyncio.to_thread(n.publish, t1, at(100 + 10 * round_ + i), 1, 2):
                    refused += 1
                    break
            await asyncio.to_thread(n.close)
        return refused

    async def calm_three() -> list[bool]:
        return [await asyncio.to_thread(calm.publish, t2, at(v)) for v in (7.0, 8.0, 9.0)]

    refused, acked = await asyncio.gather(flood(), calm_three())
    assert refused == 3 and acked == [True, True, True]
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT d.local_id, m.value FROM measurements m"
            " JOIN channels c ON c.num = m.channel_num JOIN devices d ON d.id = c.device_id"
            " WHERE c.account_id = %s ORDER BY m.value",
            (world.account,),
        )
        rows = await cur.fetchall()
    assert [v for d, v in rows if d == "fridge02"] == [7.0, 8.0, 9.0]
    assert [v for d, v in rows if d == "fridge01"] == [100.0, 101.0, 102.0]
    await asyncio.to_thread(calm.close)


async def test_the_shipped_mosquitto_refuses_an_oversized_publish(mosquitto):
    """deploy/mosquitto/mosquitto.conf's max_packet_size: 64 KiB, as the HTTP limit."""

    def attempt(size: int) -> bool:
        """True if Mosquitto kept the connection after a publish of `size` bytes."""
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="size-probe")
        c.username_pw_set(mosquitto.admin, mosquitto.password)
        c.connect("127.0.0.1", mosquitto.local_port, keepalive=30)
        c.loop_start()
        try:
            info = c.publish("opensense/probe", b"x" * size, qos=1)
            info.wait_for_publish(5)
            return info.is_published() and c.is_connected()
        finally:
            c.disconnect()
            c.loop_stop()

    assert await asyncio.to_thread(attempt, 1000)
    assert not await asyncio.to_thread(attempt, 70_000)


# --- 4. TLS -----------------------------------------------------------------------------


def handshake(host: str, port: int, ca: str, version: ssl.TLSVersion) -> tuple[str, set[int]]:
    """One handshake pinned to `version`: the version and the handshake message types
    the server sent (13 = CertificateRequest)."""
    ctx = ssl.create_default_context(cafile=ca)
    ctx.minimum_version = ctx.maximum_version = version
    seen: set[int] = set()

    def on_msg(
        conn: Any, direction: str, v: Any, content_type: Any, msg_type: Any, data: Any
    ) -> None:
        if direction == "read" and content_type == ssl._TLSContentType.HANDSHAKE:  # type: ignore[attr-defined]
            seen.add(int(msg_type))

    ctx._msg_callback = on_msg  # type: ignore[attr-defined]
    with socket.create_connection((host, port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=host) as s:
            return str(s.version()), seen


CERTIFICATE_REQUEST = 13


async def test_embedded_tls_asks_no_client_certificate(fw_app):
    ca, port = str(fw_app.tls.ca_cert), fw_app.cfg.mqtt_port
    for version in (ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2):
        got, seen = await asyncio.to_thread(handshake, "localhost", port, ca, version)
        assert (
            got == {ssl.TLSVersion.TLSv1_3: "TLSv1.3", ssl.TLSVersion.TLSv1_2: "TLSv1.2"}[version]
        )
        assert seen and CERTIFICATE_REQUEST not in seen, seen


async def test_mosquitto_tls_asks_no_client_certificate(mosquitto):
    for version in (ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2):
        _, seen = await asyncio.to_thread(
            handshake, "localhost", mosquitto.tls_port, mosquitto.ca, version
        )
        assert seen and CERTIFICATE_REQUEST not in seen, seen


# --- 5. a dropped connection is one INFO line ----------------------------------------------


async def test_a_dropped_connection_is_one_info_line(fw_app, dsn, clock, caplog):
    caplog.set_level(logging.INFO)
    world = await make_world(dsn, fw_app.cfg)

    def reset(s: ssl.SSLSocket) -> None:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()

    async def dropped(make: Any) -> list[logging.LogRecord]:
        caplog.clear()
        s = await asyncio.to_thread(make)
        await asyncio.to_thread(reset, s)
        for _ in range(100):
            mine = [r for r in caplog.records if r.name == "opensense.mqtt.embedded"]
            if mine:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        return list(caplog.records)

    # after its CONNECT (a node losing power), and before it (a TLS probe)
    for make in (lambda: connected_socket(fw_app, world), lambda: tls_socket(fw_app)):
        records = await dropped(make)
        loud = [r for r in records if r.levelno >= logging.WARNING]
        assert not loud, [(r.name, r.levelname, r.getMessage()) for r in loud]
        mine = [r for r in records if r.name == "opensense.mqtt.embedded"]
        assert len(mine) == 1 and mine[0].levelno == logging.INFO, [r.getMessage() for r in mine]
        assert mine[0].exc_info is None


# --- 6. a connection the broker closed does not outlive it ----------------------------------


def served(port: int) -> list[Any]:
    """This process's accepted TCP connections on `port` (the broker's side)."""
    return [
        c
        for c in psutil.Process().net_connections("tcp")
        if c.laddr and c.laddr.port == port and c.raddr
    ]


async def test_a_connection_in_its_tls_shutdown_is_cut_when_the_broker_stops(fw_app, dsn, clock):
    """A refused CONNECT is closed with a TLS shutdown, which waits (asyncio: up to
    30 s) for the peer's close_notify; a peer that never reads never sends it. The
    broker forgot such a connection as soon as another came, so stop() left its socket
    open beyond the broker's life (the unclosed transports of a flaky
    test_firmware_e2e run, stop 33)."""
    world = await make_world(dsn, fw_app.cfg)
    port = fw_app.cfg.mqtt_port
    dev = world.device_ids["fridge01"]

    def refused() -> ssl.SSLSocket:
        s = tls_socket(fw_app)
        s.sendall(connect_packet(dev, dev, "not-the-token"))
        return s  # and never read: the broker's close_notify stays unanswered

    silent = await asyncio.to_thread(refused)
    other: ssl.SSLSocket | None = None
    try:
        for _ in range(100):  # refused (the token checked), its shutdown under way
            if fw_app.app[MQTT].refusals:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        assert len(served(port)) == 1
        other = await asyncio.to_thread(connected_socket, fw_app, world)
        assert len(served(port)) == 2
        await fw_app.app[MQTT].stop()
        for _ in range(50):
            if not served(port):
                break
            await asyncio.sleep(0.05)
        assert served(port) == []
    finally:
        silent.close()
        if other is not None:
            other.close()
