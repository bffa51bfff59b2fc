"""The site Mosquitto's password_file and acl_file, made from the synced devices.

Why files and not the bcrypt hash: Mosquitto cannot check bcrypt. The server keeps a
second hash of every device token, made when the plaintext is known (creation,
rotation): PBKDF2-SHA512 in Mosquitto's own `$7$` password-file form. So the site
broker checks each node's own token offline, with no plugin, and the gateway never
sees a plaintext token. Pure functions build the text; `apply` writes and reloads.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import subprocess
from pathlib import Path
from typing import Any

from opensense_contract import topics

ITERATIONS = 101  # mosquitto_passwd's default for $7$


def mosquitto_hash(password: str, salt: bytes | None = None) -> str:
    salt = salt if salt is not None else secrets.token_bytes(12)
    dk = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, ITERATIONS)
    return f"$7${ITERATIONS}${base64.b64encode(salt).decode()}${base64.b64encode(dk).decode()}"


def check_hash(password: str, stored: str) -> bool:
    """Verify a `$7$` hash (the HTTP intake checks node tokens with it)."""
    try:
        _, seven, iters, salt, dk = stored.split("$")
        if seven != "7":
            return False
        want = base64.b64decode(dk)
        got = hashlib.pbkdf2_hmac("sha512", password.encode(), base64.b64decode(salt), int(iters))
    except ValueError:
        return False
    return secrets.compare_digest(got, want)


def _logins(devices: list[dict[str, Any]], gw_user: str) -> list[dict[str, Any]]:
    return sorted(
        (d for d in devices if d.get("site_hash") and d.get("id") and d["id"] != gw_user),
        key=lambda d: str(d["id"]),
    )


def password_file(devices: list[dict[str, Any]], gw_user: str, gw_hash: str) -> str:
    """One line per device whose live token has a site hash. Username = the device's
    `dev_` id, the one login convention of both brokers (the server's and this one:
    docs/mqtt.md), so a node logs in the same way wherever it is pointed."""
    lines = [f"{gw_user}:{gw_hash}"]
    lines += [f"{d['id']}:{d['site_hash']}" for d in _logins(devices, gw_user)]
    return "\n".join(lines) + "\n"


def acl_file(account: str, devices: list[dict[str, Any]], gw_user: str) -> str:
    """Each node publishes only its own measurements, lwt and info (the topic names it
    by `local_id`, so the gateway knows which node sent what) and reads its own
    commands and refusals; the gateway reads them all. The contract's device ACL
    (opensense_contract.topics.mosquitto_acl), one `user` block per device."""
    logins = [(str(d["id"]), str(d["local_id"])) for d in _logins(devices, gw_user)]
    return topics.mosquitto_acl(account, logins, gw_user)


def _write_if_changed(path: Path, text: str) -> bool:
    try:
        if path.read_text() == text:
            return False
    except OSError:
        pass
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.chmod(tmp, 0o640)
    os.replace(tmp, path)
    return True


def apply(pw_path: str, acl_path: str, reload_command: str, pw_text: str, acl_text: str) -> bool:
    """Write both files; reload Mosquitto when either changed. True if reloaded."""
    changed = _write_if_changed(Path(pw_path), pw_text)
    changed = _write_if_changed(Path(acl_path), acl_text) or changed
    if changed and reload_command:
        subprocess.run(reload_command, shell=True, check=False, timeout=30)
    return changed
