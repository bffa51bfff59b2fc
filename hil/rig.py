"""The bench rig: one interface, two implementations (issue 17 item 13).

A scenario (tests/test_hil.py) is written once against `Rig`: it adds nodes, cuts
their power, their Wi-Fi or the link to the broker, and asserts on the server. The
`VirtualRig` runs the real firmware on the MicroPython unix port (SimNode) behind a
`LinkProxy`; the `RealRig` drives ESP32s on a bench (boards found by USB serial
number, flashed with `opensense node flash`, consoles captured with timestamps, power
and Wi-Fi switched by the commands of one config file). docs/bench-rig.md.
"""

from __future__ import annotations

import select
import shlex
import socket
import subprocess
import threading
import time
import tomllib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LINK_MODES = ("up", "drop", "stall", "delay", "blackhole")


class Rig(ABC):
    """What a scenario may do to the world of its nodes."""

    @abstractmethod
    def power_cut(self, node: str) -> None:
        """Pull the plug and plug it in again (RTC memory lost, flash kept)."""

    @abstractmethod
    def wifi(self, up: bool, node: str | None = None) -> None:
        """The access point on or off (for one node on the virtual rig, else all)."""

    @abstractmethod
    def link(self, mode: str, delay_ms: int = 0) -> None:
        """The path to the broker: up, drop (connections cut, new ones refused), stall
        (connections held, nothing forwarded), delay (`delay_ms` each way), blackhole
        (connections accepted, nothing ever answered)."""

    @abstractmethod
    def console(self, node: str) -> str:
        """What the node printed, each line with the rig's timestamp."""

    @abstractmethod
    def close(self) -> None: ...


class LinkProxy:
    """127.0.0.1:<port> -> 127.0.0.1:<target>, with the failure modes of `Rig.link`."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.mode = "up"
        self.delay = 0.0
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def set(self, mode: str, delay_ms: int = 0) -> None:
        if mode not in LINK_MODES:
            raise ValueError(f"link mode {mode!r}: one of {', '.join(LINK_MODES)}")
        self.mode, self.delay = mode, delay_ms / 1000
        if mode == "drop":
            with self.lock:
                for c in self.conns:
                    try:
                        c.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    # closed here too: a blackholed connection has no pipe thread to
                    # close it (a pipe's own close in its `finally` is then a no-op)
                    c.close()
                self.conns.clear()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            if self.mode == "drop":
                c.close()
                continue
            if self.mode == "blackhole":
                with self.lock:
                    self.conns.append(c)  # held open, never answered
                continue
            try:
                s = socket.create_connection(("127.0.0.1", self.target), timeout=5)
            except OSError:
                c.close()
                continue
            with self.lock:
                self.conns += [c, s]
            threading.Thread(target=self._pipe, args=(c, s), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while True:
                if self.mode in ("stall", "blackhole"):
                    time.sleep(0.1)  # held: bytes wait in the kernel's buffers
                    continue
                r, _, _ = select.select([a, b], [], [], 0.2)
                for x in r:
                    data = x.recv(65536)
                    if not data:
                        raise OSError
                    if self.delay:
                        time.sleep(self.delay)
                    (b if x is a else a).sendall(data)
        except (OSError, ValueError):
            pass
        finally:
            for x in (a, b):
                try:
                    x.close()
                except OSError:
                    pass

    def close(self) -> None:
        self.set("drop")
        self.sock.close()


class VirtualRig(Rig):
    """Simulated nodes (the real firmware on the unix port) behind a LinkProxy to the
    broker at `broker_port`; the fast clock is each node's ctl `speed`."""

    def __init__(self, root: Path, broker_port: int) -> None:
        self.root = root
        self.proxy = LinkProxy(broker_port)
        self.nodes: dict[str, Any] = {}

    def add_node(
        self, name: str, config: dict[str, Any], ca_der: bytes, ctl: dict[str, Any]
    ) -> Any:
        from opensense.node.sim import SimNode

        cfg = dict(config)
        cfg["server"] = dict(cfg["server"], host="localhost", mqtt_port=self.proxy.port)
        node = SimNode(self.root / name, cfg, ca_der, ctl)
        self.nodes[name] = node
        node.start()
        return node

    def power_cut(self, node: str) -> None:
        self.nodes[node].power_cut()

    def wifi(self, up: bool, node: str | None = None) -> None:
        for name, n in self.nodes.items():
            if node in (None, name):
                n.set(wifi=up)

    def link(self, mode: str, delay_ms: int = 0) -> None:
        self.proxy.set(mode, delay_ms)

    def console(self, node: str) -> str:
        return str(self.nodes[node].console())

    def close(self) -> None:
        for n in self.nodes.values():
            n.close()
        self.proxy.close()


@dataclass
class Board:
    name: str
    usb_serial: str  # the USB-serial chip's serial number (udev ID_SERIAL_SHORT)
    config: Path  # the node's config.json for `opensense node flash`
    hub: str = ""  # uhubctl -l <hub> -p <port>
    port: int = 0
    device: str = ""  # /dev/ttyUSB… once found


