"""OpenSense fleet benchmark: what a fleet of nodes at one message a minute costs.

The question (issue 14): how many nodes, each sending one 3-reading measurement
message a minute over MQTT (QoS 1), can the server and PostgreSQL take on 2 cores
while staying under half of the machine's CPU, and how long does a message take
from its publish to its row committed in the database.

Method. Real nodes keep one TLS connection each and publish once a minute; a few
hundred thousand TLS connections cannot be simulated on a 2-core box (the load would
measure itself). So a fixed number of device connections (default 120, paho clients
over TLS with the OpenSense CA verified, spread over worker processes,
_lib/fleet_worker.py) each speaks for k simulated nodes: every simulated node has its
own three probe channels (labels n<v>p0..p2, created with the site vertical's default
rule by its first message, as a real node's are) and sends one message a minute with
a new timestamp, the wall clock at its publish (milliseconds); a connection carries
k messages a minute, evenly spaced over all connections (open loop: a message goes
out when it is due, whatever the broker or the server do). The offered fleet is
connections x k nodes, the offered rate that many messages a minute.

What this does not simulate (the limits of the figure): the broker's cost of the
missing connections (TLS sessions, keepalive PINGREQs: 500,000 nodes at the firmware's
60 s keepalive are ~8,000 pings/s the broker answers; CONNECTs after outages), the
server's per-device caches and per-device ordering at 500,000 devices instead of a few
hundred, and a node's own retries. What it measures is the server's and PostgreSQL's
CPU per stored message at a steady offered rate, every message a new reading on
channels with alarm rules, and the delay to storage; the broker's per-message cost
is in the figure too (Mosquitto's on its own line, the embedded broker's inside the
server process).

Per broker, in one run:
- embedded: OPENSENSE_MQTT=embedded, `opensense serve` as a separate process; its
  broker stores before it acknowledges;
- Mosquitto: OPENSENSE_MQTT=external with the shipped deploy/mosquitto config, set up
  by its bootstrap.sh into a temporary root with the listeners on free ports (as
  tools/bench/mqtt), the devices made through POST /v1/devices; Mosquitto
  acknowledges before the server has the message.
The server runs with its alarm loops on (the rule engine judges every new reading;
every channel has its site vertical's default range rule, -2..+5 °C, checked after
each warm-up; the readings stay in range) and jobs off; the per-device ingest rate
limit is raised (a connection carries k messages a minute, a node 1).

Two measured points per broker, N1 < N2 nodes (--nodes): before each, a warm-up sends
two messages per new simulated node (the first creates its channels and rules; the
second, sent once the rule engine judged the first, is the first judged on a standing
state, so the window measures established nodes: since stop 36 a node's calm readings
from its third on are settled by the writer; 2 in flight per connection, the devices
in accounts of 20), waits until they are stored and until
the rule engine has judged them (no `alarm_dirty` row left on the bench's channels);
then the schedule runs `warm` seconds before the window opens (the steady state:
queues filled to their level) and `duration` seconds of window. In the window, who
used the CPU (server, Mosquitto, PostgreSQL, the load: publisher processes and the
bench) is taken per process tree (_lib/cpu.py); a share is CPU seconds / (window x
the machine's cores). The rule engine's backlog when the window closes is printed
(its deferred work is not in the window's CPU). After the first warm-up the fleet is
also measured idle (connections open, channels made, no messages) for `idle` s.

The largest fleet under 50 % is extrapolated linearly through the two measured
points: share = a + b x (messages committed a minute in the window: the offered rate
when the server kept up, so a point where it fell behind still pairs its CPU with
the work done), solved for 50 %; both points, the line, its marginal CPU per message
and the idle measurement beside its intercept are printed. The fit is only as good as
the cost is linear in the fleet (the channels grow with it too: the time-driven
sweeps' cost is in the slope); points far below 50 % make a long extrapolation.

Publish -> stored: every (rate / 20)-th message (about 20 a second in all) is
announced by its worker when it is published (its channel, its timestamp); the
bench polls PostgreSQL every 25 ms for the announced rows that are not yet seen and
takes, for each, the time the poll that first sees it returned minus the timestamp
in the payload (both the machine's wall clock). So a figure is the time until the
committed row was visible to another connection, an upper bound by at most one poll
interval plus one query. The polling backend's CPU is the load's, not PostgreSQL's
(it was counted as PostgreSQL's until 2026-12-03: its query, a lookup per pending
message 40 times a second, was the costliest statement of a window and about a fifth
of PostgreSQL's CPU at 2,400 nodes). A row not seen 60 s after its window
closed counts as infinitely late. publish -> PUBACK is printed beside it (embedded: a
PUBACK means committed; Mosquitto: it means the broker has it).

Every phase (warm-ups included) ends with a check: once the server caught up, the
database holds exactly the PUBACKed messages x 3 readings since the phase began.

The target: >= 500,000 nodes under 50 % of the CPU of 2 cores (server + PostgreSQL +
broker), PASS/MISS per broker; a miss is reported, never fatal (exit 0 unless the run
itself broke; a failed Mosquitto part says "not measured: <reason>").

    tools/bench/fleet                          # 120 connections, 4,800 and 19,200 nodes, 120 s each
    tools/bench/fleet --quick                  # smoke run: 4 connections, 120 and 240 nodes, 4 s
    tools/bench/fleet --nodes 3000,9000 --connections 300 --duration 180
    tools/bench/fleet --dsn postgresql://user@host/scratch   # leaves its accounts there
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from _lib import pg, runner
from _lib.brokers import mosquitto_version, shipped_with_server
from _lib.cpu import CpuMeter, CpuUse
from _lib.fleet import MqttFleet, fleet_by_api, fleet_by_service, retire
from _lib.mqtt_load import Worker, split
from _lib.procs import Serve, free_port, watched
from _lib.profile import PySpy, table
from _lib.report import banner, fmt, percentile, say, verdict

FLEET_WORKER = Path(__file__).with_name("_lib") / "fleet_worker.py"
TARGET_NODES = 500_000
TARGET_SHARE = 0.5  # of the machine's CPU: server + PostgreSQL + broker
POLL_S = 0.025  # the stored-row poll
DRAIN_S = 60.0  # after a window, how long the bench waits for stragglers
STALL_S = 15.0  # ... giving up earlier when the row count does not move
ACCOUNT_DEVICES = 20  # devices (connections) per account
WARM_WINDOW = 2  # warm-up messages in flight per connection (each creates 3 channels)
READINGS = 3  # per message: three probe channels per node


@dataclass(frozen=True)
class Plan:
    duration: float  # seconds of each measured window
    warm: float  # seconds of schedule before the window opens
    connections: int  # device connections (each speaks for nodes / connections nodes)
    workers: int  # publisher processes
    nodes: tuple[int, int]  # the offered fleets of the two measured points
    track_per_s: float  # messages a second whose rows the bench looks for
    idle: float  # seconds of the idle measurement (after the first warm-up)
    engine: bool = True  # the rule engine on (--no-engine: off, to measure its share)


FULL = Plan(
    duration=120.0,
    warm=15.0,
    connections=120,
    workers=2,
    nodes=(4800, 19200),
    track_per_s=20,
    idle=20.0,
)
QUICK = Plan(
    duration=4.0, warm=1.0, connections=4, workers=1, nodes=(120, 240), track_per_s=1000, idle=2.0
)


# --- the load's processes and the stored-row tracker ---------------------------------------


class FleetWorker(Worker):
    """A fleet_worker.py process; its "T" lines (a tracked publish) go to `on_track`."""

    def __init__(
        self, conf: dict[str, Any], log: Path, on_track: Callable[[str, int, int], None]
    ) -> None:
        super().__init__("pub", conf, log, script=FLEET_WORKER)
        self.on_track = on_track

    async def _take(self, text: str) -> None:
        if text.startswith("T "):
            _, client_id, v, ms = text.split()
            self.on_track(client_id, int(v), int(ms))
        else:
            await super()._take(text)


SEEN_SQL = """
SELECT p.num, p.ms FROM unnest(%s::int[], %s::bigint[]) AS p(num, ms)
WHERE EXISTS (
    SELECT 1 FROM measurements m
    WHERE m.channel_num = p.num
      AND m.ts >= to_timestamp(p.ms / 1000.0) - interval '1 second'
      AND m.ts <= to_timestamp(p.ms / 1000.0) + interval '1 millisecond')
