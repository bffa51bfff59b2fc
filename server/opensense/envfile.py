"""The env file the service starts with (deploy/opensense.env; root:root 0400, docs/product.md#secrets).

systemd reads it (EnvironmentFile=) before dropping privileges; OPENSENSE_ENV_FILE
names it so the server can check it at start: read the variables not already set
(when it can), and warn when group or others may read it, because it holds the
database password and the bot secrets.
"""

from __future__ import annotations

import os
import stat
from collections.abc import MutableMapping
from pathlib import Path


def parse(text: str) -> dict[str, str]:
    """KEY=value lines; blank lines and # comments skipped; optional quotes stripped."""
    out: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[7:].lstrip()
        key, sep, value = line.partition("=")
        if not sep or not key.strip().replace("_", "").isalnum():
            raise ValueError(f"line {n} is not KEY=value")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        out[key.strip()] = value
    return out


def permission_warning(path: Path) -> str | None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        who = " and ".join(w for w, bits in (("group", 0o070), ("others", 0o007)) if mode & bits)
        return (
            f"env file {path} is accessible by {who} (mode {mode:04o}); it holds secrets: "
            f"chmod 0400 {path} (owner root)"
        )
    return None


def apply_env_file(env: MutableMapping[str, str]) -> list[str]:
    """Load OPENSENSE_ENV_FILE into `env` (without overriding) and return warnings."""
    name = env.get("OPENSENSE_ENV_FILE", "")
    if not name:
        return []
    path = Path(name)
    try:
        warning = permission_warning(path)
    except OSError as exc:
        return [f"env file {path} cannot be checked: {exc.strerror}"]
    warnings = [warning] if warning else []
    if os.access(path, os.R_OK):
        try:
            for k, v in parse(path.read_text()).items():
                env.setdefault(k, v)
        except (OSError, ValueError) as exc:
            warnings.append(f"env file {path} not read: {exc}")
    return warnings