@dataclass
class RealConfig:
    """The bench in one TOML file (docs/bench-rig.md):

    ca = "ca.der"
    power = "uhubctl -l {hub} -p {port} -a {action}"   # action: on / off
    wifi = "ssh bench-ap 'wifi {action}'"               # action: up / down
    link = "sudo /usr/local/bin/rig-link {mode} {delay_ms}"
    [[board]]
    name = "n1"; usb_serial = "0001A2B3"; config = "n1.json"; hub = "1-1"; port = 2
    """

    ca: Path
    power: str
    wifi: str
    link: str = ""
    boards: list[Board] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> RealConfig:
        raw = tomllib.loads(path.read_text())
        here = path.parent
        boards = [
            Board(
                b["name"],
                str(b["usb_serial"]),
                here / b["config"],
                str(b.get("hub", "")),
                int(b.get("port", 0)),
            )
            for b in raw.get("board", [])
        ]
        return cls(here / raw["ca"], raw["power"], raw["wifi"], raw.get("link", ""), boards)


class Console:
    """A board's serial console, each line stamped with the rig's clock when read."""

    def __init__(self, port: Any, clock: Callable[[], float] = time.time) -> None:
        self.port = port
        self.clock = clock
        self.lines: list[tuple[float, str]] = []
        self.stopping = False
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        buf = b""
        while not self.stopping:
            try:
                chunk = self.port.read(256)
            except Exception:  # noqa: BLE001 - a board unplugged by a power cut
                time.sleep(0.1)
                continue
            buf += chunk or b""
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                self.lines.append((self.clock(), line.decode(errors="replace").rstrip("\r")))

    def text(self) -> str:
        return "".join(f"{t:.3f} {line}\n" for t, line in self.lines)

    def close(self) -> None:
        self.stopping = True
        self.thread.join(2)
        self.port.close()


Run = Callable[[list[str]], subprocess.CompletedProcess[str]]


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)


class RealRig(Rig):
    """ESP32s on a bench. `run` executes the config's commands and `opensense node
    flash`; `open_serial` opens a console (pyserial's `serial_for_url`); `ports` lists
    (device, USB serial number) pairs (pyserial's `comports`). All three are
    parameters so the rig's code runs in tests against fakes."""

    def __init__(
        self,
        config: RealConfig,
        run: Run = _run,
        open_serial: Callable[[str], Any] | None = None,
        ports: Callable[[], list[tuple[str, str]]] | None = None,
    ) -> None:
        self.cfg = config
        self.run = run
        if open_serial is None:
            import serial

            def open_serial(dev: str) -> Any:
                return serial.serial_for_url(dev, 115200, timeout=0.2)

        if ports is None:
            from serial.tools import list_ports

            def ports() -> list[tuple[str, str]]:
                return [(p.device, p.serial_number or "") for p in list_ports.comports()]

        self.open_serial = open_serial
        self.boards = {b.name: b for b in config.boards}
        found = dict((sn, dev) for dev, sn in ports())
        missing = [b.name for b in config.boards if b.usb_serial not in found]
        if missing:
            raise RuntimeError(f"boards not plugged in (by USB serial number): {missing}")
        for b in config.boards:
            b.device = found[b.usb_serial]
        self.consoles = {b.name: Console(open_serial(b.device)) for b in config.boards}

    def _cmd(self, template: str, **values: Any) -> None:
        r = self.run(shlex.split(template.format(**values)))
        if r.returncode != 0:
            raise RuntimeError(f"{template.format(**values)}: {r.stderr or r.stdout}")

    def flash(self, node: str) -> None:
        b = self.boards[node]
        self.consoles[node].close()  # mpremote needs the port to itself
        cmd = ["opensense", "node", "flash", str(b.config), "--ca", str(self.cfg.ca)]
        r = self.run([*cmd, "--port", b.device])
        self.consoles[node] = Console(self.open_serial(b.device))
        if r.returncode != 0:
            raise RuntimeError(f"flash {node}: {r.stdout}{r.stderr}")

    def power_cut(self, node: str) -> None:
        b = self.boards[node]
        self._cmd(self.cfg.power, hub=b.hub, port=b.port, action="off")
        time.sleep(1)  # the ESP32's caps drain: a cut, not a brown-out
        self._cmd(self.cfg.power, hub=b.hub, port=b.port, action="on")

    def wifi(self, up: bool, node: str | None = None) -> None:
        if node is not None:
            raise ValueError("the real rig's access point serves every board")
        self._cmd(self.cfg.wifi, action="up" if up else "down")

    def link(self, mode: str, delay_ms: int = 0) -> None:
        if mode not in LINK_MODES:
            raise ValueError(f"link mode {mode!r}")
        if not self.cfg.link:
            raise RuntimeError("no `link` command in the rig config")
        self._cmd(self.cfg.link, mode=mode, delay_ms=delay_ms)

    def console(self, node: str) -> str:
        return self.consoles[node].text()

    def close(self) -> None:
        for c in self.consoles.values():
            c.close()