"""


class Tracker:
    """Publish -> stored for the announced messages: polls for their rows (a channel
    has one row a minute, so its row is the one at the message's timestamp; the lower
    bound of a second allows a server that would store whole seconds)."""

    def __init__(self, dsn: str, nums: dict[tuple[str, str], int]) -> None:
        self.dsn, self.nums = dsn, nums
        self.pending: dict[tuple[int, int], None] = {}
        self.lat_ms: list[float] = []
        self.unknown = 0  # announced on a channel the bench did not know (a bug)
        self.backend_pid: int | None = None  # its PostgreSQL backend: the bench's, not the server's
        self._task: asyncio.Task[None] | None = None

    def add(self, client_id: str, v: int, ms: int) -> None:
        num = self.nums.get((client_id, f"n{v}p0"))
        if num is None:
            self.unknown += 1
        else:
            self.pending[(num, ms)] = None

    async def _poll(self) -> None:
        async with await pg.connect(self.dsn) as conn:
            cur = await conn.execute("SELECT pg_backend_pid()")
            row = await cur.fetchone()
            self.backend_pid = int(row[0]) if row else None
            while True:
                t_next = time.monotonic() + POLL_S
                if self.pending:
                    keys = list(self.pending)
                    cur = await conn.execute(SEEN_SQL, ([k[0] for k in keys], [k[1] for k in keys]))
                    rows = await cur.fetchall()
                    seen = time.time()
                    for num, ms in rows:
                        if self.pending.pop((int(num), int(ms)), 0) is None:
                            self.lat_ms.append(max(0.0, seen * 1000 - int(ms)))
                await asyncio.sleep(max(0.0, t_next - time.monotonic()))

    def start(self) -> None:
        self.pending.clear()
        self.lat_ms = []
        self._task = asyncio.create_task(self._poll())

    async def finish(self, within: float) -> int:
        """Wait for the stragglers; the number never seen (counted as infinitely late)."""
        deadline = time.monotonic() + within
        while self.pending and time.monotonic() < deadline:
            if self._task is not None and self._task.done():
                self._task.result()  # a failed poll: its exception
            await asyncio.sleep(0.1)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        lost = len(self.pending)
        self.lat_ms.extend([math.inf] * lost)
        return lost


POLL_ROLE = "bench's poll (PostgreSQL)"  # the tracker's backend: load, not PostgreSQL's work


def pg_title(pid: int) -> str:
    """What a PostgreSQL process is, from its title: a background process's name, or
    "backend <user> <database>"."""
    try:
        title = " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return "(gone)"
    if not title.startswith("postgres:"):
        return "postmaster"
    words = title.removeprefix("postgres:").split()
    if len(words) >= 3 and ("(" in words[2] or words[2] == "[local]"):
        return f"backend {words[0]} {words[1]}"
    return " ".join(w for w in words if not w.isdigit())[:40] or "?"


class Profiler:
    """--profile DIR: for each measured window py-spy on the server, pg_stat_statements
    (when PostgreSQL preloads it) and PostgreSQL's CPU by process (backends, WAL writer,
    checkpointer, autovacuum, ...), printed in µs per committed message and kept in
    DIR/<broker>-<nodes>.summary.txt (py-spy's raw stacks in DIR/<broker>-<nodes>.txt)."""

    def __init__(self, out: Path, stats_dsn: str | None) -> None:
        self.out, self.stats_dsn = out, stats_dsn
        self.spy: PySpy | None = None
        self.server_role = "server"

    def attach(self, server_pid: int, server_role: str) -> None:
        self.spy = PySpy(self.out, server_pid, rate=100)
        self.server_role = server_role

    def start(self, name: str) -> None:
        if self.stats_dsn is not None:
            pg.stat_statements_reset(self.stats_dsn)
        if self.spy is not None:
            self.spy.start(name)

    async def stop(self, name: str, meter: CpuMeter, cpu: CpuUse, stored: float) -> None:
        summary = await asyncio.to_thread(self.spy.stop) if self.spy is not None else None
        stmts = (
            await asyncio.to_thread(pg.stat_statements, self.stats_dsn, 12)
            if self.stats_dsn is not None
            else []
        )
        msgs = max(stored, 1.0)
        server_us = cpu.of(self.server_role) / msgs * 1e6
        lines = [
            f"  where the CPU of a message went, {name}: {stored:,.0f} messages committed in"
            f" {cpu.wall:.0f} s, load average {os.getloadavg()[0]:.2f}",
            f"  server process: {server_us:,.0f} µs a message",
        ]
        if summary is not None:
            lines += table(summary, server_us)
        groups: dict[str, float] = {}
        for pid, sec in meter.by_pid.get("PostgreSQL", {}).items():
            t = pg_title(pid)
            groups[t] = groups.get(t, 0.0) + sec
        if groups:
            total = sum(groups.values())
            lines.append(
                f"  PostgreSQL by process: {total / msgs * 1e6:,.0f} µs a message"
                " (processes that ended inside the window are missing)"
            )
            for t, sec in sorted(groups.items(), key=lambda kv: -kv[1]):
                lines.append(f"    {t:<52} {sec / msgs * 1e6:9,.0f} µs")
        if stmts:
            lines.append(
                "  PostgreSQL statements (pg_stat_statements; execution + planning wall time):"
            )
            lines.append("        calls  per message   µs a call   µs a message  query")
            for st in stmts:
                ms = st.exec_ms + st.plan_ms
                q = " ".join(st.query.split())
                lines.append(
                    f"    {st.calls:>9,} {st.calls / msgs:12.2f}"
                    f" {ms * 1000 / max(st.calls, 1):11.0f} {ms * 1000 / msgs:14.1f}  {q[:80]}"
                )
        for line in lines:
            say("    " + line)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"{name}.summary.txt").write_text("\n".join([*lines, ""]), encoding="utf-8")


