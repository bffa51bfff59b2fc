"""Attacks and faults on tokens (issue 11, items 17, 19 EMQX half, 22): the restart
storm, bad-password floods, secrets in the request log, EMQX sessions that outlive a
rotation. Everything goes through the real server (in-process app or `opensense serve`
processes) on a real PostgreSQL; EMQX, out of reach here, is a local double of its
REST API."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest
from aiohttp import web
from yarl import URL

from opensense import tokens
from opensense.api.keys import REQUEST_LOG, VERIFIER
from opensense.app import create_app

from .fixtures.clock import FakeClock
from .fixtures.processes import free_port
from .fixtures.server import World, make_world, test_config
from .mqtt_node import Node

pytestmark = pytest.mark.db


def reading(device: str = "fridge01") -> dict[str, Any]:
    return {"device": device, "measurements": [{"type": "temperature", "value": 4.0}]}


async def _start(aiohttp_client: Any, dsn: str, clock: FakeClock, state: Path, **over: Any) -> Any:
    """One server start: a fresh process's memory (verifier, caches), the same state dir."""
    over.setdefault("token_mac_key", "")  # the key file in the state dir, as in production
    return await aiohttp_client(create_app(test_config(clock, state_dir=state, **over), dsn))


# --- item 22: the restart storm ------------------------------------------------------


async def test_a_restart_readmits_known_devices_without_bcrypt(
    aiohttp_client, dsn, clock, tmp_path
):
    """Today every device's first request after a restart costs a bcrypt check (cost 12:
    ~0.25 s of CPU; 10,000 nodes: ~40 CPU-minutes). After one good check the row keeps
    a fast check, so the restarted server admits the device with one HMAC."""
    w = await make_world(dsn, test_config(clock), ("fridge01", "fridge02"))
    first = await _start(aiohttp_client, dsn, clock, tmp_path)
    for dev in ("fridge01", "fridge02"):
        r = await first.post("/v1/ingest", json=reading(dev), headers=w.dev_auth(dev))
        assert r.status == 200, await r.text()
    assert first.app[VERIFIER].bcrypt_checks == 2
    await first.close()

    again = await _start(aiohttp_client, dsn, clock, tmp_path)  # the restart
    for dev in ("fridge01", "fridge02"):
        r = await again.post("/v1/ingest", json=reading(dev), headers=w.dev_auth(dev))
        assert r.status == 200, await r.text()
    assert again.app[VERIFIER].bcrypt_checks == 0


async def test_a_restarted_embedded_broker_readmits_devices_without_bcrypt(
    aiohttp_client, dsn, clock, tmp_path
):
    """The same through the embedded broker: a node's CONNECT after the restart is
    checked by its fast check."""
    os.chmod(tmp_path, 0o755)
    port = free_port()
    w = await make_world(dsn, test_config(clock), ("fridge01",))
    dev, tok = w.device_ids["fridge01"], w.devices["fridge01"]
    ca = str(tmp_path / "mqtt-tls" / "ca.pem")
    for start in range(2):
        srv = await _start(aiohttp_client, dsn, clock, tmp_path, mqtt="embedded", mqtt_port=port)
        n = Node("localhost", port, dev, tok, ca_file=ca)
        assert str(await asyncio.to_thread(n.connect)) == "Success"
        await asyncio.to_thread(n.close)
        assert srv.app[VERIFIER].bcrypt_checks == (1 if start == 0 else 0)
        await srv.close()


