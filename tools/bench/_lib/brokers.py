"""MQTT brokers for the benches: a broker of the bench's own (amqtt or Mosquitto,
nothing of OpenSense in it) and Mosquitto as shipped in deploy/mosquitto."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from .procs import READY_TIMEOUT, ROOT, STARTED, Serve, free_port, listening, stop_popen, tail
from .report import say

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
BOOTSTRAP = ROOT / "deploy" / "mosquitto" / "bootstrap.sh"
ADMIN_USER = "opensense"
ADMIN_PASSWORD = "bench-admin-password"


@dataclass(frozen=True)
class TlsPaths:
    ca: Path
    cert: Path
    key: Path


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
        ports = (self.tls_port, self.plain_port)
        await wait_listening(self.proc, ports, self.name, lambda: tail(self.log, 10))

    def stop(self) -> None:
        stop_popen(self.proc)
        self._log.close()


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
        ports = (self.tls_port, self.local_port)
        why = lambda: f"{tail(self.stderr, 5)} {tail(self.log, 5)}"  # noqa: E731
        await wait_listening(self.proc, ports, "mosquitto", why)

    def stop(self) -> None:
        if self.proc is not None:
            stop_popen(self.proc)


@contextlib.asynccontextmanager
async def shipped_with_server(
    work: Path, dsn: str, env: dict[str, str]
) -> AsyncIterator[tuple[ShippedMosquitto, Serve]]:
    """Mosquitto as shipped and `opensense serve` on it (OPENSENSE_MQTT=external, plus
    `env`), both up; a failure inside prints the tails of their logs; both are stopped
    after."""
    mosq = ShippedMosquitto(work)
    await asyncio.to_thread(mosq.setup)
    env = {
        **env,
        "OPENSENSE_MQTT": "external",
        "OPENSENSE_MQTT_URL": mosq.url,
        "OPENSENSE_STATE_DIR": str(mosq.state),
    }
    server = Serve(dsn, work / "server-external.log", env)
    try:
        mosq.start()
        await mosq.wait_ready()
        server.start()
        await server.wait_ready()
        yield mosq, server
    except BaseException:
        if server.proc is not None:
            say("--- server log (tail) ---\n" + server.log_tail())
        say("--- mosquitto log (tail) ---\n" + tail(mosq.log, 15))
        raise
    finally:
        server.stop()
        mosq.stop()


async def wait_listening(
    proc: subprocess.Popen[bytes], ports: tuple[int, ...], name: str, why: Callable[[], str]
) -> None:
    """Until the broker listens on every port; `why` (its log) if it exits instead."""
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited: {why()}")
        if all(listening(p) for p in ports):
            return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"{name} did not listen within {READY_TIMEOUT:.0f} s")


def mosquitto_version() -> str:
    try:
        out = subprocess.run(
            [MOSQUITTO, "-h"], capture_output=True, text=True, timeout=5
        ).stdout.splitlines()
        return out[0] if out else "?"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"not runnable ({exc})"