# --- counting in the database ---------------------------------------------------------------


ROWS_SQL = (
    "SELECT count(*) FROM measurements WHERE ts >= %s AND channel_num IN"
    " (SELECT num FROM channels WHERE account_id = ANY(%s))"
)


async def rows_since(dsn: str, account: list[str], since: datetime) -> int:
    async with await pg.connect(dsn) as conn:
        cur = await conn.execute(ROWS_SQL, (since, account))
        row = await cur.fetchone()
    return int(row[0]) if row else 0


async def caught_up(
    dsn: str, account: list[str], since: datetime, expected: int
) -> tuple[int, float]:
    """Wait until the phase's rows reach `expected` (the server catching up with what
    the broker acknowledged) or stop moving; the rows found and the seconds waited."""
    t0 = time.monotonic()
    rows, moved = await rows_since(dsn, account, since), t0
    while rows < expected and time.monotonic() - t0 < 10 * DRAIN_S:
        await asyncio.sleep(0.2)
        now_rows = await rows_since(dsn, account, since)
        if now_rows != rows:
            rows, moved = now_rows, time.monotonic()
        elif time.monotonic() - moved > STALL_S:
            break
    return rows, time.monotonic() - t0


def check_text(rows: int, acked: int, unacked: int) -> tuple[str, bool]:
    extra = rows - acked * READINGS
    ok = 0 <= extra <= unacked * READINGS  # unacknowledged ones may be stored too
    if extra == 0:
        text = f"{rows:,} rows = {acked:,} PUBACKed x {READINGS}"
    elif ok:
        text = f"{rows:,} rows = {acked:,} PUBACKed x {READINGS} + {extra} of unPUBACKed ones"
    elif extra < 0:
        text = f"INCOMPLETE: {rows:,} rows of {acked:,} PUBACKed x {READINGS}"
    else:
        text = f"MISMATCH: {rows:,} rows for {acked:,} PUBACKed x {READINGS}"
    if unacked:
        text += f"; {unacked} without PUBACK after the drain"
    return text, ok


