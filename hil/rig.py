"""The bench rig: one interface, two implementations (issue 17 item 13).

A scenario (tests/test_hil.py) is written once against `Rig`: it adds nodes, cuts
their power, their Wi-Fi or the link to the broker, and asserts on the server. The
`VirtualRig` runs the real firmware on the MicroPython unix port (SimNode) behind a
`LinkProxy`; the `RealRig` drives ESP32s on a bench (boards found by USB serial
number, flashed with `opensense node flash`, consoles captured with timestamps, power
and Wi-Fi switched by the commands of one config file). docs/bench-rig.md.
"""

from __future__ import annotations

import json
import os
import random
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

LINK_MODES = ("up", "drop", "stall", "delay", "blackhole", "lossy")
# the moments a power cut can be timed to (`Rig.power_cut(node, during=...)`)
CUT_MOMENTS = ("flash_write", "tls_handshake")
PROBE_STATES = ("ok", "unplugged", "shorted")


class Rig(ABC):
    """What a scenario may do to the world of its nodes."""

    @abstractmethod
    def add_node(
        self, name: str, config: dict[str, Any], ca_der: bytes, ctl: dict[str, Any]
    ) -> None:
        """Install a node (its config and the broker's CA) and power it on. `ctl` is the
        simulated world (clock speed, probes; firmware/hw/sim.py): the real rig has a
        real one and ignores it."""

    @abstractmethod
    def power_cut(self, node: str, during: str | None = None) -> None:
        """Pull the plug and plug it in again (RTC memory lost, flash kept); `during`
        (one of CUT_MOMENTS) waits for that moment first: in the middle of a flash
        write, or of a TLS handshake (ClientHello sent, the server's answer held)."""

    @abstractmethod
    def probe(self, node: str, index: int, state: str) -> None:
        """A probe of the node's bus: ok (plugged in), unplugged, or shorted (the data
        line held to ground, the whole bus)."""

    @abstractmethod
    def reinstall(self, node: str, config: dict[str, Any] | None = None) -> None:
        """`opensense node flash` over the running node (a new config if given): the
        firmware and config copied, the chip reset, its flash queue kept."""

    @abstractmethod
    def samples(self, node: str) -> list[tuple[int, int, dict[str, float], int]]:
        """(seq, Unix time, {label: value}, true time) of every reading the node took."""

    @abstractmethod
    def events(self, node: str) -> list[str]:
        """The node's event lines (uptime, true time, what)."""

    @abstractmethod
    def wifi(self, up: bool, node: str | None = None) -> None:
        """The access point on or off (for one node on the virtual rig, else all)."""

    @abstractmethod
    def link(self, mode: str, delay_ms: int = 0) -> None:
        """The path to the broker: up, drop (connections cut, new ones refused), stall
        (connections held, nothing forwarded), delay (`delay_ms` each way), blackhole
        (connections accepted, nothing ever answered), lossy (each connection cut after
        a random 20-100 % of `delay_ms`)."""

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
        self.hold_next = False  # the next connection: its first client bytes, then held
        self.held = threading.Event()  # set once such a connection is being held
        self.accepted = 0  # connections forwarded, for the reconnect scenarios
        threading.Thread(target=self._accept, daemon=True).start()

    def hold_handshake(self) -> None:
        """The next connection forwards the client's first bytes (a TLS ClientHello)
        and then holds everything: the node waits for the ServerHello. `held` is set
        once it does."""
        self.held.clear()
        self.hold_next = True

    def set(self, mode: str, delay_ms: int = 0) -> None:
        if mode not in LINK_MODES:
            raise ValueError(f"link mode {mode!r}: one of {', '.join(LINK_MODES)}")
        self.mode, self.delay = mode, delay_ms / 1000
        if mode in ("drop", "lossy"):  # lossy: the open ones cut too (the new get a life)
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
                self.conns = [x for x in self.conns if x.fileno() != -1]  # closed: gone
                self.conns += [c, s]
                self.accepted += 1
            hold, self.hold_next = self.hold_next, False
            # lossy: each connection lives a random time up to `delay` (then cut)
            life = random.uniform(0.2, 1.0) * self.delay if self.mode == "lossy" else None
            threading.Thread(target=self._pipe, args=(c, s, hold, life), daemon=True).start()

    def _pipe(
        self, a: socket.socket, b: socket.socket, hold: bool = False, life: float | None = None
    ) -> None:
        end = None if life is None else time.monotonic() + life
        try:
            while True:
                if self.mode in ("stall", "blackhole"):
                    time.sleep(0.1)  # held: bytes wait in the kernel's buffers
                    continue
                if end is not None and time.monotonic() > end:
                    return  # a lossy link's connection dies
                r, _, _ = select.select([a, b], [], [], 0.2)
                for x in r:
                    data = x.recv(65536)
                    if not data:
                        raise OSError
                    if self.delay and self.mode == "delay":
                        time.sleep(self.delay)
                    (b if x is a else a).sendall(data)
                    if hold and x is a:
                        self.held.set()  # ClientHello on its way; no answer will come
                        while self.mode != "drop":
                            time.sleep(0.05)
                        return
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
    """Simulated nodes (the real firmware on the unix port), each behind a LinkProxy of
    its own to the broker at `broker_port`; the fast clock is each node's ctl `speed`."""

    def __init__(self, root: Path, broker_port: int) -> None:
        self.root = root
        self.broker_port = broker_port
        self.proxies: dict[str, LinkProxy] = {}  # one per node: its own Wi-Fi and link
        self.mode = ("up", 0)  # what `link` last set, for every node whose AP is on
        self.nodes: dict[str, Any] = {}

    @property
    def proxy(self) -> LinkProxy:
        """The first node's link proxy (its counters, for a scenario of one node)."""
        return next(iter(self.proxies.values()))

    def _point(self, name: str, config: dict[str, Any]) -> dict[str, Any]:
        if name not in self.proxies:
            self.proxies[name] = LinkProxy(self.broker_port)
            self.proxies[name].set(*self.mode)
        cfg = dict(config)
        port = self.proxies[name].port
        cfg["server"] = dict(cfg["server"], host="localhost", mqtt_port=port)
        return cfg

    def add_node(
        self, name: str, config: dict[str, Any], ca_der: bytes, ctl: dict[str, Any]
    ) -> Any:
        from opensense.node.sim import SimNode

        node = SimNode(self.root / name, self._point(name, config), ca_der, ctl)
        self.nodes[name] = node
        if not node.ctl.get("wifi", True):
            self.proxies[name].set("drop")  # no AP: no connection either
        node.start()
        return node

    def power_cut(self, node: str, during: str | None = None, within: float = 60) -> None:
        n = self.nodes[node]
        if during == "flash_write":
            held = n.dir / "held"
            held.unlink(missing_ok=True)
            n.set(hold_write=True)  # the board stops half-way through its next write
            _wait(held.exists, within, f"{node}: a flash write")
            n.set(hold_write=False)
            held.unlink()
        elif during == "tls_handshake":
            proxy = self.proxies[node]
            proxy.hold_handshake()  # and the node's connection is cut for it:
            proxy.set("drop")  # the next one is a new handshake
            proxy.set(*self.mode)
            if not proxy.held.wait(within):
                raise TimeoutError(f"{node}: no TLS handshake in {within} s")
        elif during is not None:
            raise ValueError(f"power cut during {during!r}: one of {', '.join(CUT_MOMENTS)}")
        n.power_cut()

    def probe(self, node: str, index: int, state: str) -> None:
        if state not in PROBE_STATES:
            raise ValueError(f"probe state {state!r}: one of {', '.join(PROBE_STATES)}")
        n = self.nodes[node]
        n.set_probe(index, fault="absent" if state == "unplugged" else None)
        n.set(short=state == "shorted")

    def reinstall(self, node: str, config: dict[str, Any] | None = None) -> None:
        # as `opensense node flash` over a running chip: mpremote interrupts the
        # firmware, copies the files (the config), and ends in a reset that keeps the
        # flash and RTC memory
        n = self.nodes[node]
        n.interrupt()
        if config is not None:
            from opensense.statedir import write_secret

            write_secret(n.dir / "config.json", json.dumps(self._point(node, config)).encode())
        n.cause = "soft"
        n.start()

    def samples(self, node: str) -> list[tuple[int, int, dict[str, float], int]]:
        return list(self.nodes[node].samples())

    def events(self, node: str) -> list[str]:
        return list(self.nodes[node].events())

    def wifi(self, up: bool, node: str | None = None) -> None:
        for name, n in self.nodes.items():
            if node in (None, name):
                n.set(wifi=up)
                # the AP gone takes the node's TCP connections with it, and no new
                # one gets through until it is back (the simulated board's sockets
                # are the host's: they would live on)
                self.proxies[name].set(*(self.mode if up else ("drop", 0)))

    def link(self, mode: str, delay_ms: int = 0) -> None:
        self.mode = (mode, delay_ms)
        for name, p in self.proxies.items():
            if self.nodes[name].ctl.get("wifi", True):
                p.set(mode, delay_ms)

    def console(self, node: str) -> str:
        return str(self.nodes[node].console())

    def close(self) -> None:
        for n in self.nodes.values():
            n.close()
        for p in self.proxies.values():
            p.close()


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
    probe: str = ""  # a relay on a probe's DQ line: {board} {index} {state}
    # console lines that mark a moment to cut the power at (`Rig.power_cut(during=)`)
    moments: dict[str, str] = field(default_factory=dict)

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
        return cls(
            here / raw["ca"],
            raw["power"],
            raw["wifi"],
            raw.get("link", ""),
            boards,
            raw.get("probe", ""),
            {str(k): str(v) for k, v in raw.get("moments", {}).items()},
        )


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


