"""What the gateway tests run: a site Mosquitto (deploy/gateway/mosquitto-site.conf
on free ports), a TCP proxy in front of the server whose link the test cuts, the
`opensense-gateway` process, and simulated nodes (paho clients with their tokens)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from hil.rig import LinkProxy

from .fixtures.processes import free_port

REPO = Path(__file__).resolve().parents[1]
SITE_CONF = REPO / "deploy" / "gateway" / "mosquitto-site.conf"
GATEWAY_BIN = Path(sys.executable).with_name("opensense-gateway")
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def wait_for(cond: Any, timeout: float, what: str, every: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


class TcpProxy(LinkProxy):
    """127.0.0.1:<port> -> target: the bench rig's link proxy (hil/rig.py). `cut()`
    drops every connection and refuses new ones (accepted and closed at once, as a
    dead WAN link with a live router); `restore()` lets them through again."""

    def cut(self) -> None:
        self.set("drop")

    def restore(self) -> None:
        self.set("up")


class SiteBroker:
    """Mosquitto with the shipped site config, moved into a temporary directory."""

    def __init__(self, root: Path, tls: tuple[Path, Path] | None = None) -> None:
        """`tls`: (certificate, key) PEM files for the nodes' TLS listener, which then
        listens on `tls_port` (the firmware speaks TLS only); without it, the loopback
        listener alone."""
        self.root = root
        self.port = free_port()
        self.tls_port = free_port() if tls else 0
        self.passwd = root / "site.passwd"
        self.acl = root / "site.acl"
        (root / "data").mkdir(parents=True, exist_ok=True)
        self.passwd.write_text("")
        self.acl.write_text("")
        text = SITE_CONF.read_text()
        text = text.replace("/etc/mosquitto/opensense/site.passwd", str(self.passwd))
        text = text.replace("/etc/mosquitto/opensense/site.acl", str(self.acl))
        text = text.replace("/var/lib/mosquitto/", str(root / "data") + "/")
        if tls:
            cert, key = tls
            text = re.sub(
                r"^listener 8883\ncertfile .*\nkeyfile .*\n",
                f"listener {self.tls_port} 127.0.0.1\ncertfile {cert}\nkeyfile {key}\n",
                text,
                flags=re.M,
            )
        else:  # the TLS listener needs certificates; the tests use the loopback listener
            text = re.sub(
                r"^listener 8883\ncertfile .*\nkeyfile .*\nuse_username_as_clientid true\n",
                "",
                text,
                flags=re.M,
            )
        text = text.replace("listener 1883 127.0.0.1", f"listener {self.port} 127.0.0.1")
        assert f"listener {self.port}" in text and "8883" not in text
        assert not tls or f"listener {self.tls_port}" in text
        assert str(self.passwd) in text and str(self.acl) in text
        if os.geteuid() == 0:
            text += "\nuser root\n"
        self.conf = root / "mosquitto.conf"
        self.conf.write_text(text)
        with open(root / "mosquitto.log", "wb") as log:  # the child keeps its own copy
            self.proc = subprocess.Popen(
                [MOSQUITTO, "-c", str(self.conf)], stdout=log, stderr=subprocess.STDOUT
            )
        wait_for(lambda: _listening(self.port), 10, "the site Mosquitto")
        if tls:
            wait_for(lambda: _listening(self.tls_port), 10, "the site Mosquitto's TLS listener")

    @property
    def reload_command(self) -> str:
        return f"kill -HUP {self.proc.pid}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class GatewayProcess:
    """`opensense-gateway --config <file>`; SIGKILL and start again at will."""

    def __init__(self, root: Path, **sections: dict[str, Any]) -> None:
        self.root = root
        self.state = root / "state"
        root.mkdir(parents=True, exist_ok=True)
        lines = []
        sections.setdefault("gateway", {})["state_dir"] = str(self.state)
        for sec, values in sections.items():
            lines.append(f"[{sec}]")
            lines += [f"{k} = {v}" for k, v in values.items()]
        self.conf = root / "gateway.conf"
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        with open(self.root / "gateway.log", "ab") as log:  # the child keeps its own copy
            self.proc = subprocess.Popen(
                [str(GATEWAY_BIN), "--config", str(self.conf)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def kill(self) -> None:
        """SIGKILL: no cleanup at all, as a power cut of the gateway."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def health(self) -> dict[str, Any]:
        try:
            return dict(json.loads((self.state / "health.json").read_text()))
        except (OSError, ValueError):
            return {}

    def queued(self) -> int:
        """Rows in the gateway's queue, read from its SQLite file (WAL: a reader
        never blocks the gateway)."""
        path = self.state / "queue.sqlite3"
        if not path.exists():
            return 0
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10) as db:
            try:
                return int(db.execute("SELECT count(*) FROM readings").fetchone()[0])
            except sqlite3.OperationalError:
                return 0

    def dead_letters(self) -> int:
        path = self.state / "queue.sqlite3"
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10) as db:
            return int(db.execute("SELECT count(*) FROM dead_letters").fetchone()[0])

    def log_text(self) -> str:
        return (self.root / "gateway.log").read_text(errors="replace")[-4000:]


class Node:
    """A node in site mode: its own token, QoS 1 publishes to the site broker. It logs
    in as the firmware does, as its `dev_` id (`user`), and publishes under its
    `local_id`."""

    def __init__(self, port: int, account: str, local_id: str, token: str, user: str) -> None:
        self.topic = f"opensense/{account}/{local_id}"
        self.c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=user, protocol=mqtt.MQTTv311
        )
        self.c.username_pw_set(user, token)
        self.c.max_inflight_messages_set(100)
        self.c.max_queued_messages_set(0)
        self.connected = threading.Event()
        self.refused: Any = None

        def on_connect(_c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
            if rc.is_failure:
                self.refused = rc
            else:
                self.connected.set()

        self.c.on_connect = on_connect
        self.c.connect("127.0.0.1", port, keepalive=30)
        self.c.loop_start()

    def publish(self, ts: float, value: float) -> mqtt.MQTTMessageInfo:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
        body = {"ts": stamp, "measurements": [{"type": "temperature", "value": value}]}
        return self.c.publish(self.topic, json.dumps(body), qos=1)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def connected_node(
    port: int, account: str, local_id: str, token: str, user: str, timeout: float = 15
) -> Node:
    """A node that got in: retried while the broker may still be reloading its files."""
    deadline = time.monotonic() + timeout
    while True:
        n = Node(port, account, local_id, token, user)
        if n.connected.wait(2):
            return n
        n.close()
        if time.monotonic() > deadline:
            raise AssertionError(f"the site broker keeps refusing {local_id}: {n.refused}")


def refused_node(
    port: int, account: str, local_id: str, token: str, user: str, timeout: float = 15
) -> Any:
    """The broker's answer to a token it must refuse (retried while it reloads)."""
    deadline = time.monotonic() + timeout
    while True:
        n = Node(port, account, local_id, token, user)
        answered = time.monotonic() + 5
        while n.refused is None and not n.connected.is_set():
            assert time.monotonic() < answered, "no CONNACK in 5 s"
            time.sleep(0.05)
        n.close()
        if n.refused is not None:
            return n.refused
        if time.monotonic() > deadline:
            raise AssertionError(f"the site broker still accepts this token for {local_id}")
        time.sleep(0.2)