DIRTY_SQL = (
    "SELECT count(*), extract(epoch FROM now() - min(since)) FROM alarm_dirty"
    " WHERE channel_num IN (SELECT num FROM channels WHERE account_id = ANY(%s))"
)


async def dirty(dsn: str, account: list[str]) -> tuple[int, float]:
    """The rule engine's backlog on the account: channels with readings not judged
    yet (alarm_dirty) and how old the oldest of those readings is (s)."""
    async with await pg.connect(dsn) as conn:
        cur = await conn.execute(DIRTY_SQL, (account,))
        row = await cur.fetchone()
    assert row is not None
    return int(row[0]), float(row[1] or 0.0)


async def judged(dsn: str, account: list[str], within: float) -> float | None:
    """Seconds until the rule engine judged every reading of the account (None: not
    within `within`)."""
    t0 = time.monotonic()
    while (await dirty(dsn, account))[0]:
        if time.monotonic() - t0 > within:
            return None
        await asyncio.sleep(0.2)
    return time.monotonic() - t0


async def channel_nums(dsn: str, account: list[str]) -> dict[tuple[str, str], int]:
    async with await pg.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT device_id, label, num FROM channels WHERE account_id = ANY(%s)"
            " AND label LIKE 'n%%p0'",
            (account,),
        )
        return {(str(d), str(lab)): int(n) for d, lab, n in await cur.fetchall()}


async def rules_check(dsn: str, account: list[str]) -> tuple[int, int]:
    """The account's channels, and how many of them have no rule."""
    async with await pg.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT count(*), count(*) FILTER (WHERE NOT EXISTS"
            " (SELECT 1 FROM rules r WHERE r.channel_id = c.id))"
            " FROM channels c WHERE c.account_id = ANY(%s)",
            (account,),
        )
        row = await cur.fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


# --- one broker's points ----------------------------------------------------------------------


@dataclass
class Point:
    broker: str
    nodes: int
    k: int
    published: int
    in_window: int  # PUBACKed, published inside the window
    stored: float  # messages committed inside the window (rows / 3)
    duration: float
    cpu: CpuUse
    infra: tuple[str, ...]  # the roles that count against the target
    stored_ms: list[float]
    puback_ms: list[float]
    check: str
    ok: bool
    late: int
    lag_max_ms: float
    engine: str  # the rule engine's backlog

    def share(self, role: str) -> float:
        return self.cpu.of(role) / (self.cpu.wall * (psutil.cpu_count() or 1))

    @property
    def infra_share(self) -> float:
        return sum(self.share(r) for r in self.infra)

    @property
    def served(self) -> float:
        """The fleet the server kept up with in the window: messages committed a minute
        (the offered fleet when it kept up; fewer when it fell behind)."""
        return self.stored / self.cpu.wall * 60

    @property
    def cpu_ms_per_msg(self) -> float:
        """CPU of server, PostgreSQL and broker per committed message, idle cost included."""
        cpu = sum(self.cpu.of(r) for r in self.infra)
        return cpu / self.stored * 1000 if self.stored else math.nan


@dataclass
class BrokerSide:
    """How one broker's run is set up: the server's environment, the CPU roles, the
    fleet (made once the server is up: one account per ACCOUNT_DEVICES devices), the
    port and CA the nodes use."""

    name: str
    server: Serve
    port: int
    ca: Path
    roles: dict[str, list[int]]
    infra: tuple[str, ...]
    fleets: list[MqttFleet]


def share_line(p: Point) -> str:
    parts = [f"{r} {p.share(r):6.1%}" for r in p.infra]
    return (
        f"{'  '.join(parts)}  = {p.infra_share:6.1%} of the machine;"
        f" load {p.share('load') + p.share('bench') + p.share(POLL_ROLE):5.1%}"
    )


def point_line(p: Point) -> str:
    return (
        f"   {p.broker:<10} {p.nodes:>9,} nodes = {p.nodes:>9,} msg/min offered"
        f" ({p.nodes / 60:,.1f} msg/s; {p.k} per connection a minute);"
        f" committed in the window {fmt(p.served)} msg/min"
        + ("" if p.served >= 0.95 * p.nodes else " (FELL BEHIND the offered rate)")
    )


