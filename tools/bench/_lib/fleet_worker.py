"""The fleet bench's publisher processes (`python tools/bench/_lib/fleet_worker.py`):
paho clients, each one device connection kept open over TLS for the whole run,
publishing QoS 1 measurement messages on a fixed schedule (open loop: a message goes
out when it is due, whatever the broker or the server do). Standard library, paho
and _lib/publisher.py only: it runs as a script.

Each connection speaks for `k` simulated nodes ("virtual nodes" v = 0..k-1): every
virtual node has its own three probe channels (labels n<v>p0, n<v>p1, n<v>p2) and
sends one 3-reading message a minute, every message timestamped with the wall clock
at the moment it is published (milliseconds), so a connection carries k messages a
minute and a process of m connections one message every 60 / (m k) s.

Protocol on stdin/stdout, one line each: the bench writes the JSON spec; the worker
connects every client and answers READY (or ERROR <text>). Then, any number of times:
- "WARM <v0> <v1>": one message for each virtual node v0 <= v < v1 of every client
  (this creates their channels), `window` in flight per client; answers
  "WARMED <json>" once each is acknowledged (or 600 s passed).
- "RUN <k> <t_go> <t0> <t1> <track_every>" (time.monotonic() values, the same clock
  in every process on Linux): the schedule of k virtual nodes per client from t_go
  until t1; PUBACKs are counted from t0. Every track_every-th message is announced as
  "T <client_id> <v> <ts_ms>" when it is published (the bench looks for its rows);
  after t1 the worker waits for the outstanding PUBACKs and answers "RESULT <json>".
End of stdin (the bench died) ends a worker.
"""

from __future__ import annotations

import json
import ssl
import sys
import threading
import time
from pathlib import Path
from typing import Any

if not __package__:  # run as a script: its package `_lib` importable, as in the benches
    sys.path.append(str(Path(__file__).resolve().parents[1]))

from _lib.publisher import Publisher  # noqa: E402

ACK_DRAIN_S = 30.0  # after a run, how long the worker waits for outstanding PUBACKs
WARM_TIMEOUT_S = 600.0
LATE_S = 0.1  # a publish this far behind its schedule counts as late