async def test_the_fast_check_is_useless_without_the_key_and_for_another_row(
    aiohttp_client, dsn, clock, tmp_path
):
    """A database reader or writer: the stored value is an HMAC under a key outside the
    database. A server with another key falls back to bcrypt (and still admits the right
    secret); a fast check copied onto another token's row admits nothing."""
    w = await make_world(dsn, test_config(clock), ("fridge01", "fridge02"))
    first = await _start(aiohttp_client, dsn, clock, tmp_path)
    r = await first.post("/v1/ingest", json=reading(), headers=w.dev_auth("fridge01"))
    assert r.status == 200
    await first.close()
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT fast_check FROM tokens WHERE device_id = %s", (w.device_ids["fridge01"],)
        )
        (mac,) = await cur.fetchone()
        assert mac is not None and len(bytes(mac)) == 32
        # the attacker copies fridge01's fast check onto fridge02's token row
        await conn.execute(
            "UPDATE tokens SET fast_check = %s WHERE device_id = %s",
            (mac, w.device_ids["fridge02"]),
        )
    other_key = await _start(
        aiohttp_client, dsn, clock, tmp_path / "elsewhere", token_mac_key="ab" * 32
    )
    r = await other_key.post("/v1/ingest", json=reading(), headers=w.dev_auth("fridge01"))
    assert r.status == 200  # still admitted, by bcrypt
    assert other_key.app[VERIFIER].bcrypt_checks == 1
    await other_key.close()

    same_key = await _start(aiohttp_client, dsn, clock, tmp_path)
    # fridge02's key_id, a wrong secret (upper case is outside the token alphabet, so it
    # can never be the right one by chance)
    forged = w.devices["fridge02"][:-4] + "ZZZZ"
    r = await same_key.post(
        "/v1/ingest", json=reading("fridge02"), headers={"Authorization": f"Bearer {forged}"}
    )
    assert r.status == 401
    r = await same_key.post("/v1/ingest", json=reading("fridge02"), headers=w.dev_auth("fridge02"))
    assert r.status == 200  # the copied value is simply not this row's: bcrypt decides


async def test_a_flood_of_wrong_secrets_costs_a_bounded_number_of_bcrypt_checks(
    aiohttp_client, dsn, clock, tmp_path
):
    """Knowing a device's key_id (it is in every token), an attacker sends 40 different
    wrong secrets. Each used to cost a full bcrypt check; now a key_id gets FAIL_BUDGET
    of them a minute, every answer stays 401, and the device itself, admitted before,
    still gets in through its fast check after a restart."""
    w = await make_world(dsn, test_config(clock), ("fridge01",))
    first = await _start(aiohttp_client, dsn, clock, tmp_path)
    r = await first.post("/v1/ingest", json=reading(), headers=w.dev_auth("fridge01"))
    assert r.status == 200
    await first.close()

    srv = await _start(aiohttp_client, dsn, clock, tmp_path)
    good = w.devices["fridge01"]
    for i in range(40):
        bad = good[: -len(str(i)) - 1] + "X" + str(i)  # X: never the right secret
        r = await srv.post("/v1/ingest", json=reading(), headers={"Authorization": f"Bearer {bad}"})
        assert r.status == 401
        assert (await r.json())["error"]["code"] == "token_invalid"
    assert srv.app[VERIFIER].bcrypt_checks <= 5
    r = await srv.post("/v1/ingest", json=reading(), headers=w.dev_auth("fridge01"))
    assert r.status == 200  # the live device is not locked out by the flood
    clock.advance(minutes=2)  # the budget is per minute: bcrypt answers again afterwards
    before = srv.app[VERIFIER].bcrypt_checks
    r = await srv.post(
        "/v1/ingest", json=reading(), headers={"Authorization": f"Bearer {good[:-2]}YY"}
    )
    assert r.status == 401 and srv.app[VERIFIER].bcrypt_checks == before + 1


class SlowBcrypt:
    """bcrypt.checkpw, slowed down and watched: how many run at once."""

    def __init__(self, real: Any, delay: float = 0.05) -> None:
        self.real, self.delay, self.running, self.most = real, delay, 0, 0
        self.lock = threading.Lock()

    def __call__(self, secret: bytes, hashed: bytes) -> bool:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            time.sleep(self.delay)
            return bool(self.real(secret, hashed))
        finally:
            with self.lock:
                self.running -= 1


