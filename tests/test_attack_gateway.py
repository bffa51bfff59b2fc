"""Issue 11, the site gateway (items 12, 13, 14 and the gateway half of 19), each
performed through the real server (PostgreSQL) and, where the gateway takes part,
its real objects or process:

- 12: a gateway's local alert with a made-up `opened_at` (2099) must not silence the
  site's later alarms; local alerts expire without a clear; alerts of a rotated or
  deleted gateway stop counting;
- 13: every server-validated rule kind through the gateway's sync reaches its local
  engine with the right parameters (absence rules used to get 0 s);
- 14: the local HTTP door refuses bodies it cannot bound before reading them and
  asks for the token first;
- 19: a device token rotated on the server stops working at the site broker at
  once (pushed, not at the next periodic sync), and the node connected with it is
  dropped.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import ssl
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from opensense.alarms import engine
from opensense.api.jsonutil import rfc3339
from opensense.gateway import store as gateways
from opensense_gateway import mosquitto
from opensense_gateway import rules as gw_rules
from opensense_gateway.config import Config as GwConfig
from opensense_gateway.main import Gateway
from opensense_gateway.uplink import Api

from .fixtures.processes import free_port
from .fixtures.server import World

pytestmark = pytest.mark.db


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def make_gateway(dsn: str, world: World) -> tuple[str, str]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        gw, token = await gateways.create_gateway(conn, world.account, world.site, "back room", 4)
    return gw["id"], token


async def channel_of(client: Any, world: World, local_id: str) -> str:
    r = await client.post(
        "/v1/ingest",
        headers=world.dev_auth(local_id),
        json={"device": local_id, "measurements": [{"type": "temperature", "value": 4}]},
    )
    assert r.status == 200, await r.text()
    return str((await r.json())["channels"][0]["channel_id"])


# --- 13: every rule kind through the gateway's sync ------------------------------------


async def test_every_rule_kind_reaches_the_gateway_engine_with_its_params(
    client, world: World, dsn, tmp_path: Path
):
    ch1 = await channel_of(client, world, "fridge01")
    ch2 = await channel_of(client, world, "fridge02")
    # one valid rule of every kind the server knows: a new kind fails here until the
    # gateway contract says whether (and how) a gateway runs it
    samples: dict[str, dict[str, Any]] = {
        "range": {"ok_min": -2, "ok_max": 5},
        "delta": {"max_delta": 3, "interval_s": 600},
        "derivative": {"min_rate": -2, "max_rate": 2},
        "absence": {"max_gap_s": 900},
        "comparison": {"other_channel_id": ch2, "op": "gt", "offset": 1},
    }
    assert set(samples) == set(engine.RULE_KINDS)
    made = {}
    for kind, params in samples.items():
        r = await client.post(
            f"/v1/channels/{ch1}/rules",
            headers=world.auth,
            json={"kind": kind, "params": params, "grace_min": 5},
        )
        assert r.status == 201, (kind, await r.text())  # the server validated it
        made[kind] = (await r.json())["id"]

    _, token = await make_gateway(dsn, world)
    cfg = GwConfig(
        state_dir=str(tmp_path / "gw"),
        server_url=str(client.make_url("")).rstrip("/"),
        server_token=token,
        mqtt_host="",
    )
    gw = Gateway(cfg)
    api = Api(cfg)  # closed below: its kept-alive connection is a socket
    try:
        answer = await asyncio.to_thread(gw.sync, api)
        assert answer.status == 200, answer.body
        local = {r.id: r for r in gw.rules if r.device is not None}
        runs = set(answer.body["rule_kinds"])
        assert runs == set(gateways.GATEWAY_RULE_KINDS) <= set(engine.RULE_KINDS)
        for kind, rid in made.items():
            if kind not in runs:
                # the server does not send what the gateway does not run
                assert rid not in local and all(r["kind"] in runs for r in answer.body["rules"])
                continue
            rule = local[rid]
            assert (rule.kind, rule.device, rule.type, rule.grace_min) == (
                kind,
                "fridge01",
                "temperature",
                5,
            )
            assert rule.params == {k: float(v) for k, v in samples[kind].items()}
        # and the local engine acts on them: absence after max_gap_s + grace, not 0 s
        absence = local[made["absence"]]
        assert gw_rules.absence_seconds(absence) == 900
        st, ev = gw_rules.check_absence(absence, gw_rules.State(), 1000.0, 1000.0 + 900 + 300)
        assert ev is None
        st, ev = gw_rules.check_absence(absence, st, 1000.0, 1000.0 + 900 + 301)
        assert ev is not None and ev.what == "open"
        rng = local[made["range"]]
        assert gw_rules.in_range(rng, 5.0) and not gw_rules.in_range(rng, 5.01)
        assert gw_rules.in_range(rng, -2.0) and not gw_rules.in_range(rng, -2.01)
    finally:
        api.close()
        gw.store.close()


# --- 14: the local HTTP door --------------------------------------------------------------

NODE_TOKEN = "ds_live_" + "k" * 12 + "_" + "s" * 32


def door(tmp_path: Path, **http: Any) -> Gateway:
    """The gateway's real HTTP door (its own server object and threads), knowing one
    node of its site the way a sync makes it known: by the token's site hash."""
    port = free_port()
    cfg = GwConfig(
        state_dir=str(tmp_path / "door"),
        server_url="http://127.0.0.1:9",
        server_token="gw_x",
        mqtt_host="",
        http_listen=http.pop("listen", f"127.0.0.1:{port}"),
        **http,
    )
    gw = Gateway(cfg)
    gw.apply_sync(
        {
            "account_id": "acc_1",
            "devices": [
                {
                    "local_id": "fridge01",
                    "key_id": "k" * 12,
                    "site_hash": mosquitto.mosquitto_hash(NODE_TOKEN),
                }
            ],
            "rules": [],
            "defaults": [],
        }
    )
    gw._thread(gw.writer, "writer")
    gw.start_http()
    return gw


