"""Bench-rig scenarios (issue 17 items 13-14), written once against `hil.rig.Rig` and
asserting on the server: every reading once, in order, at the node's time; health
consistent; no watchdog starvation.

The rig is the virtual one (the real firmware on the MicroPython unix port behind a
link proxy, a fast clock), or the real one when OPENSENSE_RIG names a rig.toml
(docs/bench-rig.md). The scenarios are mostly waiting, so they run concurrently: one
module-scoped event loop, each scenario its own server (its own embedded broker, its
clock at its nodes' speed) and its own rig, started together as tasks when the module
starts; each test awaits its own. They are marked `hil`: the main pass skips them and
tools/test.sh runs `pytest -m hil tests/test_hil.py` beside it (tests/conftest.py).

The real rig's own code runs in the main pass against a fake serial port and a fake
power switch (the last test of this file)."""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestServer

from hil.rig import RealConfig, RealRig, Rig, rig_from_env
from opensense.api.keys import MQTT
from opensense.app import create_app
from opensense.devices import store as devices
from opensense.mqtt.ca import TlsFiles
from opensense.node.sim import rom

from .fixtures.clock import FollowingClock
from .fixtures.firmware import node_config
from .fixtures.processes import free_port
from .fixtures.server import make_world, test_config

Scenario = Callable[["Bench"], Awaitable[None]]
SCENARIOS: dict[str, Scenario] = {}
# Scenarios a virtual rig cannot run, with the reason (docs/bench-rig.md lists them)
REAL_RIG_ONLY: dict[str, str] = {}


def scenario(fn: Scenario) -> Scenario:
    SCENARIOS[fn.__name__] = fn
    return fn