async def test_first_uses_after_a_restart_never_run_bcrypt_on_every_core(
    aiohttp_client, dsn, clock, tmp_path, monkeypatch
):
    """12 devices never seen (no fast check yet) arrive at once. bcrypt used to run on
    the default thread pool (up to cores + 4 at once, every core busy, ingest starved);
    now it runs on OPENSENSE_BCRYPT_WORKERS threads (1 by default)."""
    devs = tuple(f"fridge{i:02d}" for i in range(12))
    w = await make_world(dsn, test_config(clock), devs)
    slow = SlowBcrypt(tokens.bcrypt.checkpw)
    monkeypatch.setattr(tokens.bcrypt, "checkpw", slow)
    srv = await _start(aiohttp_client, dsn, clock, tmp_path)

    async def device(d: str) -> int:
        for _ in range(50):  # as a node does: come back after a 503
            r = await srv.post("/v1/ingest", json=reading(d), headers=w.dev_auth(d))
            if r.status != 503:
                return r.status
            await asyncio.sleep(0.05)
        return 503

    assert await asyncio.gather(*(device(d) for d in devs)) == [200] * len(devs)
    assert slow.most == 1


async def test_too_many_waiting_bcrypt_checks_get_503_not_an_endless_queue(
    aiohttp_client, dsn, clock, tmp_path, monkeypatch
):
    """When more first uses wait than bcrypt finishes in about MAX_WAIT_S, the next is
    told to come back (503, the envelope, Retry-After) instead of piling up behind
    bcrypt, each request holding one of the pool's connections while it waits (on main
    all of them: admitted devices waited for a connection too). Here bcrypt takes 0.2 s
    and the wait allowed is tiny, so at most 2 are pending."""
    devs = tuple(f"fridge{i:02d}" for i in range(8))
    w = await make_world(dsn, test_config(clock), devs)
    monkeypatch.setattr(tokens.bcrypt, "checkpw", SlowBcrypt(tokens.bcrypt.checkpw, 0.2))
    monkeypatch.setattr(tokens, "MAX_WAIT_S", 0.001)
    srv = await _start(aiohttp_client, dsn, clock, tmp_path)
    rs = await asyncio.gather(
        *(srv.post("/v1/ingest", json=reading(d), headers=w.dev_auth(d)) for d in devs)
    )
    statuses = sorted(r.status for r in rs)
    assert 200 in statuses and 503 in statuses and set(statuses) <= {200, 503}
    refused = next(r for r in rs if r.status == 503)
    assert (await refused.json())["error"]["code"] == "unavailable"
    assert refused.headers["Retry-After"] == "5"
    # and they get in when they come back
    for d in devs:
        r = await srv.post("/v1/ingest", json=reading(d), headers=w.dev_auth(d))
        assert r.status == 200


async def test_a_rotated_token_stops_at_once_in_every_process_fast_checks_or_not(
    dsn, server_processes, tmp_path
):
    """The fast check lives in the shared database: process A stores it, both processes
    restart, B rotates. The old token must fail at once on both (the row's revoked_at is
    read every time), the new one works on both, and a process started after the
    rotation refuses the old one too."""
    env = {"OPENSENSE_STATE_DIR": str(tmp_path), "OPENSENSE_TOKEN_MAC_KEY": ""}
    world = await make_world(dsn, test_config(FakeClock(datetime.now(UTC))))
    old = {"Authorization": f"Bearer {world.devices['fridge01']}"}
    a = server_processes(**env)
    # no keep-alive: a connection must not outlive the process it went to
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
        async with http.post(a.url + "/v1/ingest", json=reading(), headers=old) as r:
            assert r.status == 200
        a.stop()
        a.start()
        b = server_processes(**env)
        for s in (a, b):  # both admit it from the stored fast check
            async with http.post(s.url + "/v1/ingest", json=reading(), headers=old) as r:
                assert r.status == 200
        async with http.post(
            f"{b.url}/v1/devices/{world.device_ids['fridge01']}/rotate-token", headers=world.auth
        ) as r:
            new = {"Authorization": f"Bearer {(await r.json())['ingest_token']}"}
        for s in (a, b):
            async with http.post(s.url + "/v1/ingest", json=reading(), headers=old) as r:
                assert r.status == 401
            async with http.post(s.url + "/v1/ingest", json=reading(), headers=new) as r:
                assert r.status == 200
        a.stop()
        a.start()
        async with http.post(a.url + "/v1/ingest", json=reading(), headers=old) as r:
            assert r.status == 401
        async with http.post(a.url + "/v1/ingest", json=reading(), headers=new) as r:
            assert r.status == 200