def ts_ms_text(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"


def payload(v: int, ms: int, n: int) -> bytes:
    """Virtual node v's measurement message (docs/product.md: as HTTP without `device`):
    three probes at one instant, DS18B20 steps, inside chilled storage's -2..+5 °C."""
    t = ts_ms_text(ms)
    return json.dumps(
        {
            "measurements": [
                {
                    "type": "temperature",
                    "value": 2 + ((n + j) % 40) / 16,
                    "label": f"n{v}p{j}",
                    "ts": t,
                }
                for j in range(3)
            ]
        },
        separators=(",", ":"),
    ).encode()


class Run:
    """The window of the current RUN and what was counted in it (shared by clients)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.t0 = float("inf")
        self.t1 = float("inf")
        self.in_window = 0  # PUBACKs in [t0, t1] of messages published in it
        self.puback: list[float] = []  # their publish -> PUBACK seconds

    def reset(self, t0: float, t1: float) -> None:
        with self.lock:
            self.t0, self.t1 = t0, t1
            self.in_window = 0
            self.puback = []

    def count(self, sent: float, now: float) -> None:
        if self.t0 <= sent <= self.t1:
            with self.lock:
                self.in_window += 1
                self.puback.append(now - sent)


class Client(Publisher):
    def __init__(self, spec: dict[str, Any], conf: dict[str, Any], run: Run) -> None:
        super().__init__(str(spec["client_id"]), str(spec["topic"]), int(conf.get("inflight", 100)))
        self.run = run
        self.c.username_pw_set(str(spec["username"]), str(spec["password"]))
        # CERT_REQUIRED with the CA and the host name checked, as the firmware does
        self.c.tls_set(ca_certs=conf["ca"], cert_reqs=ssl.CERT_REQUIRED)

    def send(self, v: int) -> int:
        """Publish virtual node v's message now; its timestamp (epoch ms)."""
        with self.lock:
            n = self.sent
            self.sent += 1
            self.sending += 1
        ms = int(time.time() * 1000)
        self._publish(payload(v, ms, n))
        return ms

    def _acked(self, sent: float, now: float) -> None:
        with self.lock:
            self.acked += 1
        self.run.count(sent, now)


def _wait(clients: list[Client], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while any(cl.outstanding() for cl in clients):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def warm(clients: list[Client], v0: int, v1: int, window: int) -> dict[str, Any]:
    """One message per virtual node v0..v1-1 of every client, `window` in flight each."""
    acked0 = sum(cl.acked for cl in clients)
    deadline = time.monotonic() + WARM_TIMEOUT_S
    for v in range(v0, v1):
        for cl in clients:
            while cl.outstanding() >= window and time.monotonic() < deadline:
                time.sleep(0.002)
            cl.send(v)
    done = _wait(clients, max(1.0, deadline - time.monotonic()))
    return {
        "acked": sum(cl.acked for cl in clients) - acked0,
        "unacked": sum(cl.outstanding() for cl in clients),
        "complete": done,
    }


def scheduled(
    clients: list[Client], run: Run, k: int, t_go: float, t1: float, track: int, offset: float
) -> dict[str, Any]:
    """Message j is due at t_go + offset + j / rate and goes to client j % m, virtual
    node (j // m) % k: every virtual node once every 60 s, the process's messages evenly
    spaced."""
    m = len(clients)
    interval = 60.0 / (m * k)
    acked0 = sum(cl.acked for cl in clients)
    published = late = 0
    lag_max = 0.0
    j = 0
    while True:
        due = t_go + offset + j * interval
        if due >= t1:
            break
        now = time.monotonic()
        if due > now:
            time.sleep(due - now)
        else:
            lag = now - due
            lag_max = max(lag_max, lag)
            late += lag > LATE_S
        cl, v = clients[j % m], (j // m) % k
        ms = cl.send(v)
        published += 1
        if track and j % track == 0:
            print(f"T {cl.client_id} {v} {ms}", flush=True)
        j += 1
    drained = _wait(clients, ACK_DRAIN_S)
    with run.lock:
        return {
            "published": published,
            "acked": sum(cl.acked for cl in clients) - acked0,
            "unacked": sum(cl.outstanding() for cl in clients),
            "drained": drained,
            "in_window": run.in_window,
            "puback_ms": [round(x * 1000, 2) for x in run.puback],
            "late": late,
            "lag_max_ms": round(lag_max * 1000, 1),
        }


def main() -> int:
    conf = json.loads(sys.stdin.readline())
    run = Run()
    clients = [Client(s, conf, run) for s in conf["clients"]]
    for cl in clients:
        try:
            cl.connect(conf["host"], int(conf["port"]))
        except OSError as exc:
            print(f"ERROR connecting {cl.client_id}: {exc!r}", flush=True)
            return 1
    for cl in clients:
        # a refused CONNECT is retried by paho's loop: the broker may get the
        # credentials a moment later (external: the server sends them)
        if not cl.connected.wait(float(conf.get("connect_timeout", 30))):
            print(f"ERROR no accepted CONNECT for {cl.client_id}: {cl.refusal or 'no CONNACK'}")
            return 1
    print("READY", flush=True)
    try:
        while True:
            line = sys.stdin.readline().split()
            if not line:
                return 0
            if line[0] == "WARM":
                out = warm(clients, int(line[1]), int(line[2]), int(conf.get("window", 10)))
                print("WARMED " + json.dumps(out), flush=True)
            elif line[0] == "RUN":
                k, t_go, t0, t1, track = (
                    int(line[1]),
                    float(line[2]),
                    float(line[3]),
                    float(line[4]),
                    int(line[5]),
                )
                run.reset(t0, t1)
                offset = float(conf.get("offset", 0.0)) * 60.0 / (len(clients) * k)
                out = scheduled(clients, run, k, t_go, t1, track, offset)
                print("RESULT " + json.dumps(out), flush=True)
    finally:
        for cl in clients:
            cl.close()


if __name__ == "__main__":
    sys.exit(main())
