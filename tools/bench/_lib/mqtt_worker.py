"""The MQTT load's processes: publishers and a subscriber (paho-mqtt), each a process
of its own (`python tools/bench/_lib/mqtt_worker.py pub|sub`) so the clients do not
share one interpreter with the bench or each other. Standard library, paho and
_lib/publisher.py only: it runs as a script.

Protocol on stdin/stdout, one line each: the bench writes the JSON spec; the worker
connects and answers READY (or ERROR <text>); the bench writes "GO <t0> <t1>"
(time.monotonic() values, the same clock in every process on Linux); a publisher
publishes from then on (a paced one only as far as the credit the bench grants
with "CREDIT <n>" reaches), counts from t0, stops at t1, waits for its outstanding
PUBACKs and answers "RESULT <json>". A subscriber counts until the bench writes
"STOP <expected>", waits for that many messages (at most 10 s) and answers RESULT.
End of stdin (the bench died) ends a worker.
"""

from __future__ import annotations

import functools
import json
import math
import ssl
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if not __package__:  # run as a script: its package `_lib` importable, as in the benches
    sys.path.append(str(Path(__file__).resolve().parents[1]))

from _lib.publisher import Publisher  # noqa: E402

LABELS = tuple(f"p{i}" for i in range(32))
READY_TIMEOUT = 30.0  # seconds for the subscription to be acknowledged
ACK_DRAIN_S = 30.0  # after the window, how long publishers wait for outstanding PUBACKs


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


class _Client(Publisher):
    """One paho client publishing QoS 1 messages with at most `window` in flight."""

    def __init__(self, spec: dict[str, Any], conf: dict[str, Any], run: _PubRun) -> None:
        self.window = int(conf["window"])
        super().__init__(
            str(spec["client_id"]), str(spec["topic"]), self.window, clean_session=True
        )
        self.run = run
        self.k = int(conf["k"])
        self.ts0 = int(spec.get("ts0", 0))
        self.ts_limit = int(spec.get("ts_limit", 2**62))
        if spec.get("username"):
            self.c.username_pw_set(str(spec["username"]), spec.get("password"))
        if conf.get("ca"):
            # CERT_REQUIRED with the CA and the host name checked, as the firmware does
            self.c.tls_set(ca_certs=conf["ca"], cert_reqs=ssl.CERT_REQUIRED)
        self.parked = 0  # free slots of the window waiting for credit
        self.out_of_ts = False

    def send(self) -> None:
        with self.lock:
            n = self.sent
            if self.ts0 + n > self.ts_limit:
                self.out_of_ts = True
                return
            self.sent += 1
            self.sending += 1
        self._publish(payload(self.k, self.ts0 + n, n))  # every message its own timestamp

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
    from paho.mqtt.enums import CallbackAPIVersion

    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-sub", clean_session=True)
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


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1]))