def latency_line(p: Point) -> str:
    return (
        f"      publish -> stored p50 {fmt(percentile(p.stored_ms, 50), 1)} ms"
        f"  p99 {fmt(percentile(p.stored_ms, 99), 1)} ms ({len(p.stored_ms):,} tracked);"
        f" publish -> PUBACK p50 {fmt(percentile(p.puback_ms, 50), 1)} ms"
        f"  p99 {fmt(percentile(p.puback_ms, 99), 1)} ms;"
        f" CPU {p.cpu_ms_per_msg:.2f} ms a message"
    )


async def measure(
    side: BrokerSide, dsn: str, plan: Plan, work: Path, prof: Profiler | None = None
) -> tuple[list[Point], float]:
    accounts = [f.account for f in side.fleets]
    specs = [spec for f in side.fleets for spec in f.specs()]
    nums: dict[tuple[str, str], int] = {}
    tracker = Tracker(dsn, nums)
    conf = {"host": "127.0.0.1", "port": side.port, "ca": str(side.ca), "window": WARM_WINDOW}
    parts = split(specs, plan.workers)
    pubs = [
        FleetWorker(
            {**conf, "clients": part, "offset": i / len(parts)}, work / "pub.log", tracker.add
        )
        for i, part in enumerate(parts)
    ]
    out: list[Point] = []
    if prof is not None:
        prof.attach(side.server.pid, side.infra[0])
    idle: float | None = None
    meter = CpuMeter(me="bench")
    try:
        for w in pubs:
            await w.start()
        for w in pubs:
            await w.expect("READY", 120)
        done_v = 0
        for nodes in plan.nodes:
            k = max(1, round(nodes / plan.connections))
            nodes = k * len(specs)
            # warm-up: the new simulated nodes' first messages create their channels;
            # their second, once the rule engine judged the first, are the first it
            # judges on a standing state (it takes the channel's first checkpoint),
            # so the window holds messages of established nodes, as a fleet that has
            # been reporting for a while does (from its third message on, a node's
            # calm readings are settled by the writer: migration 0032)
            t_w = time.perf_counter()
            since = now_ms()
            acked = unacked = 0
            for round_ in range(2):
                if round_ and plan.engine and await judged(dsn, accounts, 10 * DRAIN_S) is None:
                    raise RuntimeError("the rule engine did not judge the first warm-up round")
                for w in pubs:
                    w.send(f"WARM {done_v} {k}")
                for w in pubs:
                    r = json_of(await w.expect("WARMED", 700))
                    acked, unacked = acked + int(r["acked"]), unacked + int(r["unacked"])
            rows, _ = await caught_up(dsn, accounts, since, acked * READINGS)
            check, ok = check_text(rows, acked, unacked)
            channels, bare = await rules_check(dsn, accounts)
            say(
                f"  warm-up to {nodes:,} nodes: {acked:,} messages in"
                f" {time.perf_counter() - t_w:.1f} s; check: {check}; {channels:,} channels,"
                f" {'each with a rule' if bare == 0 else f'{bare:,} WITHOUT a rule'}"
            )
            if not ok:
                raise RuntimeError(f"warm-up check failed: {check}")
            done_v = k
            nums.clear()
            nums.update(await channel_nums(dsn, accounts))
            # the window starts with the rule engine done with the warm-up's readings
            rules_s = await judged(dsn, accounts, 10 * DRAIN_S) if plan.engine else 0.0
            if rules_s is None:
                raise RuntimeError("the rule engine did not judge the warm-up's readings")
            if idle is None:
                # the cost of the fleet doing nothing: connections open, channels made
                meter.start({**side.roles, "load": [w.pid for w in pubs]})
                await asyncio.sleep(plan.idle)
                cpu = meter.stop()
                idle = sum(cpu.of(r) for r in side.infra) / (cpu.wall * (psutil.cpu_count() or 1))
                say(
                    f"   {side.name:<10} idle with {nodes:,} nodes' channels and no messages:"
                    f" {idle:.1%} of the machine ({cpu.line()})"
                )
            # the measured phase
            rate_w = len(specs) * k / 60 / len(pubs)  # messages a second per worker
            track = max(1, round(rate_w * len(pubs) / plan.track_per_s))
            await asyncio.sleep(1.0)  # the warm-up's timestamps all before `since`
            since = now_ms()
            t_go = time.monotonic() + 0.3
            t0 = t_go + plan.warm
            t1 = t0 + plan.duration
            tracker.start()
            for w in pubs:
                w.send(f"RUN {k} {t_go} {t0} {t1} {track}")
            await asyncio.sleep(max(0.0, t0 - time.monotonic()))
            rows0 = await rows_since(dsn, accounts, since)
            name = f"{side.name}-{nodes}"
            if prof is not None:
                prof.start(name)
            poll = [tracker.backend_pid] if tracker.backend_pid else []
            meter.start({**side.roles, "load": [w.pid for w in pubs], POLL_ROLE: poll})
            await asyncio.sleep(max(0.0, t1 - time.monotonic()))
            cpu = meter.stop()
            stored = (await rows_since(dsn, accounts, since) - rows0) / READINGS
            if prof is not None:
                await prof.stop(name, meter, cpu, stored)
            backlog, oldest = await dirty(dsn, accounts)
            res = [json_of(await w.expect("RESULT", 120)) for w in pubs]
            acked = sum(int(r["acked"]) for r in res)
            unacked = sum(int(r["unacked"]) for r in res)
            rows, _ = await caught_up(dsn, accounts, since, acked * READINGS)
            waited = time.monotonic() - t1  # since the window closed
            lost = await tracker.finish(DRAIN_S)
            rules_s = await judged(dsn, accounts, DRAIN_S) if plan.engine else 0.0
            engine = (
                f"rule engine: {backlog:,} channel(s) waiting when the window closed (oldest"
                f" reading unjudged for {oldest:.1f} s), "
                + (
                    f"all judged by {time.monotonic() - t1:.1f} s after it"
                    if rules_s is not None
                    else f"NOT caught up {time.monotonic() - t1:.0f} s after it: its backlog's"
                    " CPU is not in the figures"
                )
                if plan.engine
                else "rule engine: OFF (--no-engine): its share is not in the figures"
            )
            check, ok = check_text(rows, acked, unacked)
            if side.name != "embedded":
                check += f"; the server caught up {waited:.1f} s after the window"
            if lost:
                check += f"; {lost} tracked message(s) never seen"
            if tracker.unknown:
                check += f"; {tracker.unknown} tracked on unknown channels"
            p = Point(
                side.name,
                nodes,
                k,
                sum(int(r["published"]) for r in res),
                sum(int(r["in_window"]) for r in res),
                stored,
                plan.duration,
                cpu,
                side.infra,
                list(tracker.lat_ms),
                [float(x) for r in res for x in r["puback_ms"]],
                check,
                ok,
                sum(int(r["late"]) for r in res),
                max(float(r["lag_max_ms"]) for r in res),
                engine,
            )
            out.append(p)
            say(point_line(p))
            say(f"      CPU: {share_line(p)}")
            say(latency_line(p))
            say(f"      {p.engine}")
            say(f"      {cpu.line()}")
            say(
                f"      offered: {p.published:,} published, {p.late:,} more than 100 ms behind"
                f" schedule (worst {p.lag_max_ms:,.0f} ms); check: {check}"
            )
            if not ok:
                raise RuntimeError(f"check failed: {check}")
    finally:
        for w in pubs:
            await w.stop()
    return out, math.nan if idle is None else idle


