"""How a server process serves and stops: the one place `opensense serve` (one
process) and each of its workers (opensense/supervisor.py) take their stop rules from."""

from __future__ import annotations

import asyncio
import faulthandler
import gc
import logging
import os
import signal
import sys
import threading
from collections.abc import Awaitable, Callable

import psycopg
from aiohttp import web

from .settings import Config

log = logging.getLogger("opensense")

# What `opensense serve` calls its connections (libpq's PGAPPNAME, unless the DSN names
# one): pg_stat_activity shows which of them are the server's.
APP_NAME = "opensense serve"

# The connections a server process holds besides its pool, at most (the leader: the
# others run fewer listeners): a LISTEN connection each for the rule engine's wake-up,
# the notification outbox, token revocations, channel changes, the dashboard's live
# updates, the gateways' pushes and the workers' MQTT relay, two for HTTP ingest's
# token statements (ingest/authbatch.py `auth_pool`: a plan setting of their own), and
# one the partitions job opens while it runs. tests/test_workers.py counts them on
# running workers, so this stays true when a listener is added.
EXTRA_CONNECTIONS = 10


class ConnectionBudget(RuntimeError):
    """The server's processes could open more connections than PostgreSQL allows."""


def connection_budget(cfg: Config) -> int:
    """The most connections `opensense serve` holds at once: each process's pool at
    its largest and its own connections, for every worker."""
    return cfg.workers * (cfg.pool_max + EXTRA_CONNECTIONS)


def check_connection_budget(dsn: str, cfg: Config) -> str | None:
    """Refuse a start whose processes could need more connections than PostgreSQL's
    `max_connections` leaves to ordinary roles: under load a pool would wait for a
    connection that never comes (503s), and a listener that cannot connect leaves its
    notifications unheard, the rule engine's among them. Returns a warning when the
    budget fits but the connections other clients hold now leave too few."""
    need = connection_budget(cfg)
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT current_setting('max_connections')::int,"
            " current_setting('superuser_reserved_connections')::int,"
            " coalesce(current_setting('reserved_connections', true)::int, 0),"
            " (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
            "    AND pid <> pg_backend_pid()"
            "    AND application_name NOT LIKE %s)::int",
            (APP_NAME + "%",),
        ).fetchone()
    assert row is not None
    most, superuser, reserved, others = row
    allowed = most - superuser - reserved
    how = (
        f"OPENSENSE_WORKERS={cfg.workers} x (OPENSENSE_POOL_MAX={cfg.pool_max}"
        f" + {EXTRA_CONNECTIONS} of its own) = {need} connections"
    )
    if need > allowed:
        raise ConnectionBudget(
            f"{how}, but PostgreSQL allows {allowed} (max_connections {most} less {superuser}"
            f" + {reserved} reserved): lower OPENSENSE_WORKERS or OPENSENSE_POOL_MAX, or"
            " raise max_connections (docs/scaling.md)"
        )
    if need > allowed - others:
        return (
            f"{how}, and other clients hold {others} of the {allowed} PostgreSQL allows:"
            " under load the server may find none free"
        )
    return None


STOP_BUDGET_S = 20.0


async def bounded_stop(app: web.Application) -> None:
    """A stop (SIGTERM, SIGINT, SIGHUP) that has not ended after STOP_BUDGET_S is ended
    hard, after every thread's and task's stack is logged: a stop that hangs would
    otherwise hold the port, the broker and the database handle until someone kills
    it. Nothing acknowledged is lost by it: a reading is committed before its 200 or
    PUBACK, and the rest is what a SIGKILL leaves (the nodes resend it)."""
    loop = asyncio.get_running_loop()

    def expire() -> None:
        log.error(
            "the stop has not ended after %.0f s: stacks follow, then the process ends hard",
            STOP_BUDGET_S,
        )
        for task in list(asyncio.all_tasks(loop)):  # a read-only look from this thread
            log.error("pending task %r", task)
            for frame in task.get_stack(limit=8):
                log.error(
                    "    %s:%s %s", frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name
                )
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        os._exit(3)

    timer = threading.Timer(STOP_BUDGET_S, expire)
    timer.daemon = True  # never what keeps the process alive
    timer.start()


def new_loop(kind: str) -> asyncio.AbstractEventLoop:
    """The event loop a serving process runs on (OPENSENSE_EVENT_LOOP). uvloop's libuv
    loop does the same work as asyncio's pure-Python selector loop for somewhat less
    CPU (HTTP 1 a request ~10 % less server CPU; no difference above the noise on the
    saturated paths: docs/ingest-cost.md). Everything the server does goes through the
    loop's public API, so both run it alike (the suite's subprocess servers run uvloop,
    its in-process ones asyncio)."""
    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def gc_on_startup(gen0: int) -> Callable[[web.Application], Awaitable[None]]:
    """An on_startup hook tuning Python's cyclic garbage collector (OPENSENSE_GC_GEN0)
    once the app has started. Ingest allocates many short-lived objects (a reading's
    tuples, datetimes, dicts); with Python's default of a young-generation pass every
    700 allocations, and the older generations' passes walking every object the
    server holds for good (modules, caches, pools), the collector took ~15 % of the
    server's CPU on HTTP ingest (perf: gc_collect_main, visit_decref,
    visit_reachable; docs/ingest-cost.md). Freezing what exists at start moves it out
    of every pass; a larger threshold makes passes rarer. Nothing is leaked: garbage
    in cycles is still collected, later (at most `gen0` allocations' worth waits)."""

    async def tune(_app: web.Application) -> None:
        if gen0 > 0:
            gc.collect()
            gc.freeze()
            _, gen1, gen2 = gc.get_threshold()
            gc.set_threshold(gen0, gen1, gen2)
            log.debug(
                "garbage collector: %d objects frozen, threshold %d", gc.get_freeze_count(), gen0
            )

    return tune


def stop_on_hangup(loop: asyncio.AbstractEventLoop) -> asyncio.AbstractEventLoop:
    """A closed terminal (SIGHUP) stops the server the way SIGTERM does (aiohttp
    handles SIGINT and SIGTERM): the default action would end the process without its
    exit hooks, leaving the embedded PostgreSQL running for good."""

    def hangup() -> None:
        log.info("SIGHUP: stopping")
        raise web.GracefulExit()

    if hasattr(signal, "SIGHUP"):
        loop.add_signal_handler(signal.SIGHUP, hangup)
    return loop