def test_the_fast_check_key_lives_outside_the_database_and_only_its_owner_reads_it(tmp_path):
    key = tokens.load_mac_key("", tmp_path / "state")
    path = tmp_path / "state" / tokens.MAC_KEY_FILE
    assert len(key) == 32 and path.stat().st_mode & 0o777 == 0o600
    assert tokens.load_mac_key("", tmp_path / "state") == key  # kept, not made again
    os.chmod(path, 0o644)
    with pytest.raises(ValueError, match="readable by others"):
        tokens.load_mac_key("", tmp_path / "state")
    with pytest.raises(ValueError, match="at least 32 bytes"):
        tokens.load_mac_key("abcd", tmp_path)


# --- item 17: secrets in the request log ---------------------------------------------


async def test_the_request_log_keeps_no_token_however_it_is_spelled(client, world: World, dsn):
    """`%74oken=` is the `token` parameter to aiohttp, and the Shelly door accepts it; the
    log used to redact only the literal `token=` (so this one was stored in clear), and no
    gw_ token anywhere."""
    tok = world.devices["fridge01"]
    gw = tokens.generate("gw", 4).plaintext
    secrets_ = [tok.rsplit("_", 1)[1], gw.rsplit("_", 1)[1]]
    encoded = "".join(f"%{ord(c):02X}" for c in gw)

    async def raw_get(path_qs: str) -> int:
        # as sent, byte for byte: yarl would otherwise normalize %74 to t on our side
        url = URL(str(client.make_url("/")).rstrip("/") + path_qs, encoded=True)
        async with client.session.get(url) as r:
            return r.status

    # the server decodes name and value: this is the device's own, valid token
    enc_tok = "%64" + tok[1:]
    assert await raw_get(f"/v1/ingest/shelly?%74oken={enc_tok}&device=fridge01&temp=banana") == 400
    await raw_get(f"/v1/ingest/shelly?%54OKEN={enc_tok}&temp=4")
    # "no device <the gw_ token>": the reason names it
    assert await raw_get(f"/v1/ingest/shelly?token={tok}&device={gw}&temp=4.5") == 404
    assert await raw_get(f"/v1/ingest/shelly?t={encoded}&token={gw}&temp=4.5") == 401
    await raw_get(f"/v1/nothing/{gw}")
    await client.app[REQUEST_LOG].flush()
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute("SELECT path, coalesce(reason, '') FROM request_log")
        rows = await cur.fetchall()
    assert len(rows) >= 5
    for path, reason in rows:
        for s in secrets_:
            assert s not in path and s not in reason, (path, reason)
        assert "%5F" not in path  # the percent-encoded gw_ token went too
    assert any("%74oken=REDACTED" in p for p, _ in rows)
    assert any("%54OKEN=REDACTED" in p for p, _ in rows)
    assert any("gw_REDACTED" in r for _, r in rows)


# --- item 19 (EMQX half): a rotation kicks the live EMQX session ----------------------


