"""The real firmware on the MicroPython unix port (simulated board) against the real
server and its embedded TLS broker: readings arrive, commands work, certificates are
checked, a broker that drops PUBACKs or restarts mid-replay leaves no gap."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from opensense.api.keys import MQTT
from opensense.node.sim import rom

from .fixtures.firmware import assert_exactly_once, node_config, rows, wait_for
from .fixtures.processes import free_port
from .fixtures.server import World, make_world

# every test runs the real firmware beside a server: once, on the embedded PostgreSQL
pytestmark = [pytest.mark.db, pytest.mark.e2e]


async def test_node_reports_over_tls_mqtt_and_obeys_commands(fw_app, dsn, clock, sim_nodes):
    world = await make_world(dsn, fw_app.cfg, ("fridge01",))
    r1, r2, r3 = rom(1), rom(2), rom(3)
    epoch0 = int((clock.now - timedelta(hours=1)).timestamp())
    n = sim_nodes(
        "n1",
        node_config(fw_app, world, "fridge01", {r1: "front", r2: "back", r3: "door"}),
        fw_app.tls.ca_der(),
        {
            "speed": 60,
            "epoch0": epoch0,
            "probes": [
                {"rom": r1, "temp": 3.5},
                {"rom": r2, "temp": -1.25, "fault": "flaky"},  # 2 bad CRCs, then good
                {"rom": r3, "temp": 5.0, "fault": "absent"},
            ],
        },
    )
    n.start()

    async def five() -> Any:
        got = await rows(dsn, world)
        return got if len([g for g in got if g[0] == "front"]) >= 5 else None

    got = await wait_for(five, what=lambda: "5 readings: " + n.console()[-3000:])
    assert {v for label, _, v in got if label == "front"} == {3.5}
    assert {v for label, _, v in got if label == "back"} == {-1.25}  # retried past bad CRCs
    assert not [g for g in got if g[0] == "door"]  # absent: never a temperature
    fronts = [ts for label, ts, _ in got if label == "front"]
    assert all(abs(ts.timestamp() - epoch0) < 3 * 3600 for ts in fronts)

    # info and lwt (retained) reached the device row
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT info, connected FROM devices WHERE id = %s", (world.device_ids["fridge01"],)
        )
        info, connected = await cur.fetchone()  # type: ignore[misc]
    assert info["fw_version"] and info["model"] == "sim_unix" and connected is True
    assert info["reset_cause"] == "power_on" and info["probes"]["door"] == "absent"

    # health as auxiliary measurements: the absent probe's error counter rises
    health = await wait_for(
        lambda: rows(dsn, world, "health"), what=lambda: "health rows: " + n.console()[-2000:]
    )
    labels = {label for label, _, _ in health}
    assert {"uptime", "boots", "heap_free", "queue_depth", "drops", "oldest_unsent"} <= labels
    # the IDF heap's largest free block (issue 17 item 4), the sim's plausible figure
    assert {v for label, _, v in health if label == "idf_largest"} == {30720}
    assert max(v for label, _, v in health if label == "probe_errors_door") >= 1
    # the first health record is taken at boot, before the Wi-Fi join ends: no RSSI yet
    await wait_for(lambda: rows(dsn, world, "signal"), what=lambda: n.console()[-2000:])

    # commands through the management API: identify blinks, cadence changes
    dev = world.device_ids["fridge01"]
    r = await fw_app.post(f"/v1/devices/{dev}/identify", headers=world.auth)
    assert r.status == 202
    r = await fw_app.patch(f"/v1/devices/{dev}", headers=world.auth, json={"cadence_s": 120})
    assert r.status == 200, await r.text()

    async def obeyed() -> bool:
        ev = n.events()
        return any(e.endswith(" identify") for e in ev) and any(
            e.endswith("cadence 120") for e in ev
        )

    await wait_for(obeyed, what=lambda: "\n".join(n.events()[-20:]))
    assert any(e.endswith("led 1") for e in n.events())
    n.stop()
    assert_exactly_once(n, await rows(dsn, world))


class LossyLink:
    """A TCP relay between a node and the broker that can lose the broker's answers:
    `lose` replies are dropped and the link cut right after (the broker has stored the
    batch, its PUBACK never arrives); `mute` replies are swallowed with the link left
    open (the node's read times out). The TLS stream is end to end: the relay cannot
    read it, only drop it, as a flaky Wi-Fi would."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.lose = 0
        self.mute = 0
        self.lost = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _conn(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            w.close()
            return
        state = {"sent": 0, "t0": time.monotonic()}

        async def up() -> None:
            while data := await r.read(65536):
                state["sent"] += len(data)
                uw.write(data)
                await uw.drain()
            uw.close()

        async def down() -> None:
            while data := await ur.read(65536):
                # only answers to a batch (a big client write on a link that has been up a
                # while) are lost, not the handshake or the CONNACK
                settled = time.monotonic() - state["t0"] > 0.5
                if settled and state["sent"] > 300 and (self.lose or self.mute):
                    self.lost += 1
                    if self.mute:
                        self.mute -= 1
                        state["sent"] = 0
                        continue
                    self.lose -= 1
                    break
                state["sent"] = 0
                w.write(data)
                await w.drain()
            w.close()
            uw.close()

        await asyncio.gather(up(), down(), return_exceptions=True)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()


@pytest.mark.e2e
async def test_lost_pubacks_and_a_broker_restart_mid_replay_leave_no_gap(
    fw_app, dsn, clock, sim_nodes
):
    """The broker's PUBACKs get lost (once the link stays up and the node's read times
    out, three times the link drops after the broker stored the batch), then the broker
    restarts twice in the middle of replaying a backlog. The node resends; the server
    keeps one row per reading and no reading is missing."""
    world = await make_world(dsn, fw_app.cfg, ("fridge01",))
    link = LossyLink(fw_app.cfg.mqtt_port)
    await link.start()
    r1, r2 = rom(11), rom(12)
    epoch0 = int((clock.now - timedelta(hours=3)).timestamp())
    n = sim_nodes(
        "n1",
        node_config(fw_app, world, "fridge01", {r1: "front", r2: "back"}),
        fw_app.tls.ca_der(),
        {
            "speed": 120,
            "epoch0": epoch0,
            "probes": [{"rom": r1, "temp": 3.0, "amp": 1.5}, {"rom": r2, "temp": 4.0, "amp": 1}],
        },
    )
    cfg = node_config(fw_app, world, "fridge01", {r1: "front", r2: "back"})
    cfg["server"]["mqtt_port"] = link.port  # through the lossy relay
    (n.dir / "config.json").write_text(json.dumps(cfg))
    n.start()
    await wait_for(lambda: _more(dsn, world, 4), what=lambda: n.console()[-2000:])
    # a backlog builds while the broker is away (10 virtual minutes)
    broker = fw_app.app[MQTT]
    await broker.stop()
    await asyncio.sleep(5)
    link.mute, link.lose = 1, 3
    await broker.start()

    async def lost_all() -> bool:
        await asyncio.sleep(0.1)
        return link.lose == 0 and link.mute == 0

    await wait_for(lost_all, what=lambda: n.console()[-2000:])
    # another backlog, and the broker restarts twice while the node replays it
    await broker.stop()
    await asyncio.sleep(5)
    await broker.start()
    await asyncio.sleep(0.3)
    await broker.stop()
    await asyncio.sleep(1)
    await broker.start()
    await asyncio.sleep(0.5)
    await broker.stop()
    await asyncio.sleep(1)
    await broker.start()

    async def drained() -> bool:
        got = await rows(dsn, world)
        taken = n.samples()
        return len(got) >= 2 * (len(taken) - 2) and len(taken) > 60

    await wait_for(drained, within=90, what=lambda: n.console()[-2000:])
    n.stop()
    await link.stop()
    failed = [e for e in n.events() if "send failed" in e or "connect failed" in e]
    assert len([e for e in failed if "send failed" in e]) >= 3, failed  # PUBACKs were lost
    assert not [e for e in n.events() if "wdt_starved" in e]
    count = assert_exactly_once(n, await rows(dsn, world))
    assert count >= 100


async def test_a_cadence_changed_while_the_broker_was_away_reaches_the_node(
    fw_app, dsn, clock, sim_nodes
):
    """The operator changes the cadence while the broker is away: its retained command
    reaches no broker (the PATCH answers 200, the change is committed), and the
    embedded broker starts again without retained messages. The node's info on its
    next connect reports the old cadence; the server sends the device's again and the
    node takes it (docs/mqtt.md, "Commands")."""
    world = await make_world(dsn, fw_app.cfg, ("fridge01",))
    r1 = rom(21)
    n = sim_nodes(
        "n1",
        node_config(fw_app, world, "fridge01", {r1: "front"}),
        fw_app.tls.ca_der(),
        {
            "speed": 60,
            "epoch0": int((clock.now - timedelta(hours=1)).timestamp()),
            "probes": [{"rom": r1, "temp": 3.5}],
        },
    )
    n.start()
    await wait_for(lambda: _more(dsn, world, 1), what=lambda: n.console()[-2000:])
    broker = fw_app.app[MQTT]
    await broker.stop()
    dev = world.device_ids["fridge01"]
    r = await fw_app.patch(f"/v1/devices/{dev}", headers=world.auth, json={"cadence_s": 120})
    assert r.status == 200, await r.text()
    assert not [e for e in n.events() if e.endswith("cadence 120")]
    await broker.start()

    async def obeyed() -> bool:
        await asyncio.sleep(0.1)
        return any(e.endswith("cadence 120") for e in n.events())

    await wait_for(obeyed, what=lambda: "\n".join(n.events()[-20:]))
    n.stop()


async def _more(dsn: str, world: World, k: int) -> bool:
    return len(await rows(dsn, world)) >= k


async def test_https_fallback_when_the_mqtt_port_is_blocked(fw_app, dsn, clock, sim_nodes):
    """MQTT unreachable (a guest network blocking 8883): after 3 failed connects the
    node posts its batches to POST /v1/ingest over HTTPS (urequests, CA verified)."""
    import ssl

    from aiohttp import web

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(fw_app.tls.server_cert), str(fw_app.tls.server_key))
    port = free_port()
    site = web.TCPSite(fw_app.server.runner, "127.0.0.1", port, ssl_context=ctx)
    await site.start()
    world = await make_world(dsn, fw_app.cfg, ("fridge01",))
    r1 = rom(31)
    cfg = node_config(fw_app, world, "fridge01", {r1: "front"})
    cfg["server"].update(mqtt_port=free_port(), https_url=f"https://localhost:{port}")
    n = sim_nodes(
        "n1",
        cfg,
        fw_app.tls.ca_der(),
        {
            "speed": 60,
            "epoch0": int((clock.now - timedelta(hours=1)).timestamp()),
            "probes": [{"rom": r1, "temp": 2.5}],
        },
    )
    n.start()

    async def five() -> Any:
        got = await rows(dsn, world)
        return got if len(got) >= 5 else None

    await wait_for(five, what=lambda: n.console()[-2000:] + "\n".join(n.events()[-10:]))
    assert any(e.endswith("connected https") for e in n.events())
    n.stop()
    await site.stop()
    assert_exactly_once(n, await rows(dsn, world))


async def test_boot_loop_falls_back_to_safe_mode(fw_app, dsn, clock, sim_nodes):
    world = await make_world(dsn, fw_app.cfg, ("fridge01",))
    n = sim_nodes(
        "n1",
        node_config(fw_app, world, "fridge01", {rom(41): "front"}),
        fw_app.tls.ca_der(),
        {"crash": True, "probes": [{"rom": rom(41), "temp": 1.0}]},
    )
    n.start()

    async def safe() -> bool:
        await asyncio.sleep(0.1)
        return any(e.endswith("safe_mode") for e in n.events())

    await wait_for(safe, what=n.console)
    assert n.restarts == 5  # five crashed boots, the sixth stops in safe mode
    assert "safe mode: 5 crashes in a row" in n.console()
    # main.py returned: the REPL is free for mpremote, with the watchdog re-timed to
    # end safe mode (tests/test_firmware_board.py: it does, and the app is tried again)
    await wait_for(lambda: asyncio.sleep(0.1, n.parked == 1), what=n.console)
    assert not n.stuck


async def test_boots_with_no_access_point_and_dates_its_readings_once_ntp_answers(
    fw_app, dsn, clock, sim_nodes
):
    """No Wi-Fi at boot: the node samples anyway, with uptime for a clock; when the
    network comes, NTP answers and those readings get their true time."""
    world = await make_world(dsn, fw_app.cfg, ("fridge01",))
    r1 = rom(51)
    n = sim_nodes(
        "n1",
        node_config(fw_app, world, "fridge01", {r1: "front"}),
        fw_app.tls.ca_der(),
        {
            "speed": 120,
            "wifi": False,
            "epoch0": int((clock.now - timedelta(hours=1)).timestamp()),
            "probes": [{"rom": r1, "temp": 6.0, "amp": 2, "period": 1200}],
        },
    )
    n.start()

    async def untimed() -> bool:
        await asyncio.sleep(0.2)
        return len([s for s in n.samples() if s[1] < 0]) >= 5

    await wait_for(untimed, what=n.console)
    assert not await rows(dsn, world)
    n.set(wifi=True)

    async def all_there() -> bool:
        return len(await rows(dsn, world)) >= len(n.samples()) - 1 >= 6

    await wait_for(all_there, what=lambda: n.console()[-2000:])
    n.stop()
    assert_exactly_once(n, await rows(dsn, world))  # incl. the ones taken before NTP


class Blackhole:
    """A TCP relay node <-> broker that can turn into a black hole: nothing more passes
    either way and the broker's side is never closed, whatever the node's side does.
    That is a power cut (or a dead access point) as the broker sees it: no FIN, no RST,
    just silence."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.hole = False
        self.server: asyncio.Server | None = None
        self.port = 0
        self.held: list[asyncio.StreamWriter] = []

    async def start(self, port: int = 0) -> None:
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _conn(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            w.close()
            return
        self.held.append(uw)

        async def pipe(a: asyncio.StreamReader, b: asyncio.StreamWriter, upstream: bool) -> None:
            while data := await a.read(65536):
                if self.hole:
                    continue
                b.write(data)
                await b.drain()
            if not (self.hole and upstream):
                b.close()

        await asyncio.gather(pipe(r, uw, True), pipe(ur, w, False), return_exceptions=True)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for w in self.held:
            w.close()


async def _connected(dsn: str, world: World) -> bool | None:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT connected FROM devices WHERE id = %s", (world.device_ids["fridge01"],)
        )
        row = await cur.fetchone()
    return None if row is None else row[0]


async def test_a_power_cut_shows_the_node_offline_within_its_keepalive(
    fw_app, dsn, clock, sim_nodes
):
    """MQTT 3.1.1 §3.1.2.10: the node promises a packet every `mqtt_keepalive` s and
    pings when idle, so the broker keeps an idle node; when the node loses power (its
    connection left open, nothing more on it) the broker cuts it after 1.5x that and
    publishes its will: the server shows it offline. With no keepalive (the firmware
    before) it stayed online for good."""
    world = await make_world(dsn, fw_app.cfg, ("fridge01",))
    link = Blackhole(fw_app.cfg.mqtt_port)
    await link.start()
    r1 = rom(61)
    cfg = node_config(fw_app, world, "fridge01", {r1: "front"}, mqtt_keepalive=4, cadence=600)
    cfg["server"]["mqtt_port"] = link.port
    n = sim_nodes(
        "n1",
        cfg,
        fw_app.tls.ca_der(),
        {"speed": 1, "epoch0": int(clock.now.timestamp()), "probes": [{"rom": r1, "temp": 3.0}]},
    )
    n.start()

    async def online() -> bool:
        return await _connected(dsn, world) is True

    await wait_for(online, what=lambda: n.console()[-2000:])
    # idle (next reading in 10 minutes) for 3x the keepalive: pings keep it connected
    await asyncio.sleep(12)
    assert await _connected(dsn, world) is True
    assert len([e for e in n.events() if e.endswith("connected mqtt")]) == 1, n.events()
    # power cut: the node dies, its TCP connection is left open and silent
    link.hole = True
    n.stop()
    cut = time.monotonic()

    async def offline() -> bool:
        await asyncio.sleep(0.2)
        return await _connected(dsn, world) is False

    await wait_for(offline, within=20, what=lambda: "still online")
    assert time.monotonic() - cut <= 4 * 1.5 + 3  # 1.5x keepalive, plus the loop's slack
    await link.stop()


async def test_the_https_fallback_is_not_for_good(fw_app, dsn, clock, sim_nodes):
    """The MQTT port is blocked at first, the node falls back to HTTPS; once MQTT is
    reachable again the node goes back to it within `mqtt_retry_s` (it tries MQTT on a
    schedule), and no reading is lost or doubled on the way."""
    import ssl

    from aiohttp import web

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(fw_app.tls.server_cert), str(fw_app.tls.server_key))
    port = free_port()
    site = web.TCPSite(fw_app.server.runner, "127.0.0.1", port, ssl_context=ctx)
    await site.start()
    world = await make_world(dsn, fw_app.cfg, ("fridge01",))
    r1 = rom(71)
    mqtt_port = free_port()  # nothing listens there yet
    cfg = node_config(fw_app, world, "fridge01", {r1: "front"}, mqtt_retry_s=120)
    cfg["server"].update(mqtt_port=mqtt_port, https_url=f"https://localhost:{port}")
    n = sim_nodes(
        "n1",
        cfg,
        fw_app.tls.ca_der(),
        {
            "speed": 60,
            "epoch0": int((clock.now - timedelta(hours=1)).timestamp()),
            "probes": [{"rom": r1, "temp": 2.5}],
        },
    )
    n.start()

    async def on_https() -> bool:
        await asyncio.sleep(0.1)
        return any(e.endswith("connected https") for e in n.events())

    await wait_for(on_https, what=lambda: n.console()[-2000:])
    link = Blackhole(fw_app.cfg.mqtt_port)  # the MQTT port opens: a relay to the broker
    await link.start(mqtt_port)

    async def on_mqtt() -> bool:
        await asyncio.sleep(0.1)
        return any(e.endswith("connected mqtt") for e in n.events())

    await wait_for(on_mqtt, what=lambda: "\n".join(n.events()[-20:]))

    async def five_more() -> bool:
        return len(await rows(dsn, world)) >= 10

    await wait_for(five_more, what=lambda: n.console()[-2000:])
    n.stop()
    await site.stop()
    await link.stop()
    assert_exactly_once(n, await rows(dsn, world))


async def test_a_refused_reading_is_counted_and_costs_no_other_reading(
    fw_app, dsn, clock, sim_nodes
):
    """The node reads …/err. A backlog goes out as one batch in which the later
    readings are more than 5 minutes ahead of the server's clock: the server refuses
    the whole batch (and acknowledges it: a 4xx is never worth a retry). The node then
    sends those records one by one: the good ones are stored, each bad one is dropped
    (never retried for ever, never blocking the queue) and counted in health
    (`refused`). Before, the whole batch was acknowledged and silently lost."""
    world = await make_world(dsn, fw_app.cfg, ("fridge01",))
    r1 = rom(81)
    start = clock.now
    n = sim_nodes(
        "n1",
        node_config(fw_app, world, "fridge01", {r1: "front"}),
        fw_app.tls.ca_der(),
        {"speed": 60, "epoch0": int(start.timestamp()), "probes": [{"rom": r1, "temp": 5.0}]},
    )
    n.start()
    await wait_for(lambda: _more(dsn, world, 2), what=lambda: n.console()[-2000:])
    broker = fw_app.app[MQTT]
    await broker.stop()
    await asyncio.sleep(12)  # 12 virtual minutes of backlog
    taken = n.samples()
    # the server's clock stands 6 minutes after the first held reading: the readings
    # taken more than 5 minutes after that one (11 minutes after) are "in the future"
    got_before = {ts for _, ts, _ in await rows(dsn, world)}
    held = [s for s in taken if datetime.fromtimestamp(s[1], UTC) not in got_before]
    assert len(held) >= 8, held
    clock.now = datetime.fromtimestamp(held[0][1] + 6 * 60, UTC)
    limit = clock.now.timestamp() + 300
    await broker.start()

    async def refused() -> bool:
        await asyncio.sleep(0.2)
        return len([e for e in n.events() if " refused record " in e]) >= 2

    await wait_for(refused, what=lambda: "\n".join(n.events()[-30:]))
    assert any(" refused batch out_of_range" in e for e in n.events()), n.events()[-30:]
    got = {ts.timestamp() for _, ts, _ in await rows(dsn, world)}
    good = [s[1] for s in held if s[1] <= limit]
    assert good and all(t in got for t in good), (good, sorted(got)[-10:])
    # the clock catches up: the queue was never blocked, readings arrive again, and
    # health reports the refused ones
    clock.now = datetime.fromtimestamp(n.samples()[-1][3], UTC)

    async def counted() -> Any:
        h = await rows(dsn, world, "health")
        return [v for label, _, v in h if label == "refused" and v >= 2]

    async def tick() -> Any:
        clock.now = datetime.fromtimestamp(n.samples()[-1][3], UTC)
        return await counted()

    await wait_for(tick, within=90, what=lambda: "\n".join(n.events()[-30:]))
    n.stop()