def now_ms() -> datetime:
    """Now, to the millisecond below: a message's timestamp is its publish time
    truncated to milliseconds, so a phase's messages are never before this."""
    return datetime.fromtimestamp(math.floor(time.time() * 1000) / 1000, UTC)


def json_of(text: str) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(text)
    return out


async def make_fleets(n: int, make: Callable[[int, str], Awaitable[MqttFleet]]) -> list[MqttFleet]:
    """n devices in accounts of ACCOUNT_DEVICES: a fleet is many customers, and the
    server serializes channel creation (its audit records) per account."""
    out = []
    for i, first in enumerate(range(0, n, ACCOUNT_DEVICES)):
        out.append(await make(min(ACCOUNT_DEVICES, n - first), f"account {i}"))
    return out


def server_env(rounds: int, engine: bool = True) -> dict[str, str]:
    return {
        "OPENSENSE_BCRYPT_ROUNDS": str(rounds),
        # a connection carries k nodes' messages a minute (a real node 1)
        "OPENSENSE_INGEST_RATE_PER_MIN": "1000000000",
        "OPENSENSE_ALARMS_ENABLED": "true" if engine else "false",
    }


async def embedded(
    dsn: str, work: Path, plan: Plan, rounds: int, pg_pid: int | None, prof: Profiler | None
) -> tuple[list[Point], float]:
    state = work / "state-embedded"
    state.mkdir()
    os.chmod(state, 0o755)
    mqtt_port = free_port()
    env = {
        **server_env(rounds, plan.engine),
        "OPENSENSE_MQTT": "embedded",
        "OPENSENSE_MQTT_HOST": "127.0.0.1",
        "OPENSENSE_MQTT_PORT": str(mqtt_port),
        "OPENSENSE_MQTT_HOSTNAMES": "localhost,127.0.0.1",
        "OPENSENSE_STATE_DIR": str(state),
    }
    server = Serve(dsn, work / "server-embedded.log", env, mqtt_port=mqtt_port).start()
    with watched(server):
        fleets = await make_fleets(
            plan.connections,
            lambda n, name: fleet_by_service(dsn, n, rounds, f"Fleet bench, embedded, {name}"),
        )
        await server.wait_ready()
        say(f"  server up (embedded broker on 127.0.0.1:{mqtt_port}), {plan.connections} devices")
        roles = {"server + broker": [server.pid], **({"PostgreSQL": [pg_pid]} if pg_pid else {})}
        side = BrokerSide(
            "embedded",
            server,
            mqtt_port,
            state / "mqtt-tls" / "ca.pem",
            roles,
            tuple(roles),
            fleets,
        )
        try:
            return await measure(side, dsn, plan, work, prof)
        finally:
            for f in fleets:
                await retire(dsn, f)


