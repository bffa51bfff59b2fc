"""Vendor uPlot (npm package `uplot`, MIT) into the dashboard's static files, or check
the vendored copy against its record (docs/dashboard.md, "Charts").

    .venv/bin/python tools/refresh_uplot.py              # the registry's latest version
    .venv/bin/python tools/refresh_uplot.py --version 1.6.32
    .venv/bin/python tools/refresh_uplot.py --check      # offline: files match VERSION

Refreshing asks the npm registry through its own client (`npm view`, `npm pack`),
checks the tarball against the registry's `dist.integrity` (SHA-512), and writes
uPlot.iife.min.js, uPlot.min.css and LICENSE with a VERSION file recording the
version, the tarball's integrity and each file's SHA-256. `--check` recomputes those
SHA-256 sums: a hand-edited or truncated vendored file fails it.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "uplot"
DEST = Path(__file__).resolve().parents[1] / "server/opensense/web/static/vendor/uplot"
# tarball member -> vendored name
FILES = {
    "package/dist/uPlot.iife.min.js": "uPlot.iife.min.js",
    "package/dist/uPlot.min.css": "uPlot.min.css",
    "package/LICENSE": "LICENSE",
}
RECORD = "VERSION"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_record(dest: Path = DEST) -> dict[str, str]:
    """VERSION: `key value` lines (version, integrity, sha256 <file>)."""
    out = {}
    for line in (dest / RECORD).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key.strip()] = value.strip()
    return out


def check(dest: Path = DEST) -> list[str]:
    """What does not match the record (empty: the vendored copy is the recorded one)."""
    rec = read_record(dest)
    wrong = []
    for name in FILES.values():
        path = dest / name
        if not path.is_file():
            wrong.append(f"{name}: missing")
        elif sha256(path.read_bytes()) != rec.get(f"sha256 {name}"):
            wrong.append(f"{name}: SHA-256 differs from {RECORD}")
    return wrong


def npm(*args: str, cwd: Path | None = None) -> str:
    done = subprocess.run(
        ["npm", *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )
    if done.returncode:
        raise SystemExit(f"npm {' '.join(args)} failed:\n{done.stderr}")
    return done.stdout


def refresh(version: str | None, dest: Path = DEST) -> str:
    spec = f"{PACKAGE}@{version}" if version else PACKAGE
    meta = json.loads(npm("view", spec, "version", "dist.integrity", "--json"))
    version, integrity = meta["version"], meta["dist.integrity"]
    algo, _, want = integrity.partition("-")
    if algo != "sha512":
        raise SystemExit(f"unexpected integrity algorithm {algo!r}")
    with tempfile.TemporaryDirectory() as tmp:
        name = json.loads(npm("pack", f"{PACKAGE}@{version}", "--json", cwd=Path(tmp)))[0][
            "filename"
        ]
        tgz = (Path(tmp) / name).read_bytes()
        got = base64.b64encode(hashlib.sha512(tgz).digest()).decode()
        if got != want:
            raise SystemExit(f"{name}: SHA-512 {got} is not the registry's {want}")
        files = {}
        with tarfile.open(Path(tmp) / name) as tar:
            for member, vendored in FILES.items():
                f = tar.extractfile(member)
                if f is None:
                    raise SystemExit(f"{name} has no {member}")
                files[vendored] = f.read()
    dest.mkdir(parents=True, exist_ok=True)
    lines = [
        f"# uPlot vendored by tools/refresh_uplot.py from the npm registry ({PACKAGE}, MIT)",
        f"version {version}",
        f"integrity {integrity}",
    ]
    for vendored, data in files.items():
        (dest / vendored).write_bytes(data)
        lines.append(f"sha256 {vendored} {sha256(data)}")
    (dest / RECORD).write_text("\n".join(lines) + "\n")
    return version


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--version", help="the version to vendor (default: the latest)")
    ap.add_argument("--check", action="store_true", help="check the vendored files, offline")
    args = ap.parse_args(argv)
    if args.check:
        wrong = check()
        for w in wrong:
            print(w)
        print("uPlot", read_record().get("version"), "ok" if not wrong else "DIFFERS")
        return 1 if wrong else 0
    print("vendored uPlot", refresh(args.version), "into", DEST)
    return 0


if __name__ == "__main__":
    sys.exit(main())