def stop_door(gw: Gateway) -> None:
    gw.stop.set()
    gw.shutdown()


def exchange(port: int, head: bytes, body: bytes = b"", wait: float = 5.0) -> tuple[int, Any]:
    """Send a request head (and maybe part of a body, the socket left open as a slow
    or endless sender would), and read the answer within `wait` seconds."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        s.sendall(head + body)
        got = b""
        try:
            while b"\r\n\r\n" not in got or len(got.split(b"\r\n\r\n", 1)[1]) < _length(got):
                chunk = s.recv(65536)
                if not chunk:
                    break
                got += chunk
        except TimeoutError:
            raise AssertionError(f"no answer within {wait} s: the door is still reading") from None
    status = int(got.split(b" ", 2)[1])
    return status, json.loads(got.split(b"\r\n\r\n", 1)[1])


def _length(got: bytes) -> int:
    m = re.search(rb"(?i)content-length: *([0-9]+)", got.split(b"\r\n\r\n", 1)[0])
    return int(m.group(1)) if m else 1 << 30


def head(length: str | None, token: str | None = NODE_TOKEN, extra: str = "") -> bytes:
    lines = ["POST /v1/ingest HTTP/1.1", "Host: gateway", "Content-Type: application/json"]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + extra + "\r\n\r\n").encode()


READING = json.dumps({"measurements": [{"type": "temperature", "value": 4.5}]}).encode()


def test_http_door_bounds_the_body_before_reading_and_checks_the_token_first(tmp_path: Path):
    gw = door(tmp_path)
    assert gw.http is not None
    port = gw.http.server_address[1]
    try:
        # the finding: a negative length read an unauthenticated body without end
        status, body = exchange(port, head("-1", token=None), b"x" * 1_000_000)
        assert (status, body["error"]["code"]) == (400, "invalid_request")
        assert body["error"]["request_id"].startswith("req_")
        status, body = exchange(port, head("-1"), b"x" * 1_000_000)
        assert (status, body["error"]["code"]) == (400, "invalid_request")
        for bad in ("abc", "+5", " 5_0", "1e3", "99999999999999999999"):
            status, body = exchange(port, head(bad), b"x" * 100)
            assert (status, body["error"]["code"]) in ((400, "invalid_request"),), bad
        status, body = exchange(port, head("5", extra="\r\nContent-Length: 7"), b"x" * 7)
        assert status == 400  # two lengths: which one? neither
        # no length at all, or a chunked body: 411
        status, body = exchange(port, head(None), b"x" * 1000)
        assert (status, body["error"]["code"]) == (411, "length_required")
        chunked = head(None, extra="\r\nTransfer-Encoding: chunked")
        status, body = exchange(port, chunked, b"ffff\r\n" + b"x" * 5000)
        assert (status, body["error"]["code"]) == (411, "length_required")
        # too long: refused from the header, nothing read
        status, body = exchange(port, head(str(64 * 1024 + 1)))
        assert (status, body["error"]["code"]) == (413, "payload_too_large")
        # the token is checked before a byte of body is read: a stranger announcing
        # 60 KiB and sending none gets its 401 at once
        status, body = exchange(port, head(str(60 * 1024), token=None))
        assert (status, body["error"]["code"]) == (401, "auth_required")
        status, body = exchange(port, head(str(60 * 1024), token="ds_live_nope_nope"))
        assert (status, body["error"]["code"]) == (401, "token_invalid")
        # and the node of this site still gets in
        status, body = exchange(port, head(str(len(READING))), READING)
        assert status == 200 and body["accepted"] == 1, body
    finally:
        stop_door(gw)


def test_http_door_answers_the_servers_code_for_a_body_it_cannot_read(tmp_path: Path):
    """Drift of the old private copy: a body nested past the parser's depth escaped the
    door as a RecursionError (no answer at all), and unreadable JSON was answered
    invalid_measurement where the server says bad_json (the contract's strict JSON)."""
    gw = door(tmp_path)
    assert gw.http is not None
    port = gw.http.server_address[1]
    try:
        deep = b"[" * 30_000 + b"]" * 30_000
        status, body = exchange(port, head(str(len(deep))), deep)
        assert (status, body["error"]["code"]) == (400, "bad_json"), body
        for raw in (b"{", b'{"measurements": [{"type": "temperature", "value": NaN}]}'):
            status, body = exchange(port, head(str(len(raw))), raw)
            assert (status, body["error"]["code"]) == (400, "bad_json"), body
        huge = b'{"measurements": [{"type": "temperature", "value": ' + b"9" * 400 + b"}]}"
        status, body = exchange(port, head(str(len(huge))), huge)
        assert (status, body["error"]["code"]) == (400, "invalid_measurement"), body
        status, body = exchange(port, head(str(len(READING))), READING)
        assert status == 200 and body["accepted"] == 1, body
    finally:
        stop_door(gw)


def test_http_door_binds_loopback_by_default_and_lan_needs_tls(tmp_path: Path):
    # a bare port is loopback
    gw = door(tmp_path / "a", listen=str(free_port()))
    try:
        assert gw.http is not None and gw.http.server_address[0] == "127.0.0.1"
    finally:
        stop_door(gw)
    # a LAN address without TLS is refused at start (node tokens would cross the LAN
    # in clear), unless the config says so on purpose
    with pytest.raises(SystemExit, match="TLS"):
        door(tmp_path / "b", listen=f"0.0.0.0:{free_port()}")
    # with a certificate the door speaks TLS only
    cert, key = self_signed(tmp_path)
    gw = door(
        tmp_path / "c", listen=f"0.0.0.0:{free_port()}", http_cert_file=cert, http_key_file=key
    )
    try:
        assert gw.http is not None
        port = gw.http.server_address[1]
        ctx = ssl.create_default_context(cafile=cert)
        ctx.check_hostname = False
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with ctx.wrap_socket(raw) as s:
                assert s.version() in ("TLSv1.2", "TLSv1.3")
                s.sendall(head(str(len(READING))) + READING)
                got = s.recv(65536)
        assert got.startswith(b"HTTP/1.1 200"), got[:200]
        # plain HTTP to the TLS door gets nothing but a closed connection
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(head(str(len(READING))) + READING)
            try:
                got = s.recv(65536)
            except ConnectionResetError:
                got = b""
            assert not got.startswith(b"HTTP/")
    finally:
        stop_door(gw)


def self_signed(tmp_path: Path) -> tuple[str, str]:
    from datetime import UTC, datetime, timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    k = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gateway.local")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(k.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(k, hashes.SHA256())
    )
    cp, kp = tmp_path / "door.crt", tmp_path / "door.key"
    cp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    kp.write_bytes(
        k.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(cp), str(kp)


# --- 12: local alerts cannot silence the site ----------------------------------------------


@pytest.fixture
async def alarms(aiohttp_client, dsn, clock, smtp, telegram):
    """The server with its alarm pipeline (run by hand on the injected clock), one
    confirmed email recipient and a gateway for the site."""
    from opensense.app import create_app

    from .fixtures.server import make_world
    from .test_alarms import alarm_config, email_target

    cfg = alarm_config(clock, smtp, telegram)
    app = create_app(cfg, dsn)
    client = await aiohttp_client(app)
    world = await make_world(dsn, cfg, ("fridge01",))
    await email_target(client, app, world, smtp, "night@example.test")
    gid, token = await make_gateway(dsn, world)
    return client, world, app, gid, token


async def post_alert(client: Any, token: str, **times: datetime) -> Any:
    alert = {
        "ref": "la-" + "-".join(str(int(t.timestamp())) for t in times.values()),
        "device": "fridge01",
        "type": "temperature",
        "label": "",
        "path": "smtp",
        **{k: rfc3339(v) for k, v in times.items()},
    }
    return await client.post(
        "/v1/gateway/local-alerts", headers=auth(token), json={"alerts": [alert]}
    )


async def heard_at(dsn: str, gid: str, t: datetime) -> None:
    """The server last heard the gateway at `t` (the start of an outage)."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("UPDATE gateways SET last_seen_at = %s WHERE id = %s", (t, gid))


async def alarm_statuses(dsn: str, event_id: str) -> list[str]:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT status FROM outbox WHERE event_id = %s AND kind = 'alarm_opened'",
            (event_id,),
        )
        return sorted(r[0] for r in await cur.fetchall())


async def stored_alerts(dsn: str, gid: str) -> int:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute("SELECT count(*) FROM local_alerts WHERE gateway_id = %s", (gid,))
        row = await cur.fetchone()
    return int(row[0]) if row else 0


async def test_a_local_alert_dated_2099_is_refused_and_later_alarms_are_sent(
    alarms, dsn, clock, smtp
):
    from .test_alarms import evaluate, events, ingest, send

    client, world, app, gid, token = alarms
    # a real outage of an hour: the server last heard the gateway then
    await heard_at(dsn, gid, clock() - timedelta(hours=1))
    far = datetime(2099, 1, 1, tzinfo=UTC)
    for times in (
        {"opened_at": far, "notified_at": far},
        # notified inside the gap, but "opened" in 2099
        {"opened_at": far, "notified_at": clock() - timedelta(minutes=30)},
        # notified before the server ever lost the gateway
        {"opened_at": clock() - timedelta(hours=3), "notified_at": clock() - timedelta(hours=3)},
        # a clear in the future
        {
            "opened_at": clock() - timedelta(minutes=40),
            "notified_at": clock() - timedelta(minutes=30),
            "cleared_at": far,
        },
    ):
        r = await post_alert(client, token, **times)
        assert r.status == 422, (times, await r.text())
        err = (await r.json())["error"]
        assert err["code"] == "out_of_range" and err["request_id"].startswith("req_"), err
    assert await stored_alerts(dsn, gid) == 0  # never half-stored

    # a later alarm of the site reaches people as usual
    await ingest(client, world, clock, [3.0] * 10 + [9.0] * 30)
    await evaluate(app)
    (ev,) = [e for e in await events(client, world) if e["kind"] == "range"]
    assert await alarm_statuses(dsn, ev["id"]) == ["pending"]
    await send(app, client)
    assert any("ALARM" in m["Subject"] for m in smtp.to("night@example.test"))


async def test_a_gateway_the_server_never_lost_cannot_post_local_alerts(alarms, clock):
    client, world, app, gid, token = alarms
    r = await client.get("/v1/gateway/sync", headers=auth(token))  # heard just now
    assert r.status == 200
    t = clock() - timedelta(seconds=1)
    r = await post_alert(client, token, opened_at=t, notified_at=t)
    assert r.status == 422 and "no uplink gap" in (await r.json())["error"]["message"]


async def the_range_event(alarms: Any) -> Any:
    from .test_alarms import evaluate, events

    client, world, app, gid, token = alarms
    await evaluate(app)
    (ev,) = [e for e in await events(client, world) if e["kind"] == "range"]
    return ev


@pytest.mark.parametrize("how", ["rotated", "deleted"])
async def test_local_alerts_of_a_rotated_or_deleted_gateway_stop_suppressing(
    alarms, dsn, clock, how
):
    client, world, app, gid, token = alarms
    await backlog_with_local_alert_then(alarms, dsn, clock, how)
    ev = await the_range_event(alarms)
    # the alert was stored while the gateway's token was live; it no longer counts
    assert await alarm_statuses(dsn, ev["id"]) == ["pending"]


async def backlog_with_local_alert_then(alarms: Any, dsn: str, clock: Any, how: str) -> None:
    from .test_alarms import ingest

    client, world, app, gid, token = alarms
    t0 = clock() - timedelta(hours=6)
    await heard_at(dsn, gid, t0)
    warm = t0 + timedelta(hours=1)
    r = await post_alert(
        client,
        token,
        opened_at=warm + timedelta(minutes=15),
        notified_at=warm + timedelta(minutes=16),
        cleared_at=warm + timedelta(hours=2),
    )
    assert r.status == 200, await r.text()
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        if how == "rotated":  # e.g. the gateway box was stolen
            await gateways.rotate_gateway_token(conn, world.account, gid, 4, clock())
        elif how == "deleted":
            await conn.execute("UPDATE gateways SET deleted_at = %s WHERE id = %s", (clock(), gid))
    values = [9.0 if 12 <= i < 36 else 3.0 for i in range(72)]  # 5-minute readings
    await ingest(client, world, clock, values, every_min=5, start=t0)


async def test_the_same_local_alert_with_a_live_token_does_suppress(alarms, dsn, clock):
    """The control for the test above: nothing rotated, the alert counts."""
    await backlog_with_local_alert_then(alarms, dsn, clock, "nothing")
    ev = await the_range_event(alarms)
    assert await alarm_statuses(dsn, ev["id"]) == ["local"]


async def test_a_local_alert_without_a_clear_expires_after_24_hours(alarms, dsn, clock):
    from opensense.alarms.outbox import LOCAL_ALERT_TTL

    from .test_alarms import ingest

    client, world, app, gid, token = alarms
    assert LOCAL_ALERT_TTL == timedelta(hours=24)  # docs/gateway.md says so
    t0 = clock() - timedelta(hours=30)
    await heard_at(dsn, gid, t0)
    warm = t0 + timedelta(hours=1)
    # posted without a clear (the gateway died, or the clear never came)
    r = await post_alert(
        client,
        token,
        opened_at=warm + timedelta(minutes=15),
        notified_at=warm + timedelta(minutes=16),
    )
    assert r.status == 200, await r.text()
    # 29 h later the server opens the alarm from late readings: still too warm
    values = [3.0 if i < 12 else 9.0 for i in range(30 * 12)]
    await ingest(client, world, clock, values, every_min=5, start=t0)
    ev = await the_range_event(alarms)
    assert ev["started_at"] == rfc3339(warm)
    assert await alarm_statuses(dsn, ev["id"]) == ["pending"]


# --- 19: rotation reaches the site at once --------------------------------------------------


@pytest.fixture
def site_without_periodic_sync(dsn: str, tmp_path: Path) -> Any:
    """A real server process, a site Mosquitto and the real gateway process whose
    periodic sync is an hour away: only the push can carry a change in time."""
    from opensense.settings import Config as ServerConfig

    from .fixtures.processes import ServerProcess
    from .fixtures.server import make_world
    from .gateway_rig import GatewayProcess, SiteBroker, wait_for

    async def setup() -> tuple[Any, str]:
        world = await make_world(dsn, ServerConfig(bcrypt_rounds=4), ("fridge01", "fridge02"))
        _, token = await make_gateway(dsn, world)
        return world, token

    world, gw_token = asyncio.run(setup())
    server = ServerProcess(dsn)
    broker = SiteBroker(tmp_path / "broker")
    http_port = free_port()
    gw = GatewayProcess(
        tmp_path / "gw",
        server={"url": server.url, "token": gw_token, "timeout_s": 3},
        forward={"sync_interval_s": 3600, "health_interval_s": 1},
        mqtt={
            "host": "127.0.0.1",
            "port": broker.port,
            "password": "gateway-secret",
            "password_file": broker.passwd,
            "acl_file": broker.acl,
            "reload_command": broker.reload_command,
        },
        http={"listen": f"127.0.0.1:{http_port}"},
    )
    try:
        wait_for(
            lambda: f"{world.device_ids['fridge02']}:" in broker.passwd.read_text(),
            30,
            "the first sync",
        )
        wait_for(lambda: gw.health().get("uplink") == "up", 30, "the uplink")
        yield world, gw, broker, f"http://127.0.0.1:{http_port}"
    except BaseException:
        print(gw.log_text())
        raise
    finally:
        gw.stop()
        broker.stop()
        server.stop()


def test_a_rotated_device_token_stops_working_at_the_site_at_once(site_without_periodic_sync, dsn):
    import time

    from .gateway_rig import connected_node, refused_node, wait_for
    from .test_gateway_site import post, rotate

    world, gw, broker, local = site_without_periodic_sync
    old = world.devices["fridge01"]
    body = {"device": "fridge01", "measurements": [{"type": "temperature", "value": 4.5}]}
    assert post(local + "/v1/ingest", old, body)[0] == 200
    node = connected_node(broker.port, world.account, "fridge01", old, world.device_ids["fridge01"])
    dropped = threading.Event()
    node.c.on_disconnect = lambda *_: dropped.set()
    node.c.reconnect_delay_set(60, 60)  # no quiet reconnect with the old token meanwhile
    time.sleep(1)  # the gateway's long-poll is held by now

    new = rotate(dsn, world)
    rotated = time.monotonic()
    # the HTTP door refuses the old token within seconds, not at the next sync (1 h)
    wait_for(lambda: post(local + "/v1/ingest", old, body)[0] == 401, 10, "the door to refuse")
    # the node connected with the rotated token is dropped by the broker's reload
    assert dropped.wait(10), "the node with the rotated token is still connected"
    assert time.monotonic() - rotated < 15
    node.c.loop_stop()
    # and cannot come back with it; the new token works at the broker and the door
    assert refused_node(broker.port, world.account, "fridge01", old, world.device_ids["fridge01"])
    connected_node(
        broker.port, world.account, "fridge01", new, world.device_ids["fridge01"]
    ).close()
    assert post(local + "/v1/ingest", new, body)[0] == 200