async def mosquitto(
    dsn: str, work: Path, plan: Plan, rounds: int, pg_pid: int | None, prof: Profiler | None
) -> tuple[list[Point], float]:
    async with shipped_with_server(work, dsn, server_env(rounds, plan.engine)) as (mosq, server):
        fleets = await make_fleets(
            plan.connections,
            lambda n, name: fleet_by_api(
                dsn, server.base, n, rounds, f"Fleet bench, Mosquitto, {name}"
            ),
        )
        say(
            f"  Mosquitto (shipped config, TLS on 127.0.0.1:{mosq.tls_port}) and the server up;"
            f" {plan.connections} devices made through POST /v1/devices"
        )
        assert mosq.proc is not None
        roles = {"server": [server.pid], "Mosquitto": [mosq.proc.pid]}
        if pg_pid:
            roles["PostgreSQL"] = [pg_pid]
        side = BrokerSide("Mosquitto", server, mosq.tls_port, mosq.ca, roles, tuple(roles), fleets)
        try:
            return await measure(side, dsn, plan, work, prof)
        finally:
            for f in fleets:
                await retire(dsn, f)


# --- the report -------------------------------------------------------------------------------


@dataclass
class Fit:
    a: float  # share of the machine at no nodes
    b: float  # share per node
    nodes_at_target: float  # nan: the cost does not grow with the nodes (no line)


def fit(points: list[Point]) -> Fit:
    """The line through (committed msg/min, share) of the two points: the committed
    rate, not the offered one, so a point where the server fell behind still pairs
    its CPU with the work it did."""
    p1, p2 = points[0], points[-1]
    if p2.served <= p1.served:
        return Fit(math.nan, math.nan, math.nan)
    b = (p2.infra_share - p1.infra_share) / (p2.served - p1.served)
    a = p1.infra_share - b * p1.served
    n = (TARGET_SHARE - a) / b if b > 0 else math.nan
    return Fit(a, b, n)


@dataclass
class Results:
    points: dict[str, list[Point]] = field(default_factory=dict)
    idle: dict[str, float] = field(default_factory=dict)  # share with no messages
    missing: dict[str, str] = field(default_factory=dict)
    broke: bool = False


def report(res: Results, plan: Plan, pg_note: str) -> None:
    banner("SUMMARY")
    say(
        f"1. Measured points: {plan.connections} TLS connections, each speaking for k nodes"
        f" (one 3-reading QoS 1 message a minute each), {plan.duration:g} s windows;"
        f" CPU as a share of the machine ({psutil.cpu_count()} cores){pg_note}"
    )
    for name in ("embedded", "Mosquitto"):
        if name in res.missing:
            say(f"   {name:<10} not measured: {res.missing[name]}")
        for p in res.points.get(name, []):
            say(point_line(p))
            say(f"      CPU: {share_line(p)}")
            say(latency_line(p))
            say(f"      {p.engine}")
    say()
    say("2. Largest fleet under 50 % of the machine: the line through the two points")
    fits = {}
    for name, pts in res.points.items():
        if len(pts) < 2:
            continue
        f = fits[name] = fit(pts)
        marginal = f.b * (psutil.cpu_count() or 1) * 60 * 1000
        say(
            f"   {name}: share = {f.a:.2%} + {f.b * 1000:.3%} per 1,000 nodes"
            f" (marginal CPU {marginal:.2f} ms a message) -> 50 % at"
            f" {fmt(f.nodes_at_target)} nodes ({fmt(f.nodes_at_target / 60)} msg/s)"
        )
        if any(p.served < 0.95 * p.nodes for p in pts):
            say(
                "      a point FELL BEHIND its offered rate (the server at its limit, or starved"
                " by other work on the machine: see 'rest of machine'); the line is unreliable"
            )
        say(
            f"      measured idle (N1's channels, connections open, no messages):"
            f" {res.idle.get(name, math.nan):.1%} against the line's {f.a:.1%} at 0 nodes"
        )
    say()
    say("3. Every phase's check (rows in the database against the PUBACKed messages)")
    for name, pts in res.points.items():
        for p in pts:
            say(f"   {name}, {p.nodes:,} nodes: {p.check}")
    say()
    say(
        "   The figures are the cost per message at a steady offered rate; a few hundred"
        " connections stand for the fleet, so the broker's cost of 500,000 open TLS"
        " sessions and their keepalives is not in them (see the docstring)."
    )
    say()
    say("TARGETS (from the issue; a MISS is reported, never fatal)")
    if not plan.engine:
        say("  not judged: the rule engine was off (--no-engine); the issue's figure has it on")
        return
    for name in ("embedded", "Mosquitto"):
        what = f"  >= {TARGET_NODES:,} nodes under 50 % CPU on 2 cores, {name:<9}"
        f2 = fits.get(name)
        if f2 is None:
            why = res.missing.get(name, "fewer than two points")
            say(f"{what}  not measured: {why}")
            continue
        ok = math.isfinite(f2.nodes_at_target) and f2.nodes_at_target >= TARGET_NODES
        say(f"{what}  {fmt(f2.nodes_at_target)} nodes  {verdict(ok)}")


