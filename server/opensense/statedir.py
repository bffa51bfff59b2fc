"""The state directory and the secrets in it (issue 11, item 20).

Every file that holds a secret (the demo's tokens in demo.json, a simulated node's
config.json with its ingest token, the MQTT CA and server keys) is written with
`write_secret`: created 0600 from the first byte (os.open with the mode, O_EXCL on a
temporary name, then renamed over the old file), never chmod-ed afterwards, so there
is no moment at which another local user could open it. Its directory is made 0700.

An existing state directory that group or others may enter is tightened to 0700 and
a WARNING says so: the files inside may already have been read (rotate the tokens),
but nothing written from now on can be. Running as root with the embedded PostgreSQL
is the one exception: the server runs as its own user (`embedded_postgres`) and must
traverse the state directory to reach pgdata, so the directory is 0711 (enter a
known name, never list); every secret file in it is still 0600.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger(__name__)

PRIVATE_DIR = 0o700
TRAVERSABLE_DIR = 0o711  # root + embedded PostgreSQL: its own user walks to pgdata
SECRET_FILE = 0o600


def private_dir(path: Path, mode: int = PRIVATE_DIR) -> Path:
    """Make `path` (and missing parents) a directory no one else may list or read;
    tighten an existing one that is wider than `mode`, with a warning."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):  # each new level is created with the mode, not widened later
        d.mkdir(mode=mode, exist_ok=True)
    st = path.stat()
    if stat.S_IMODE(st.st_mode) & ~mode & 0o077:
        log.warning(
            "%s was mode %o: other users could read what it holds; tightened to %o "
            "(rotate any token that was in it if others have access to this machine)",
            path,
            stat.S_IMODE(st.st_mode),
            mode,
        )
        os.chmod(path, mode)
    return path


def prepare_state_dir(state_dir: Path, *, for_embedded_postgres: bool = False) -> Path:
    """The state directory, private (see the module doc for the root exception)."""
    root = hasattr(os, "geteuid") and os.geteuid() == 0
    return private_dir(
        state_dir, TRAVERSABLE_DIR if (root and for_embedded_postgres) else PRIVATE_DIR
    )


def _fresh_file(path: Path, tag: str, data: bytes) -> Path:
    """A new 0600 file beside `path` holding `data`, on disk (fsync-ed): what both
    writers below then move into place, each in its own way."""
    if not path.parent.is_dir():
        private_dir(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{tag}")
    tmp.unlink(missing_ok=True)  # a leftover of a killed writer
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, SECRET_FILE)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def write_secret(path: Path, data: bytes) -> None:
    """Write `data` to `path` as a new 0600 file in one step (the old file, if any, is
    replaced by rename: a reader sees the old or the new content, never a mix)."""
    tmp = _fresh_file(path, "tmp", data)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def create_secret(path: Path, data: bytes) -> bool:
    """Like `write_secret`, but only when `path` does not exist yet: the whole file
    appears at once (hard link of a finished 0600 file), so a process starting at the
    same moment reads either no file or all of it, never an empty one. False: the file
    was already there (made by another process or an earlier start), left as it is."""
    tmp = _fresh_file(path, "new", data)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
