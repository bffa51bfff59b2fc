"""The firmware's dependencies, fetched as pinned, hashed PyPI sdists (firmware/deps.lock).

The same files run in the tests (MICROPYPATH) and on the chip (/lib): a download whose
sha256 differs from the lock is refused. umqtt.simple 1.3.4 needs one module umqtt
1.3.4 imports by its old name, `ussl`; the firmware maps it to its own verifying
wrapper (firmware/sense/tls.py), so no line of the pinned files is changed.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

FIRMWARE = Path(__file__).resolve().parents[3] / "firmware"
LOCK = FIRMWARE / "deps.lock"


@dataclass(frozen=True)
class Dep:
    name: str
    version: str
    sha256: str
    url: str
    member: str
    target: str  # path under /lib on the node


class DepError(Exception):
    pass


def locked(lock: Path = LOCK) -> list[Dep]:
    deps = []
    for line in lock.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            deps.append(Dep(*line.split()))
    return deps


def cache_dir() -> Path:
    base = os.environ.get("OPENSENSE_FWDEPS_CACHE") or str(
        Path.home() / ".cache" / "opensense" / "fwdeps"
    )
    return Path(base)


def fetch(dep: Dep, cache: Path) -> bytes:
    archive = cache / "archives" / f"{dep.sha256}.tar.gz"
    if archive.exists():
        data = archive.read_bytes()
    else:
        try:
            with urllib.request.urlopen(dep.url, timeout=60) as r:
                data = r.read()
        except OSError as e:
            raise DepError(
                f"could not download {dep.name} {dep.version} from {dep.url}: {e}; "
                "check the network or put the archive in "
                f"{archive} (sha256 {dep.sha256})"
            ) from e
    got = hashlib.sha256(data).hexdigest()
    if got != dep.sha256:
        raise DepError(
            f"{dep.name} {dep.version}: sha256 {got} is not the locked {dep.sha256}; refusing it"
        )
    archive.parent.mkdir(parents=True, exist_ok=True)
    archive.write_bytes(data)
    return data


def ensure(lock: Path = LOCK) -> Path:
    """A directory holding the locked modules (as they go to /lib), made once."""
    deps = locked(lock)
    key = hashlib.sha256("".join(d.sha256 + d.target for d in deps).encode()).hexdigest()[:16]
    cache = cache_dir()
    out = cache / f"lib-{key}"
    if (out / ".complete").exists():
        return out
    tmp = cache / f"lib-{key}.tmp{os.getpid()}"
    for d in deps:
        data = fetch(d, cache)
        with tarfile.open(fileobj=io.BytesIO(data)) as tf:
            f = tf.extractfile(d.member)
            if f is None:
                raise DepError(f"{d.name}: {d.member} is not in the archive")
            dest = tmp / d.target
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(f.read())
    (tmp / ".complete").write_text("\n".join(f"{d.name}=={d.version}" for d in deps) + "\n")
    try:
        tmp.rename(out)
    except OSError:
        if not (out / ".complete").exists():
            raise
    return out