class Bench:
    """One scenario's world: a server (its clock at the nodes' speed, its embedded
    broker), a rig, the devices of one account."""

    def __init__(self, dsn: str, root: Path, speed: float, behind_h: float) -> None:
        self.dsn, self.root = dsn, root
        self.rig: Rig
        self.real = bool(os.environ.get("OPENSENSE_RIG"))
        self.speed = 1.0 if self.real else speed  # a chip's clock cannot be hurried
        # the nodes' world runs `behind_h` hours behind the server's clock, at its speed
        self.behind = timedelta(hours=behind_h)
        self.clock = FollowingClock(datetime.now(UTC).replace(microsecond=0), self.speed)
        self.cuts: dict[str, list[int]] = {}  # node -> sample counts at each power cut
        self.closed = False

    async def start(self, devs: tuple[str, ...]) -> None:
        os.chmod(self.root, 0o755)
        self.cfg = test_config(
            self.clock,
            mqtt="embedded",
            mqtt_port=free_port(),
            state_dir=self.root,
            ingest_rate_per_min=100_000,
            pool_max=3,  # a dozen servers at once share one PostgreSQL's connections
            alarms_enabled=False,  # no rules here: the engine's polling is CPU for nothing
        )
        self.server = TestServer(create_app(self.cfg, self.dsn))
        await self.server.start_server()
        d = self.root / "mqtt-tls"
        self.tls = TlsFiles(d / "ca.pem", d / "server.pem", d / "server.key")
        self.world = await make_world(self.dsn, self.cfg, devs)
        # one connection for the scenario's many looks at the server's tables
        self.conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
        self.rig = rig_from_env(self.root / "rig", self.cfg.mqtt_port)

    def epoch0(self) -> int:
        return int((self.clock() - self.behind).timestamp())

    def add(self, local_id: str, n: int = 0, probes: int = 2, **ctl: Any) -> tuple[str, ...]:
        roms = tuple(rom(1000 * n + 300 + i) for i in range(probes))
        labels = ("top", "bottom")[:probes]
        world = {
            "speed": self.speed,
            "epoch0": self.epoch0(),
            "probes": [
                {"rom": r, "temp": 3.0 + i, "amp": 1.0, "period": 2400} for i, r in enumerate(roms)
            ],
        }
        world.update(ctl)
        self.rig.add_node(local_id, self.config(local_id, roms, labels), self.tls.ca_der(), world)
        return roms

    def config(
        self, local_id: str, roms: tuple[str, ...], labels: tuple[str, ...], **kw: Any
    ) -> dict[str, Any]:
        # socket timeouts run in real time, the clock fast: 3 s keeps a blackholed
        # connect from costing the loop many sampling ticks, and is what a dozen
        # servers in one busy process need to answer a TLS handshake
        return node_config(
            self, self.world, local_id, dict(zip(roms, labels, strict=True)), io_timeout_s=3, **kw
        )

    async def sleep_node(self, node_s: float) -> None:
        """Let `node_s` seconds of the nodes' time pass."""
        await asyncio.sleep(node_s / self.speed)

    async def stored(self, node: str, kind: str = "temperature") -> list[Any]:
        """(label, ts, value) of the node's channels of one kind, by label and time."""
        cur = await self.conn.execute(
            "SELECT c.label, m.ts, m.value FROM measurements m"
            " JOIN channels c ON c.num = m.channel_num JOIN devices d ON d.id = c.device_id"
            " WHERE c.account_id = %s AND c.kind = %s AND d.local_id = %s"
            " ORDER BY c.label, m.ts",
            (self.world.account, kind, node),
        )
        return [(r[0], r[1], r[2]) for r in await cur.fetchall()]

    async def broker(self, up: bool) -> None:
        """The broker stopped (its listener gone, its sessions dropped) or started."""
        if up:
            await self.server.app[MQTT].start()
        else:
            await self.server.app[MQTT].stop()

    async def until(self, pred: Callable[[], Awaitable[Any]], within: float, what: str) -> Any:
        deadline = time.monotonic() + within
        while True:
            v = await pred()
            if v:
                return v
            if time.monotonic() > deadline:
                tails = {
                    n: (
                        self.rig.console(n)[-800:],
                        [e for e in self.rig.events(n) if " sample " not in e][-12:],
                    )
                    for n in self.world.devices
                    if n in getattr(self.rig, "nodes", {})
                }
                raise AssertionError(f"timed out waiting for {what}: {tails}")
            await asyncio.sleep(0.5)

    async def online(self, node: str, n: int = 2) -> None:
        async def some() -> bool:
            return len(await self.stored(node)) >= n

        await self.until(some, 60, f"{node}'s first readings")

    async def drained(self, node: str, within: float = 90) -> None:
        """The server holds every timed reading the node took (but the last few)."""

        count = [0, 0]

        async def done() -> bool:
            taken = sum(len(v) for _, t, v, _ in self.rig.samples(node) if t > 0)
            count[:] = [len(await self.stored(node)), taken]
            return taken > 0 and count[0] >= taken - 4

        try:
            await self.until(done, within, f"{node}'s queue at the server")
        except AssertionError as e:
            # which readings are missing, for the report
            got = {(lb, int(ts.timestamp())) for lb, ts, _ in await self.stored(node)}
            miss = [
                (seq, t, tt)
                for seq, t, v, tt in self.rig.samples(node)
                if t > 0 and any((lb, t) not in got for lb in v)
            ]
            raise AssertionError(f"stored {count[0]} of {count[1]}; missing {miss[:8]}") from e

    async def power_cut(self, node: str, during: str | None = None) -> None:
        await asyncio.to_thread(self.rig.power_cut, node, during)
        self.cuts.setdefault(node, []).append(len(self.rig.samples(node)))

    async def close(self) -> None:
        """The nodes and the server stopped; the tables stay readable."""
        if not self.closed:
            self.closed = True
            await asyncio.to_thread(self.rig.close)
            await self.server.close()

    def check_once(self, node: str, got: list[Any], lost_ok: int = 0) -> int:
        """The server holds every reading the node took, once, at the node's time, in
        sequence order; only the last `lost_ok` readings before each power cut may be
        missing (the records held in RAM, `batch`, never acknowledged to anyone)."""
        samples = self.rig.samples(node)
        # the node's clock: whole seconds, plus what a loaded host's stall between the
        # node's two clock reads is worth on the fast clock (100 ms here: a dozen
        # scenarios share two cores with the main pass); at most a cadence (60 s): a
        # reading placed after NTP (taken before it) gets its offset from two reads
        tol = min(60.0, max(2.0, self.speed * 0.1))
        late = [(t, true) for _, t, _, true in samples if t > 0 and abs(t - true) > tol]
        assert not late, late[:5]
        in_seq = [t for _, t, _, _ in sorted(samples) if t > 0]
        assert in_seq == sorted(in_seq)  # sequence numbers and time agree
        may_lose = {
            (label, t)
            for cut in self.cuts.get(node, [])
            for _, t, vals, _ in samples[max(0, cut - lost_ok) : cut]
            for label in vals
        }
        taken = {(label, t): v for _, t, vals, _ in samples if t > 0 for label, v in vals.items()}
        stored = {(label, int(ts.timestamp())): v for label, ts, v in got}
        assert len(stored) == len(got)
        extra = sorted(set(stored) - set(taken))
        assert not extra, extra[:5]  # nothing the node did not take
        last = max(t for _, t in stored)
        missing = sorted(k for k in taken if k[1] <= last and k not in stored)
        assert not [k for k in missing if k not in may_lose], missing[:5]
        for k, v in stored.items():
            assert abs(v - taken[k]) < 1e-3, (k, v, taken[k])
        return len(stored)

    async def check_health(self, node: str, refused: int = 0) -> dict[str, list[float]]:
        """Health as the server holds it: boots never go back, nothing dropped,
        `refused` readings refused."""
        h: dict[str, list[float]] = {}
        for label, _, v in sorted(await self.stored(node, "health"), key=lambda r: r[1]):
            h.setdefault(label, []).append(v)
        assert h.get("boots"), h.keys()
        assert h["boots"] == sorted(h["boots"]), h["boots"]
        assert set(h["drops"]) == {0}, h["drops"]
        assert max(h["refused"]) == refused, h["refused"]
        assert min(h["queue_depth"]) >= 0
        return h

    def no_reset(self, node: str) -> None:
        bad = [e for e in self.rig.events(node) if "wdt_starved" in e or e.endswith(" reset")]
        assert not bad, bad