def _wait(pred: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} in {within} s")
        time.sleep(0.02)


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

    def add_node(
        self, name: str, config: dict[str, Any], ca_der: bytes, ctl: dict[str, Any]
    ) -> None:
        # `ctl` is the simulated world: a bench has a real one
        b = self.boards[name]
        b.config.write_text(json.dumps(config))
        self.cfg.ca.write_bytes(ca_der)
        self.flash(name)

    def reinstall(self, node: str, config: dict[str, Any] | None = None) -> None:
        if config is not None:
            self.boards[node].config.write_text(json.dumps(config))
        self.flash(node)

    def probe(self, node: str, index: int, state: str) -> None:
        if state not in PROBE_STATES:
            raise ValueError(f"probe state {state!r}")
        if not self.cfg.probe:
            raise RuntimeError("no `probe` command (a relay on the DQ lines) in the rig config")
        self._cmd(self.cfg.probe, board=node, index=index, state=state)

    def power_cut(self, node: str, during: str | None = None, within: float = 600) -> None:
        b = self.boards[node]
        if during is not None:
            mark = self.cfg.moments.get(during)
            if not mark:
                raise RuntimeError(f"no console line marks {during!r}: [moments] in the rig config")
            seen = len(self.consoles[node].lines)
            deadline = time.monotonic() + within
            while not any(mark in line for _, line in self.consoles[node].lines[seen:]):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{node}: no {mark!r} on the console in {within} s")
                time.sleep(0.005)
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

    def events(self, node: str) -> list[str]:
        # the board's event lines as the simulated board writes them (uptime, true time,
        # what), from console lines "ev <uptime> <what>" stamped by the rig's clock
        out = []
        for t, line in self.consoles[node].lines:
            parts = line.split(" ", 2)
            if len(parts) == 3 and parts[0] == "ev" and parts[1].isdigit():
                out.append(f"{parts[1]} {int(t)} {parts[2]}")
        return out

    def samples(self, node: str) -> list[tuple[int, int, dict[str, float], int]]:
        from opensense.node.sim import parse_samples

        return parse_samples(self.events(node))

    def close(self) -> None:
        for c in self.consoles.values():
            c.close()


def rig_from_env(
    root: Path, broker_port: int, ports: Callable[[], list[tuple[str, str]]] | None = None
) -> Rig:
    """The real rig when OPENSENSE_RIG names its TOML file, else a virtual one whose
    nodes reach the broker at `broker_port` through a LinkProxy."""
    path = os.environ.get("OPENSENSE_RIG")
    if path:
        return RealRig(RealConfig.load(Path(path)), ports=ports)
    return VirtualRig(root, broker_port)
