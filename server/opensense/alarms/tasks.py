"""The alarm side's background tasks, started by `alarms_ctx` (app cleanup_ctx):

- the evaluator: LISTEN opensense_alarm_dirty (sent at the commit of readings);
  each wake-up judges the dirty channels at once; every `alarm_sweep_s` it also
  runs the time-driven checks (grace running out, gaps, offline devices,
  re-notification);
- the sender: LISTEN opensense_outbox; sends what is due, at once or when an
  escalation step comes due; checks every 30 s for a failing path.

Any number of processes may run both: the database decides who does what
(SKIP LOCKED claims, row locks on channel state). Success and failure of each
loop go through `_beat`, the one place the status page's health hook goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import psycopg
from aiohttp import web

from ..api.keys import ALARMS_HTTP as HTTP
from ..api.keys import CONFIG, DSN, HEALTH, POOL
from ..settings import Config
from ..status import health
from . import dispatch, evaluator

log = logging.getLogger(__name__)


def _beat(
    app: web.Application, component: str, exc: BaseException | None, detail: str = ""
) -> None:
    """One place for loop health: into the status page's health registry under the
    names its components read (docs/status.md): `rule_engine` (the evaluation of new
    readings) and `rule_engine_sweep` (time-driven steps) make the rule engine
    component; `notifier` (the sender) and `notifier_paths` (the failing-path check)
    weigh on the dispatch components next to their outbound_log figures."""
    if HEALTH not in app:  # an app without the status side (some tests)
        if exc is not None:
            log.error("%s failed: %r", component, exc)
        return
    if exc is None:
        health.ok(app, component, detail)
    else:
        log.error("%s failed: %r", component, exc)
        health.fail(app, component, f"{type(exc).__name__}: {exc}")


async def _listen_loop(
    dsn: str,
    channel: str,
    every: float,
    work: Callable[[bool], Awaitable[float | None]],
    gather: float = 0.0,
) -> None:
    """Run `work(woken)` after each NOTIFY on `channel`, and at least every `every` s,
    or sooner when a run returns in how many seconds it wants the next (the
    evaluator: when a channel it left for later may be judged). A pump task keeps the
    connection's notifies() generator running all the time (a notification arriving
    while no generator waits would be lost); the wake-up flag is cleared before each
    run and its gather, so a commit during either causes another run. Woken, it waits
    `gather` s first: the notifications of that moment make one run (the evaluator's
    run then judges every channel marked by then, but those it judged less than the
    gather time ago: evaluator.Recent)."""
    wake = asyncio.Event()
    while True:
        try:
            async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
                await conn.execute(f"LISTEN {channel}")

                async def pump(conn: psycopg.AsyncConnection[Any] = conn) -> None:
                    async for _ in conn.notifies():
                        wake.set()

                pumper = asyncio.create_task(pump())
                try:
                    want = await work(True)  # whatever was missed while not listening
                    while not pumper.done():
                        wait = every if want is None else max(0.0, min(every, want))
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(wake.wait(), wait)
                        woken = wake.is_set()
                        wake.clear()  # before the gather: a commit from now on brings a run
                        if woken and gather > 0:
                            await asyncio.sleep(gather)
                        want = await work(woken)
                    pumper.result()  # raises what broke the connection
                finally:
                    pumper.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await pumper
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s listener lost its connection; reconnecting", channel)
            await asyncio.sleep(1)


# After a wake-up the evaluator waits this long (at most the gather time) before its
# run, which takes every channel marked by then (but those `Recent` holds): the commits
# of that moment are judged in one pass. An alarm opens about this long after its
# reading's commit, plus the pass (tools/bench/alarms, target p99 < 1 s). Measured
# (docs/ingest-cost.md, stop 32): 0.2 s made the fleet's passes smaller, its line
# 73,913 / 97,976 nodes against 105,823 / 103,237 with 0.5 s.
COMMITS_GATHER_S = 0.5


def commits_gather(cfg: Config) -> float:
    return min(COMMITS_GATHER_S, cfg.alarm_gather_ms / 1000)


async def evaluator_work(
    app: web.Application,
    woken: bool,
    state: dict[str, float],
    metas: evaluator.MetaCache | None = None,
    recent: evaluator.Recent | None = None,
) -> float | None:
    """One run; returns in how many seconds a channel left for later (judged by this
    process less than the gather time ago, marked since) may be judged, if any."""
    pool, cfg = app[POOL], app[CONFIG]
    want: float | None = None
    try:
        deferred = 0
        budget = cfg.alarm_pass_budget_ms / 1000
        # a channel this process judged less than the gather time ago waits until then
        # (or until its mark is that old): under a steady stream each channel is judged
        # about once a gather time, so the passes do not run back to back, each judging
        # a channel's last few readings (which cost as much as judging many); one with
        # a reading now and then is judged at the first run after its commit
        # (every mark made by now: the loop's wait after its wake-up was the gather;
        # with marks required a gather old, one made during the wait waited for the
        # next run, and an alarm up to twice the gather)
        settled = 0.0
        while (
            st := await evaluator.evaluate_dirty(
                pool, cfg.clock(), budget_s=budget, settled_s=settled, metas=metas, recent=recent
            )
        ).channels:
            deferred += st.deferred
        if recent is not None:
            want = recent.next_due()
        note = f"{deferred} channel(s) carried over past the pass budget" if deferred else ""
        _beat(app, "rule_engine", None, note)
    except Exception as exc:
        _beat(app, "rule_engine", exc)
    if time.monotonic() - state.get("sweep", 0.0) >= cfg.alarm_sweep_s:
        state["sweep"] = time.monotonic()
        try:
            now = cfg.clock()
            await evaluator.tick_due(pool, now)
            await evaluator.check_devices(pool, now)
            await evaluator.renotify(pool, now)
            await evaluator.silences(pool, now)
            _beat(app, "rule_engine_sweep", None)
        except Exception as exc:
            _beat(app, "rule_engine_sweep", exc)
    return want


async def sender_work(app: web.Application, woken: bool, state: dict[str, float]) -> None:
    pool, cfg = app[POOL], app[CONFIG]
    try:
        while await dispatch.dispatch_due(pool, cfg, app[HTTP]):
            pass
        _beat(app, "notifier", None)
    except Exception as exc:
        _beat(app, "notifier", exc)
    if time.monotonic() - state.get("paths", 0.0) >= 30:
        state["paths"] = time.monotonic()
        try:
            await dispatch.check_paths(pool, cfg.clock(), cfg.dispatch_failing_min_accounts)
            _beat(app, "notifier_paths", None)
        except Exception as exc:
            _beat(app, "notifier_paths", exc)


async def alarms_ctx(app: web.Application) -> AsyncIterator[None]:
    cfg = app[CONFIG]
    session = aiohttp.ClientSession()
    app[HTTP] = session
    tasks: list[asyncio.Task[Any]] = []
    if cfg.alarms_enabled:
        ev_state: dict[str, float] = {}
        metas = evaluator.MetaCache()  # this app's database's channels
        recent = evaluator.Recent(cfg.alarm_gather_ms / 1000)
        tx_state: dict[str, float] = {}
        tasks = [
            asyncio.create_task(
                _listen_loop(
                    app[DSN],
                    "opensense_alarm_dirty",
                    cfg.alarm_sweep_s,
                    lambda w: evaluator_work(app, w, ev_state, metas, recent),
                    commits_gather(cfg),
                )
            ),
            asyncio.create_task(
                _listen_loop(
                    app[DSN],
                    "opensense_outbox",
                    min(cfg.alarm_sweep_s, 1.0),
                    lambda w: sender_work(app, w, tx_state),
                )
            ),
        ]
    yield
    for t in tasks:
        t.cancel()
    if tasks:  # everything they do is transactional: a cut-off pass is rolled back
        await asyncio.wait(tasks, timeout=5)
    await session.close()