# --- the scenarios ---------------------------------------------------------------------


@scenario
async def broker_restart(b: Bench) -> None:
    b.add("fridge01")
    await b.online("fridge01")
    await b.broker(False)
    before = len(await b.stored("fridge01"))
    await b.sleep_node(8 * 60)
    assert len(await b.stored("fridge01")) == before  # the broker really was away
    await b.broker(True)
    await b.drained("fridge01")
    await b.close()
    assert b.check_once("fridge01", await b.stored("fridge01")) > before
    await b.check_health("fridge01")
    b.no_reset("fridge01")


async def _ap_off(b: Bench, off_s: int) -> None:
    b.add("fridge01")
    await b.online("fridge01")
    b.rig.wifi(False)
    at_cut = len(b.rig.samples("fridge01"))
    await b.sleep_node(off_s)
    b.rig.wifi(True)
    in_cut = len(b.rig.samples("fridge01")) - at_cut
    await b.drained("fridge01", within=120)
    await b.close()
    got = await b.stored("fridge01")
    b.check_once("fridge01", got)
    true = sorted(tt for _, t, _, tt in b.rig.samples("fridge01") if t > 0)
    gaps = [y - x for x, y in zip(true, true[1:], strict=False)]
    # sampled through the cut: no hole longer than a reset of the reboot ladder (a
    # loaded host makes a fast-clock node skip ticks, no fault of the node)
    assert max(gaps) <= max(600, off_s // 3), max(gaps)
    assert in_cut >= off_s // 60 // 6, in_cut  # a sixth of the ticks at least
    await b.check_health("fridge01")
    assert not [e for e in b.rig.events("fridge01") if "wdt_starved" in e]


@scenario
async def ap_off_one_minute(b: Bench) -> None:
    await _ap_off(b, 60)
    b.no_reset("fridge01")


@scenario
async def ap_off_six_hours(b: Bench) -> None:
    await _ap_off(b, 6 * 3600)
    # the reboot ladder ran during the cut (a Wi-Fi restart at 15 min, resets after)
    assert [e for e in b.rig.events("fridge01") if e.endswith(" reset")]


@scenario
async def ap_absent_at_boot(b: Bench) -> None:
    b.add("fridge01", wifi=False)
    await b.sleep_node(8 * 60)  # sampling with no network and no clock
    assert await b.stored("fridge01") == []
    offline = len(b.rig.samples("fridge01"))
    assert offline >= 3
    b.rig.wifi(True)
    await b.drained("fridge01")
    await b.close()
    # the readings taken before NTP answered are dated once it did, and stored once
    assert b.check_once("fridge01", await b.stored("fridge01")) >= 2 * offline
    assert [e for e in b.rig.events("fridge01") if " clock " in e]
    b.no_reset("fridge01")


@scenario
async def broker_blackholed_with_wifi_up(b: Bench) -> None:
    b.add("fridge01")
    await b.online("fridge01")
    b.rig.link("blackhole")  # the broker's address answers nothing: a dead uplink
    await asyncio.sleep(1)
    before = len(await b.stored("fridge01"))
    at_cut = len(b.rig.samples("fridge01"))
    await b.sleep_node(14 * 60)
    assert len(await b.stored("fridge01")) == before
    ev = b.rig.events("fridge01")
    assert [e for e in ev if "link lost" in e or "connect failed" in e], ev[-10:]
    at_restore = len(b.rig.samples("fridge01"))
    assert at_restore - at_cut >= 2
    b.rig.link("up")
    # every reading taken before the restore is on the node's flash: all must come.
    # (`drained` alone allows the last few readings: a publish the blackhole held and
    # delivered when the link came back could satisfy it before the node reconnected)
    await b.online("fridge01", 2 * at_restore)
    await b.drained("fridge01")
    await b.close()
    assert b.check_once("fridge01", await b.stored("fridge01")) >= 2 * at_restore
    await b.check_health("fridge01")
    b.no_reset("fridge01")


async def _cut_during(b: Bench, moment: str) -> None:
    b.add("fridge01")
    await b.online("fridge01", 4)
    await b.power_cut("fridge01", moment)
    await b.sleep_node(5 * 60)
    await b.power_cut("fridge01", moment)  # twice: the recovered flash is cut again
    await b.online("fridge01", len(await b.stored("fridge01")) + 4)
    await b.drained("fridge01")
    await b.close()
    b.check_once("fridge01", await b.stored("fridge01"), lost_ok=5)  # batch: 5
    boots = [e for e in b.rig.events("fridge01") if "wdt_starved" in e]
    assert not boots, boots
    h = await b.check_health("fridge01")
    assert max(h["boots"]) >= 3


@scenario
async def power_cut_during_a_flash_write(b: Bench) -> None:
    await _cut_during(b, "flash_write")


@scenario
async def power_cut_during_a_tls_handshake(b: Bench) -> None:
    await _cut_during(b, "tls_handshake")


RECONNECTS = 40  # 1,000 on a chip (docs/bench-rig.md); scaled to the virtual rig's CPU


@scenario
async def reconnects_over_a_lossy_link(b: Bench) -> None:
    assert not b.real, "on a chip: RECONNECTS = 1000 and the bench AP's lossy link"
    b.add("fridge01")
    await b.online("fridge01")
    proxy = b.rig.proxy  # type: ignore[attr-defined]
    start = proxy.accepted
    b.rig.link("lossy", 2500)  # every connection cut within 0.5-2.5 s

    def connected() -> list[str]:
        ev = b.rig.events("fridge01")
        return [e for e in ev if e.split()[2:4] == ["connected", "mqtt"]]

    before = len(connected())

    async def enough() -> bool:
        return len(connected()) - before >= RECONNECTS

    await b.until(enough, 240, f"{RECONNECTS} reconnects")
    b.rig.link("up")
    await b.drained("fridge01")
    await b.close()
    b.check_once("fridge01", await b.stored("fridge01"))
    assert proxy.accepted - start >= RECONNECTS
    b.no_reset("fridge01")  # no watchdog starvation, no reboot
    h = await b.check_health("fridge01")
    # the heap (the unix port's MicroPython heap after a collect; idf_largest on a
    # chip) does not trend down over the reconnects
    for k in ("heap_free", "idf_largest"):
        first, last = h[k][: len(h[k]) // 3], h[k][-(len(h[k]) // 3) :]
        assert statistics.median(last) >= statistics.median(first) - 2048, (k, h[k])


@scenario
async def probe_unplugged_shorted_and_replugged(b: Bench) -> None:
    b.add("fridge01")
    await b.online("fridge01")
    marks = [len(b.rig.samples("fridge01"))]
    for state in ("unplugged", "shorted", "ok"):
        b.rig.probe("fridge01", 0, state)
        await b.sleep_node(6 * 60)
        marks.append(len(b.rig.samples("fridge01")))
    await b.drained("fridge01")
    await b.close()
    b.check_once("fridge01", await b.stored("fridge01"))
    s = [vals for _, t, vals, _ in b.rig.samples("fridge01")]
    # (the first tick of each phase may have been taken before the change)
    unplugged, shorted, back = (
        s[marks[0] + 1 : marks[1]],
        s[marks[1] + 1 : marks[2]],
        s[marks[2] + 1 :],
    )
    assert unplugged and all(set(v) == {"bottom"} for v in unplugged), unplugged
    assert not shorted  # a shorted bus: no reading at all (no 0 °C, no 85 °C)
    assert back and set(back[-1]) == {"top", "bottom"}, back
    h = await b.check_health("fridge01")
    assert max(h["probe_errors_top"]) > 0


@scenario
async def token_rotated_while_offline(b: Bench) -> None:
    roms = b.add("fridge01")
    await b.online("fridge01")
    b.rig.wifi(False)
    async with await psycopg.AsyncConnection.connect(b.dsn, autocommit=True) as conn:
        _, token = await devices.rotate_device_token(
            conn, b.world.account, b.world.device_ids["fridge01"], 4, b.clock()
        )
    await b.sleep_node(5 * 60)
    before = len(await b.stored("fridge01"))
    b.rig.wifi(True)

    async def refused() -> bool:
        return any(" refused " in e for e in b.rig.events("fridge01"))

    await b.until(refused, 60, "the refusal")
    assert "server refused this node" in b.rig.console("fridge01")  # the node says so
    await b.sleep_node(5 * 60)  # refused: it samples and queues on, sends nothing
    assert len(await b.stored("fridge01")) == before
    queued = len(b.rig.samples("fridge01"))
    # the installer gives it the new token: the queue it kept reaches the server
    await asyncio.to_thread(
        b.rig.reinstall, "fridge01", b.config("fridge01", roms, ("top", "bottom"), token=token)
    )
    await b.drained("fridge01")
    await b.close()
    assert b.check_once("fridge01", await b.stored("fridge01")) >= 2 * queued - 4
    await b.check_health("fridge01")


INSTALLER_TZ = {"UTC+2": "Etc/GMT-2", "UTC-5": "Etc/GMT+5"}  # POSIX signs are reversed


@scenario
async def installer_pc_in_utc_plus_2_and_minus_5(b: Bench) -> None:
    for i, (name, tz) in enumerate(INSTALLER_TZ.items()):
        node = f"fridge0{i + 1}"
        # the installer's own code, in a process whose local time is the PC's
        code = (
            "import datetime, time\n"
            "from opensense.node.flash import rtc_cmd\n"
            "t = eval(rtc_cmd([])[-1].split('datetime(', 1)[1][:-1])\n"
            "d = datetime.datetime(*t[:3], *t[4:7], tzinfo=datetime.UTC)\n"
            "print(int(d.timestamp() - time.time()), time.strftime('%z'))\n"
        )
        out = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-c", code],
            env={**os.environ, "TZ": tz},
            capture_output=True,
            text=True,
            check=True,
        )
        ahead, zone = out.stdout.split()
        assert zone == name.replace("UTC", "").replace("2", "0200").replace("5", "0500")
        assert abs(int(ahead)) <= 2, (name, ahead)  # the RTC is set in UTC, not local time
        # the node starts with the RTC as that installer set it
        b.add(node, n=i, rtc_offset=int(ahead))
    for node in ("fridge01", "fridge02"):
        await b.online(node, 6)
        await b.drained(node)
    await b.close()
    for node in ("fridge01", "fridge02"):
        b.check_once(node, await b.stored(node))
        await b.check_health(node)


QUEUE_DAYS = 31


@scenario
async def a_full_31_day_queue_drained_after_boot(b: Bench) -> None:
    assert not b.real, "on a chip: 31 days offline, or a queue image copied with mpremote"
    roms = (rom(501),)
    node = "fridge01"
    cfg = b.config(node, roms, ("top",), cadence=300, queue_bytes=1_500_000)
    directory = b.root / "rig" / node
    directory.mkdir(parents=True)
    # the node's flash written by the firmware's own queue: 31 days of readings every
    # 5 minutes, all timed, none sent (as a node that was offline a month)
    start = int((b.clock() - b.behind).timestamp()) - QUEUE_DAYS * 86400
    n = QUEUE_DAYS * 86400 // 300
    await asyncio.to_thread(prefill, directory, start, 300, n)
    b.rig.add_node(
        node,
        cfg,
        b.tls.ca_der(),
        {"speed": b.speed, "epoch0": b.epoch0(), "probes": [{"rom": roms[0], "temp": 3.0}]},
    )

    async def all_in() -> bool:
        return len(await b.stored(node)) >= n + 2

    await b.until(all_in, 240, "the month's backlog at the server")
    await b.close()
    got = await b.stored(node)
    old = [(ts, v) for label, ts, v in got if ts.timestamp() < start + n * 300]
    assert [int(ts.timestamp()) for ts, _ in old] == [start + 300 * i for i in range(n)]
    assert [v for _, v in old] == [prefill_value(i) for i in range(n)]
    b.check_once(node, [r for r in got if r[1].timestamp() >= start + n * 300])


def prefill_value(i: int) -> float:
    return round(2.0 + (i % 40) / 10, 1)


PREFILL = """
import sys
from hw import sim
import vfs
fl = sim.FileFlash(sim.DIR + "/flash.img", 512)
vfs.VfsLfs2.mkfs(fl)
vfs.mount(vfs.VfsLfs2(fl), "/flash")
from sense import fq
start, step, n = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
q = fq.Queue("/flash/q", 1, 1500000, 4000, 5)
c = q.chan("temperature", "top", "\\u00b0C")
for i in range(n):
    q.add(start + step * i, True, [(c, 2.0 + (i % 40) / 10)])
q.flush()
print(q.depth(), q.drops)
"""


def prefill(directory: Path, start: int, step: int, n: int) -> None:
    from opensense.node.deps import FIRMWARE, ensure
    from opensense.node.sim import micropython

    mp = micropython()
    assert mp is not None
    out = subprocess.run(
        [str(mp), "-X", "heapsize=160k", "-c", PREFILL, str(start), str(step), str(n)],
        env={
            **os.environ,
            "MICROPYPATH": f".frozen:{FIRMWARE}:{ensure()}",
            "OPENSENSE_SIM": str(directory),
        },
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert out.stdout.split() == [str(n), "0"], out.stdout + out.stderr


REINSTALLS = 20


@scenario
async def twenty_reinstalls_over_a_running_node(b: Bench) -> None:
    roms = b.add("fridge01")
    await b.online("fridge01")
    cfg = b.config("fridge01", roms, ("top", "bottom"))
    for _ in range(REINSTALLS):
        await b.sleep_node(90)
        await asyncio.to_thread(b.rig.reinstall, "fridge01", cfg)
        b.cuts.setdefault("fridge01", []).append(len(b.rig.samples("fridge01")))
    await b.online("fridge01", len(await b.stored("fridge01")) + 4)
    await b.drained("fridge01")
    await b.close()
    # nothing lost: the readings held in RAM reach the flash before mpremote's Ctrl-C
    # (only the one being taken at that instant, logged but not yet queued, may go)
    b.check_once("fridge01", await b.stored("fridge01"), lost_ok=1)
    h = await b.check_health("fridge01")
    assert max(h["boots"]) >= 1 + REINSTALLS // 2  # health is sent every 15 samples
    assert not [e for e in b.rig.events("fridge01") if "wdt_starved" in e]


# (nodes behind a site gateway through a WAN cut: tests/test_firmware_gateway.py, the
# real gateway and site Mosquitto as processes; see docs/bench-rig.md)

SETUP: dict[str, tuple[float, float, tuple[str, ...]]] = {
    # name: (speed, hours the nodes' world runs behind the server's clock, devices)
    "broker_restart": (120, 3, ("fridge01",)),
    "ap_off_one_minute": (60, 3, ("fridge01",)),
    "ap_off_six_hours": (600, 9, ("fridge01",)),
    "ap_absent_at_boot": (120, 3, ("fridge01",)),
    "broker_blackholed_with_wifi_up": (120, 3, ("fridge01",)),
    "power_cut_during_a_flash_write": (120, 3, ("fridge01",)),
    "power_cut_during_a_tls_handshake": (120, 3, ("fridge01",)),
    "reconnects_over_a_lossy_link": (300, 3, ("fridge01",)),
    "probe_unplugged_shorted_and_replugged": (120, 3, ("fridge01",)),
    "token_rotated_while_offline": (120, 3, ("fridge01",)),
    "installer_pc_in_utc_plus_2_and_minus_5": (120, 3, ("fridge01", "fridge02")),
    "a_full_31_day_queue_drained_after_boot": (120, 3, ("fridge01",)),
    "twenty_reinstalls_over_a_running_node": (120, 3, ("fridge01",)),
}


async def _run(name: str, dsn: str, root: Path, after: float) -> None:
    await asyncio.sleep(after)  # staggered: a dozen servers and TLS sessions not at once
    speed, behind_h, devs = SETUP[name]
    await asyncio.to_thread(root.mkdir, parents=True)
    b = Bench(dsn, root, speed, behind_h)
    await b.start(devs)
    try:
        await SCENARIOS[name](b)
    finally:
        await b.close()
        await b.conn.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def running(
    request: pytest.FixtureRequest, dsn: str, tmp_path_factory: pytest.TempPathFactory
) -> Any:
    """Every selected scenario started at once, each a task: they mostly wait."""
    here = request.node.path
    names = [
        it.callspec.params["name"]
        for it in request.session.items
        if it.path == here and hasattr(it, "callspec") and "name" in it.callspec.params
    ]
    root = tmp_path_factory.mktemp("hil")
    tasks = {n: asyncio.create_task(_run(n, dsn, root / n, 1.5 * i)) for i, n in enumerate(names)}
    yield tasks
    for t in tasks.values():
        t.cancel()
    await asyncio.gather(*tasks.values(), return_exceptions=True)


@pytest.mark.hil
@pytest.mark.db
@pytest.mark.e2e
@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("name", sorted(SCENARIOS))
async def test_scenario(name: str, running: dict[str, asyncio.Task[None]]) -> None:
    if name in REAL_RIG_ONLY and not os.environ.get("OPENSENSE_RIG"):
        pytest.skip(REAL_RIG_ONLY[name])
    await running[name]


def test_every_scenario_has_its_setup_and_is_documented() -> None:
    assert set(SETUP) == set(SCENARIOS)
    doc = (Path(__file__).parents[1] / "docs" / "bench-rig.md").read_text()
    assert [n for n in SCENARIOS if f"`{n}`" not in doc] == []


def test_the_rig_is_chosen_from_the_environment(tmp_path: Path, monkeypatch: Any) -> None:
    from hil.rig import VirtualRig

    monkeypatch.delenv("OPENSENSE_RIG", raising=False)
    rig = rig_from_env(tmp_path, free_port())
    assert isinstance(rig, VirtualRig)
    rig.close()
    monkeypatch.setenv("OPENSENSE_RIG", str(tmp_path / "none.toml"))
    with pytest.raises(FileNotFoundError):
        rig_from_env(tmp_path, free_port())
    _rig_toml(tmp_path)
    monkeypatch.setenv("OPENSENSE_RIG", str(tmp_path / "rig.toml"))
    with pytest.raises(RuntimeError, match="not plugged in"):  # no board on this machine
        rig_from_env(tmp_path, free_port(), ports=lambda: [])


def _rig_toml(tmp_path: Path) -> RealConfig:
    (tmp_path / "rig.toml").write_text(
        'ca = "ca.der"\n'
        'power = "uhubctl -l {hub} -p {port} -a {action}"\n'
        "wifi = \"ssh bench-ap 'wifi {action}'\"\n"
        'link = "rig-link {mode} {delay_ms}"\n'
        'probe = "rig-probe {board} {index} {state}"\n'
        '[moments]\nflash_write = "fq append"\n'
        '[[board]]\nname = "n1"\nusb_serial = "0001A2B3"\nconfig = "n1.json"\nhub = "1-1"\nport = 2\n'
    )
    return RealConfig.load(tmp_path / "rig.toml")


def test_the_real_rig_drives_power_wifi_probes_flash_and_consoles(tmp_path: Path) -> None:
    import serial

    cfg = _rig_toml(tmp_path)
    ran: list[list[str]] = []

    def run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
        ran.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, "SELFTEST OK\n", "")

    loops: list[Any] = []

    def open_serial(dev: str) -> Any:
        assert dev == "/dev/ttyUSB7"
        loops.append(serial.serial_for_url("loop://", timeout=0.05))
        return loops[-1]

    ports = [("/dev/ttyS0", ""), ("/dev/ttyUSB7", "0001A2B3")]
    with pytest.raises(RuntimeError, match="not plugged in"):
        RealRig(cfg, run, open_serial, lambda: ports[:1])
    rig = RealRig(cfg, run, open_serial, lambda: ports)
    try:
        t = int(time.time())
        loops[-1].write(b"boot: power_on\r\nev 5 sample 7 %d 1 top=3.5 bottom=4.25\n" % t)
        deadline = time.monotonic() + 5
        while "sample 7" not in rig.console("n1") and time.monotonic() < deadline:
            time.sleep(0.05)
        lines = rig.console("n1").splitlines()
        assert [line.split(" ", 1)[1] for line in lines][0] == "boot: power_on"
        assert abs(float(lines[0].split()[0]) - time.time()) < 10  # stamped when read
        (seq, ts, vals, true) = rig.samples("n1")[0]
        assert (seq, ts, vals) == (7, t, {"top": 3.5, "bottom": 4.25})
        assert abs(true - time.time()) < 10  # the bench's clock is the true time
        rig.power_cut("n1")
        rig.wifi(False)
        rig.link("blackhole")
        rig.probe("n1", 0, "shorted")
        with pytest.raises(ValueError):
            rig.wifi(False, "n1")  # one AP for every board
        with pytest.raises(ValueError):
            rig.probe("n1", 0, "melted")
        rig.add_node("n1", {"local_id": "fridge01"}, b"\x30\x82", {"speed": 120})
        assert (tmp_path / "n1.json").read_text() == '{"local_id": "fridge01"}'
        assert (tmp_path / "ca.der").read_bytes() == b"\x30\x82"
        rig.reinstall("n1", {"local_id": "fridge01", "token": "new"})
        assert "new" in (tmp_path / "n1.json").read_text()
        assert ran[:5] == [
            ["uhubctl", "-l", "1-1", "-p", "2", "-a", "off"],
            ["uhubctl", "-l", "1-1", "-p", "2", "-a", "on"],
            ["ssh", "bench-ap", "wifi down"],
            ["rig-link", "blackhole", "0"],
            ["rig-probe", "n1", "0", "shorted"],
        ]
        for flash in ran[5:7]:
            assert flash[:3] == ["opensense", "node", "flash"]
            assert flash[-2:] == ["--port", "/dev/ttyUSB7"]
            assert flash[3] == str(tmp_path / "n1.json") and flash[5] == str(tmp_path / "ca.der")
        assert len(loops) == 3  # the console let go of the port for mpremote, then back
        # a power cut timed by a console line: cut when the board prints it
        threading_write = loops[-1]

        def later() -> None:
            time.sleep(0.3)
            threading_write.write(b"ev 9 fq append 3\n")

        import threading

        threading.Thread(target=later, daemon=True).start()
        t0 = time.monotonic()
        rig.power_cut("n1", "flash_write")
        assert time.monotonic() - t0 >= 0.3 and ran[-2][-1] == "off"
        with pytest.raises(RuntimeError, match="tls_handshake"):
            rig.power_cut("n1", "tls_handshake")  # no console line marks it in this rig
        failing = RealRig(
            cfg,
            lambda c: subprocess.CompletedProcess(c, 1, "", "no hub"),
            open_serial,
            lambda: ports,
        )
        with pytest.raises(RuntimeError, match="no hub"):
            failing.power_cut("n1")
        failing.close()
    finally:
        rig.close()