async def run(
    frame: runner.Frame,
    plan: Plan,
    rounds: int,
    logs: Path | None,
    brokers: set[str],
    profile: Path | None = None,
) -> int:
    t_start = time.perf_counter()
    res = Results()
    pg_pid = frame.pg_pid or await asyncio.to_thread(pg.local_postmaster, frame.dsn)
    prof = None
    if profile is not None:
        if frame.embedded:
            pg_pid = await asyncio.to_thread(pg.preload_stat_statements, frame.work) or pg_pid
        ready = await asyncio.to_thread(pg.stat_statements_ready, frame.dsn)
        prof = Profiler(profile, frame.dsn if ready else None)
        say(
            f"  --profile {profile}: py-spy on the server, PostgreSQL's CPU by process"
            + (", pg_stat_statements" if ready else " (pg_stat_statements not preloaded there)")
        )
    pg_note = ""
    if not frame.embedded:
        pg_note = (
            "; PostgreSQL: the whole server behind --dsn, other databases' work included"
            if pg_pid
            else "; PostgreSQL: not measured (not on this machine), so not in the totals"
        )
    say(f"database: {pg.describe(frame.dsn, frame.embedded)}")
    dsn = await asyncio.to_thread(pg.serving_dsn, frame.dsn)
    for name, fn, fatal in (("embedded", embedded, True), ("Mosquitto", mosquitto, False)):
        if name.lower() not in brokers:
            res.missing[name] = "not asked for (--brokers)"
            continue
        say()
        say(f"[{name}] nodes {', '.join(f'{n:,}' for n in plan.nodes)}")
        got = await runner.part(res, name, fatal, fn(dsn, frame.work, plan, rounds, pg_pid, prof))
        if got is not None:
            res.points[name], res.idle[name] = got
    report(res, plan, pg_note)
    say()
    say(f"bench finished in {time.perf_counter() - t_start:.0f} s")
    if logs:
        keep_logs(frame.work, logs)
    return 1 if res.broke else 0


def keep_logs(work: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for f in [*work.glob("*.log"), *work.glob("*.stderr"), *work.glob("mosquitto-root/**/*.log")]:
        shutil.copy(f, dest / (f.name if f.parent == work else f"shipped-{f.name}"))
    say(f"logs kept in {dest}")


def cli(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--dsn", help="PostgreSQL DSN of a scratch database (default: embedded)")
    ap.add_argument("--duration", type=float, help="seconds of each measured window")
    ap.add_argument("--nodes", help="the two offered fleets, N1,N2 (nodes = messages a minute)")
    ap.add_argument("--connections", type=int, help="device connections standing for the fleet")
    ap.add_argument("--quick", action="store_true", help="smoke run with tiny sizes")
    ap.add_argument(
        "--brokers",
        default="embedded,mosquitto",
        help="which brokers' sides to run, comma-separated (default: embedded,mosquitto)",
    )
    ap.add_argument(
        "--profile",
        type=Path,
        help="also where the CPU goes in each window (py-spy, PostgreSQL by process and"
        " statement), kept in this directory",
    )
    ap.add_argument(
        "--no-engine",
        action="store_true",
        help="the server with its rule engine off (OPENSENSE_ALARMS_ENABLED=false): what"
        " the fleet costs without it, to weigh its share; not the issue's figure",
    )
    ap.add_argument(
        "--logs", type=Path, help="keep the servers', Mosquitto's and workers' logs here"
    )
    args = ap.parse_args(argv)
    brokers = {b.strip().lower() for b in args.brokers.split(",") if b.strip()}
    if not brokers or not brokers <= {"embedded", "mosquitto"}:
        ap.error("--brokers wants embedded, mosquitto or both")
    plan = QUICK if args.quick else FULL
    if args.duration:
        plan = dataclasses.replace(plan, duration=args.duration)
    if args.connections:
        plan = dataclasses.replace(plan, connections=args.connections)
    if args.no_engine:
        plan = dataclasses.replace(plan, engine=False)
    if args.nodes:
        n1, n2 = (int(x) for x in args.nodes.split(","))
        if not 0 < n1 < n2:
            ap.error("--nodes wants N1,N2 with 0 < N1 < N2")
        plan = dataclasses.replace(plan, nodes=(n1, n2))
    if plan.nodes[1] // plan.connections <= max(1, round(plan.nodes[0] / plan.connections)):
        ap.error("--nodes: N2 must give more nodes per connection than N1")
    rounds = int(os.environ.get("OPENSENSE_BCRYPT_ROUNDS", "4"))
    say(
        f"OpenSense fleet benchmark{' (--quick)' if args.quick else ''}"
        f"{' (--no-engine: the rule engine OFF)' if args.no_engine else ''},"
        f" {datetime.now(UTC):%Y-%m-%d %H:%M:%S}Z"
    )
    say(
        f"  machine: {psutil.cpu_count()} cores shared by the broker, the server, PostgreSQL and"
        f" the load; load average before start {os.getloadavg()[0]:.2f}"
    )
    say(
        f"  load: {plan.connections} device connections (paho, TLS, QoS 1) in {plan.workers}"
        f" process(es), open loop on a schedule; {plan.warm:g} s of schedule before each"
        f" {plan.duration:g} s window"
    )
    say(f"  mosquitto: {mosquitto_version()}")
    return runner.run(
        "fleet", args.dsn, lambda frame: run(frame, plan, rounds, args.logs, brokers, args.profile)
    )


if __name__ == "__main__":
    sys.exit(cli())
