"""Run firmware case modules under CPython and under the real micropython."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FIRMWARE = ROOT / "firmware"
HERE = Path(__file__).resolve().parent
MICROPYTHON = Path(sys.executable).with_name("micropython")
HEAP = "112k"  # what a MicroPython ESP32 (no PSRAM) has free after boot


def deps_dir() -> Path:
    from opensense.node.deps import ensure

    return ensure()


def mp_path(*extra: Path) -> str:
    return ":".join([".frozen"] + [str(p) for p in (HERE, FIRMWARE, deps_dir(), *extra)])


def run_mp(
    script: Path | str,
    *args: str,
    timeout: float = 120,
    env: dict[str, str] | None = None,
    heap: str = HEAP,
) -> subprocess.CompletedProcess[str]:
    e = dict(os.environ)
    e["MICROPYPATH"] = mp_path()
    e.update(env or {})
    return subprocess.run(
        [str(MICROPYTHON), "-X", f"heapsize={heap}", str(script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=e,
        cwd=str(HERE),
    )


def mp_cases(module: str, timeout: float = 300, heap: str = HEAP) -> dict[str, str]:
    """name -> 'ok' or the failure line, for every case of `module` under micropython."""
    r = run_mp(HERE / "mprun.py", module, timeout=timeout, heap=heap)
    out: dict[str, str] = {}
    for line in r.stdout.splitlines():
        if line.startswith("ok "):
            out[line[3:]] = "ok"
        elif line.startswith("FAIL "):
            out[line.split()[1]] = line
    if "done" not in r.stdout.splitlines():
        out["<runner>"] = (
            f"micropython exited {r.returncode}: {r.stdout[-2000:]} {r.stderr[-2000:]}"
        )
    return out


def case_names(module: str) -> list[str]:
    """The case_* functions of a case module, read from its source (some cases import
    MicroPython-only modules such as vfs, so CPython cannot import them)."""
    src = (HERE / f"{module}.py").read_text()
    return sorted(re.findall(r"^def (case_\w+)\(", src, re.M))