class EmqxDouble:
    """EMQX 5's REST API as far as OpenSense uses it: DELETE /api/v5/clients/{clientid}
    with HTTP basic auth (API key and secret): 204 kicked, 404 not connected, 401 wrong
    key. https://docs.emqx.com/en/emqx/v5.0/admin/api.html"""

    KEY, SECRET = "opensense-kicker", "emqx-api-secret"

    def __init__(self) -> None:
        self.connected: set[str] = set()
        self.calls: list[tuple[str, str, int]] = []
        self.app = web.Application()
        self.app.router.add_delete("/api/v5/clients/{clientid}", self.kick)

    async def kick(self, request: web.Request) -> web.Response:
        client_id = request.match_info["clientid"]
        want = aiohttp.encode_basic_auth(self.KEY, self.SECRET)
        if request.headers.get("Authorization") != want:
            status = 401
        elif client_id in self.connected:
            self.connected.discard(client_id)
            status = 204
        else:
            status = 404
        self.calls.append(("DELETE", client_id, status))
        if status == 204:
            return web.Response(status=204)
        code = "BAD_API_KEY_OR_SECRET" if status == 401 else "CLIENTID_NOT_FOUND"
        return web.json_response({"code": code, "message": code}, status=status)


EMQX_H = {"Authorization": "Bearer emqx-shared-secret"}


async def test_rotation_kicks_the_live_emqx_session(aiohttp_client, aiohttp_server, dsn, clock):
    """EMQX asks OpenSense only at CONNECT: a session opened with a token lived on after
    its rotation. Now every rotation (and delete) kicks it through EMQX's REST API."""
    emqx = EmqxDouble()
    srv = await aiohttp_server(emqx.app)
    cfg = test_config(
        clock,
        emqx_secret="emqx-shared-secret",
        emqx_api_url=f"http://127.0.0.1:{srv.port}/api/v5",
        emqx_api_key=EmqxDouble.KEY,
        emqx_api_secret=EmqxDouble.SECRET,
    )
    app = await aiohttp_client(create_app(cfg, dsn))
    w = await make_world(dsn, test_config(clock), ("fridge01", "fridge02"))
    dev, tok = w.device_ids["fridge01"], w.devices["fridge01"]
    r = await app.post(
        "/v1/mqtt/emqx/authn",
        json={"username": dev, "password": tok, "clientid": dev},
        headers=EMQX_H,
    )
    assert (await r.json())["result"] == "allow"
    emqx.connected.add(dev)  # EMQX now holds the device's session

    r = await app.post(f"/v1/devices/{dev}/rotate-token", headers=w.auth)
    assert r.status == 200
    for _ in range(100):
        if emqx.calls:
            break
        await asyncio.sleep(0.05)
    assert emqx.calls == [("DELETE", dev, 204)]
    assert dev not in emqx.connected
    # the device reconnects with the old token and is refused
    r = await app.post(
        "/v1/mqtt/emqx/authn",
        json={"username": dev, "password": tok, "clientid": dev},
        headers=EMQX_H,
    )
    assert (await r.json())["result"] == "deny"

    # deleting a device kicks too (404: it was not connected, which is fine)
    r = await app.delete(f"/v1/devices/{w.device_ids['fridge02']}", headers=w.auth)
    assert r.status in (200, 204)
    for _ in range(100):
        if len(emqx.calls) == 2:
            break
        await asyncio.sleep(0.05)
    assert emqx.calls[1] == ("DELETE", w.device_ids["fridge02"], 404)


async def test_emqx_connect_under_another_client_id_is_refused(aiohttp_client, dsn, clock):
    """The kick names the client id. A device's token used under any other client id
    would hold a session no kick reaches, so EMQX's CONNECT is allowed only as the
    device's own id."""
    app = await aiohttp_client(
        create_app(test_config(clock, emqx_secret="emqx-shared-secret"), dsn)
    )
    w = await make_world(dsn, test_config(clock), ("fridge01",))
    dev, tok = w.device_ids["fridge01"], w.devices["fridge01"]
    for clientid in ("sneaky", dev + "x"):
        r = await app.post(
            "/v1/mqtt/emqx/authn",
            json={"username": dev, "password": tok, "clientid": clientid},
            headers=EMQX_H,
        )
        assert (await r.json())["result"] == "deny", clientid
