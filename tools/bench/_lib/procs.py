"""Child processes of a bench: free ports, `opensense serve`, logs, stopping."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp

from .report import say

ROOT = Path(__file__).resolve().parents[3]
BIN = Path(sys.executable).parent  # the venv's bin: opensense, opensense-gateway
READY_TIMEOUT = 30.0  # seconds for a server or broker to come up

STARTED: list[Any] = []  # every process this run started (Popen or asyncio Process)


def free_port() -> int:
    """A TCP port nobody holds on 127.0.0.1, taken from below the kernel's ephemeral
    range. bind(0) hands out a port from that range, where this machine's outgoing
    connections (a parallel test's database or broker client) take their local ports
    too: one took such a port between the pick and the server's bind, and the server
    could not start (CI: "address already in use"). Below the range only another
    caller of this function can pick it, at random among 10,000."""
    try:
        lo = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        lo = 0  # not Linux: bind(0) as before
    for _ in range(100 if lo > 11_024 else 0):
        port = lo - 1 - secrets.randbelow(10_000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue  # held (or lingering): another
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def rss_kb(pid: int, field: str = "VmHWM") -> int:
    """A field of /proc/<pid>/status in kB (VmHWM: the peak resident set)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


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
        elif proc.returncode is None:  # an asyncio child whose event loop is gone
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
    STARTED.clear()


def launch(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """A child with its output appended to `log`, in a session of its own (Ctrl-C
    reaches the bench, which stops it), remembered for stop_all()."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    STARTED.append(proc)
    return proc


class Serve:
    """`opensense serve` as a separate process: the bench's environment plus `env`,
    jobs off, warnings only. Restartable on the same ports."""

    def __init__(
        self,
        dsn: str,
        log_path: Path,
        env: dict[str, str] | None = None,
        mqtt_port: int | None = None,
        ready_timeout: float = READY_TIMEOUT,
    ) -> None:
        self.port = free_port()
        self.mqtt_port = mqtt_port  # the embedded broker's: ready when it listens too
        self.ready_timeout = ready_timeout
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.env = {
            **os.environ,
            "OPENSENSE_DATABASE_URL": dsn,
            "OPENSENSE_JOBS": "false",
            "OPENSENSE_LOG_LEVEL": "WARNING",
            **(env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self._extra: dict[str, str] = {}
        self._ready_once = False  # after it, the ports stay (restart: the same ones)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, **extra: str) -> Serve:
        cmd = [str(BIN / "opensense"), "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        self._extra = extra
        self.proc = launch(cmd, self.log_path, {**self.env, **extra})
        return self

    def _taken_port(self) -> bool:
        """The first start lost its HTTP port to another process between `free_port`'s
        pick and the server's bind (another bench or test picking the same one: CI saw
        it once): it may take another, as nobody has been told this one yet."""
        if self._ready_once or "address already in use" not in self.log_tail(3):
            return False
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.start(**self._extra)
        return True

    async def wait_ready(self) -> None:
        """/healthz answers 200 (and, with an embedded broker, its port listens: it
        opens once the app's startup has run)."""
        assert self.proc is not None
        timeout, mqtt_port = self.ready_timeout, self.mqtt_port
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as http:
            retries = 2
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    if retries and self._taken_port():
                        retries -= 1
                        continue
                    raise RuntimeError(
                        f"the server exited with {self.proc.returncode}: {self.log_tail(8)}"
                    )
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"{self.base}/healthz") as r:
                        if r.status == 200 and (mqtt_port is None or listening(mqtt_port)):
                            self._ready_once = True
                            return
                await asyncio.sleep(0.1)
        raise RuntimeError(f"the server was not ready within {timeout:.0f} s")

    async def restart(self, **extra: str) -> None:
        self.stop()
        self.start(**extra)
        await self.wait_ready()

    def log_tail(self, lines: int = 30) -> str:
        return tail(self.log_path, lines)

    def stop(self, timeout: float = 15) -> None:
        if self.proc is not None:
            stop_popen(self.proc, timeout)
        self.proc = None


@contextlib.contextmanager
def watched(*servers: Serve) -> Iterator[None]:
    """The servers are stopped after the block; if it fails, their logs' tails are
    printed first (why a server refused or died is in there)."""
    try:
        yield
    except BaseException:
        for srv in servers:
            say(f"--- {srv.log_path.name} (tail) ---\n{srv.log_tail()}")
        raise
    finally:
        for srv in servers:
            srv.stop()
