"""The status monitor: one background task per server process (cleanup_ctx).

Each tick (OPENSENSE_STATUS_INTERVAL_S):
1. publish this process: its ingest minutes (observe.py) into status_minutes and its
   heartbeat with the health registry into status_processes;
2. measure the figures (probes.py) and read the recent samples;
3. claim the tick: the one process whose INSERT of the tick's sample wins counts the
   components' states into status_days (the uptime bars), evaluates the conditions
   (conditions.py) and opens incidents, sends due reminders, prunes old rows;
4. build the snapshot: the public JSON and HTML, encoded once, kept in memory.

/status, /status.json and /metrics answer from the snapshot only. When the
database is gone the snapshot keeps the last figures, says database: outage and
marks itself stale; nothing on the request path waits for a query.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from psycopg import AsyncConnection
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from .. import aio
from ..api.jsonutil import dumps
from ..settings import Config
from . import cadence, components, conditions, incidents, probes
from . import health as health_mod
from .health import Health
from .observe import LATENCY_BUCKETS, Observer
from .page import render_html

log = logging.getLogger(__name__)

DAYS = 90
HISTORY = timedelta(minutes=20)  # samples read back for the sustained conditions
KEEP_SAMPLES = timedelta(days=1)
KEEP_DAYS = 120
FULL_DAYS_EVERY = timedelta(minutes=5)  # the 89 past days change only at midnight


def process_name(cfg: Config) -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{cfg.port}"


@dataclass
class Snapshot:
    at: datetime | None = None
    public: dict[str, Any] = field(default_factory=dict)
    json_bytes: bytes = b"{}"
    html_bytes: bytes = b""
    figures: dict[str, Any] = field(default_factory=dict)
    states: dict[str, tuple[str, str]] = field(default_factory=dict)
    firing: list[conditions.Firing] = field(default_factory=list)
    days: dict[str, dict[date, list[int]]] = field(default_factory=dict)
    incidents: list[tuple[dict[str, Any], list[dict[str, Any]]]] = field(default_factory=list)
    stale: bool = True
    build_ms: float = 0.0


def sample_figures(figures: dict[str, Any]) -> dict[str, Any]:
    """What a persisted sample keeps: gateways as counts (the conditions do not read
    them; a list of every gateway per tick would grow the table for nothing)."""
    out = dict(figures)
    gws = figures.get("gateways")
    if gws is not None:
        counts: dict[str, int] = {}
        for g in gws:
            counts[g["state"]] = counts.get(g["state"], 0) + 1
        out["gateways"] = counts
    return out


def day_state(counts: list[int] | None) -> tuple[str, float | None]:
    """A day's bar: worst state seen, and uptime (operational+degraded of known)."""
    if not counts:
        return "none", None
    op, deg, out, _unk = counts
    known = op + deg + out
    if not known:
        return "none", None
    state = "outage" if out else "degraded" if deg else "operational"
    return state, (op + deg) / known


def uptime(days: dict[date, list[int]]) -> float | None:
    up = known = 0
    for op, deg, out, _ in days.values():
        up += op + deg
        known += op + deg + out
    return up / known if known else None


def bars(days: dict[date, list[int]], today: date) -> list[dict[str, Any]]:
    out = []
    for i in range(DAYS - 1, -1, -1):
        d = today - timedelta(days=i)
        state, up = day_state(days.get(d))
        out.append({"day": d, "state": state, "uptime": None if up is None else round(up, 5)})
    return out


class StatusMonitor:
    def __init__(
        self,
        cfg: Config,
        pool: AsyncConnectionPool | None,
        observer: Observer,
        health: Health,
        *,
        heartbeat: bool = True,
        mqtt_connected: Any = None,
    ) -> None:
        self.cfg = cfg
        self.pool = pool
        self.observer = observer
        self.health = health
        self.heartbeat = heartbeat  # the CLI watchdog measures without claiming to serve
        self.process = process_name(cfg)
        self.started_at = cfg.clock()
        self.snapshot = Snapshot()
        self.tz = ZoneInfo(cfg.status_business_tz)
        self._days_loaded_at: datetime | None = None
        self._mqtt_connected = mqtt_connected
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self.ticks = 0
        self.failures = 0
        self.render(cfg.clock())  # an answer from the first request on

    # --- the loop ---------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        await aio.cancel(self._task)
        if self.pool is not None and self.heartbeat and not self.pool.closed:
            try:
                async with self.pool.connection(timeout=2) as conn:
                    await self._publish(conn, self.cfg.clock())
                    await conn.execute(
                        "DELETE FROM status_processes WHERE process = %s", (self.process,)
                    )
            except Exception:
                log.warning("status monitor: could not sign off", exc_info=True)

    async def pause(self) -> None:
        """Stop the background loop (tests drive `tick()` with an injected clock)."""
        await aio.cancel(self._task)
        self._task = None

    def poke(self) -> None:
        """Refresh soon (a full tick)."""
        self._wake.set()

    async def refresh_incidents(self, conn: AsyncConnection[Any]) -> None:
        """An operator changed an incident: this process's page shows it before the
        operator's request is answered (the status page first); the others within a
        tick."""
        self.snapshot.incidents = await incidents.recent(conn, self.cfg.clock())
        self.render(self.cfg.clock())

    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # the page keeps its last snapshot; the next tick retries
                log.exception("status monitor tick failed")
            try:
                await asyncio.wait_for(self._wake.wait(), self.cfg.status_interval_s)
            except TimeoutError:
                pass
            self._wake.clear()

    async def tick(self) -> None:
        now = self.cfg.clock()
        t0 = time.perf_counter()
        self.ticks += 1
        if self._mqtt_connected is not None:
            try:
                up = self._mqtt_connected()
                if up:
                    self.health.ok("mqtt", "connected to the broker")
                else:
                    self.health.fail("mqtt", "not connected to the broker")
            except Exception as exc:
                self.health.fail("mqtt", repr(exc))
        try:
            assert self.pool is not None, "no database pool"
            async with self.pool.connection(timeout=5) as conn:
                await self._tick(conn, now)
            self.snapshot.stale = False
        except Exception as exc:
            self.failures += 1
            log.warning("status monitor tick failed: %r", exc)
            f = dict(self.snapshot.figures)
            f["database"] = {"ok": False, "detail": type(exc).__name__}
            self.snapshot.figures = f
            self.snapshot.states = components.states(f, self.snapshot.firing)
            self.snapshot.stale = True
        # encoding 90 bars per component takes some milliseconds of CPU: in a thread,
        # the event loop keeps answering meanwhile (the GIL is handed over every 5 ms)
        await asyncio.to_thread(self.render, now)
        self.snapshot.build_ms = (time.perf_counter() - t0) * 1000

    async def _tick(self, conn: AsyncConnection[Any], now: datetime) -> None:
        t = time.perf_counter()
        await conn.execute("SELECT 1")
        db_ms = (time.perf_counter() - t) * 1000
        if self.heartbeat:
            await self._publish(conn, now)
        async with conn.transaction():
            await conn.execute("SET LOCAL statement_timeout = '5s'")
            await conn.execute(
                "INSERT INTO status_meta (key, at) VALUES ('monitoring_since', %s)"
                " ON CONFLICT DO NOTHING",
                (now,),
            )
            figures = await self.measure(conn, now)
        figures["database"] = {"ok": True, "latency_ms": round(db_ms, 2)}
        history = await self._history(conn, now)
        firing = conditions.evaluate([*history, conditions.Sample(now, figures)], now)
        states = components.states(figures, firing)
        if await self._claim(conn, now, figures, states):
            await self._count_days(conn, now, states, figures)
            await self._open_incidents(conn, now, firing)
            await self._remind(conn, now)
            if self.ticks % 60 == 1:
                await self._prune(conn, now)
        await self._load_days(conn, now)
        self.snapshot.incidents = await incidents.recent(conn, now)
        self.snapshot.figures = figures
        self.snapshot.states = states
        self.snapshot.firing = firing

    async def measure(self, conn: AsyncConnection[Any], now: datetime) -> dict[str, Any]:
        live = timedelta(seconds=max(30.0, 3 * self.cfg.status_interval_s))
        procs = await probes.processes(conn, now, live)
        return {
            "processes": {k: v for k, v in procs.items() if k != "health"},
            # processes' registries, and the jobs whose last run is a component's health
            "health": health_mod.merge([procs["health"], await probes.job_health(conn, now)]),
            "mqtt_mode": self.cfg.mqtt,
            "ingest": await probes.ingest(conn, now),
            "dispatch": await probes.dispatch(conn, now, self.cfg.dispatch_failing_min_accounts),
            "reports": await probes.reports(conn, now),
            "backups": await probes.backups(
                conn,
                now,
                self.cfg.status_backup_max_age_h * 3600.0,
                configured=bool(self.cfg.backup_recipients),
            ),
            "gateways": await probes.gateways(conn, now),
            "lorawan": await probes.lorawan(conn, now),
        }

    # --- publishing this process -------------------------------------------------------

    async def _publish(self, conn: AsyncConnection[Any], now: datetime) -> None:
        minutes = self.observer.take()
        try:
            async with conn.transaction():
                for minute, m in sorted(minutes.items()):
                    await conn.execute(
                        "INSERT INTO status_minutes AS s (minute, process, ingest_requests,"
                        " ingest_5xx, ingest_latency) VALUES (%s, %s, %s, %s, %s)"
                        " ON CONFLICT (minute, process) DO UPDATE SET"
                        " ingest_requests = s.ingest_requests + excluded.ingest_requests,"
                        " ingest_5xx = s.ingest_5xx + excluded.ingest_5xx,"
                        " ingest_latency = (SELECT array_agg(a + b ORDER BY i) FROM"
                        "   unnest(s.ingest_latency, excluded.ingest_latency)"
                        "   WITH ORDINALITY AS u(a, b, i))",
                        (minute, self.process, m.requests, m.errors_5xx, m.latency),
                    )
                await conn.execute(
                    "INSERT INTO status_processes (process, role, started_at, seen_at, health)"
                    " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (process) DO UPDATE SET"
                    " seen_at = excluded.seen_at, health = excluded.health",
                    (
                        self.process,
                        self.cfg.role,
                        self.started_at,
                        now,
                        Jsonb(self.health.as_json()),
                    ),
                )
        except Exception:
            self.observer.give_back(minutes)
            raise

    # --- the claimed work ----------------------------------------------------------------

    def _tick_at(self, now: datetime) -> datetime:
        step = max(1, int(self.cfg.status_interval_s))
        epoch = int(now.timestamp())
        return datetime.fromtimestamp(epoch - epoch % step, tz=now.tzinfo)

    async def _claim(
        self,
        conn: AsyncConnection[Any],
        now: datetime,
        figures: dict[str, Any],
        states: dict[str, tuple[str, str]],
    ) -> bool:
        cur = await conn.execute(
            "INSERT INTO status_samples (at, figures, states) VALUES (%s, %s, %s)"
            " ON CONFLICT DO NOTHING RETURNING 1",
            (
                self._tick_at(now),
                Jsonb(json.loads(dumps(sample_figures(figures)))),
                Jsonb({k: v[0] for k, v in states.items()}),
            ),
        )
        return await cur.fetchone() is not None

    async def _history(self, conn: AsyncConnection[Any], now: datetime) -> list[conditions.Sample]:
        cur = await conn.execute(
            "SELECT at, figures FROM status_samples WHERE at > %s AND at < %s ORDER BY at",
            (now - HISTORY, self._tick_at(now)),
        )
        return [conditions.Sample(at, f) for at, f in await cur.fetchall()]

    async def _count_days(
        self,
        conn: AsyncConnection[Any],
        now: datetime,
        states: dict[str, tuple[str, str]],
        figures: dict[str, Any],
    ) -> None:
        rows = [(cid, s) for cid, (s, _) in states.items()]
        rows += [(f"gateway:{g['id']}", g["state"]) for g in figures.get("gateways") or []]
        # one statement for every component and gateway
        await conn.execute(
            "INSERT INTO status_days AS d (component, day, operational, degraded, outage, unknown)"
            " SELECT c, %s, (s = 'operational')::int, (s = 'degraded')::int, (s = 'outage')::int,"
            " (s = 'unknown')::int FROM unnest(%s::text[], %s::text[]) AS u(c, s)"
            " ON CONFLICT (component, day) DO UPDATE SET"
            " operational = d.operational + excluded.operational,"
            " degraded = d.degraded + excluded.degraded, outage = d.outage + excluded.outage,"
            " unknown = d.unknown + excluded.unknown",
            (now.date(), [r[0] for r in rows], [r[1] for r in rows]),
        )

    async def _open_incidents(
        self, conn: AsyncConnection[Any], now: datetime, firing: list[conditions.Firing]
    ) -> None:
        for fire in firing:
            affected = None
            if fire.condition.name == "dispatch_failing":
                affected = await probes.dispatch_accounts(conn, fire.key, now) or None
            async with conn.transaction():
                iid = await incidents.open_incident(
                    conn,
                    now,
                    klass=fire.condition.klass,
                    title=fire.title,
                    body=(
                        f"Opened automatically by the server's self-watching: {fire.detail}"
                        f" (since {fire.since:%H:%M} UTC). Investigating."
                    ),
                    author="opensense",
                    component=fire.component,
                    condition=fire.ident,
                    affected=affected,
                )
                if iid is not None:
                    log.warning("incident %s opened (%s): %s", iid, fire.ident, fire.detail)
                    await incidents.queue_operator(
                        conn,
                        iid,
                        self.cfg.incident_operator_email,
                        now,
                        f"[OpenSense {fire.condition.klass}] incident opened: {fire.title}",
                        f"{fire.detail}\n\nIncident {iid}. Acknowledge it:"
                        f" opensense incident ack {iid}\n",
                    )

    async def _remind(self, conn: AsyncConnection[Any], now: datetime) -> None:
        for row, ups in await incidents.list_all(conn, open_only=False, limit=200):
            view = incidents.present(row, ups, self.tz, now)
            due = view["next_due"]
            slot = cadence.reminder_slot(row["class"], due["at"], now) if due else None
            if due is None or slot is None or row["reminded_for"] == slot:
                continue
            await conn.execute(
                "UPDATE incidents SET reminded_for = %s WHERE id = %s", (slot, row["id"])
            )
            text = (
                f"The {due['what']} of incident {row['id']} ({row['class']}: {row['title']})"
                f" was due at {due['at']:%Y-%m-%d %H:%M} UTC."
            )
            if due["what"] == "update":
                text += ' "Still investigating" is a valid update: opensense incident update.'
            log.warning("incident reminder: %s", text)
            await incidents.queue_operator(
                conn,
                row["id"],
                self.cfg.incident_operator_email,
                now,
                f"[OpenSense {row['class']}] {due['what']} due: {row['title']}",
                text + "\n",
            )

    async def _prune(self, conn: AsyncConnection[Any], now: datetime) -> None:
        await conn.execute("DELETE FROM status_samples WHERE at < %s", (now - KEEP_SAMPLES,))
        await conn.execute("DELETE FROM status_minutes WHERE minute < %s", (now - KEEP_SAMPLES,))
        await conn.execute("DELETE FROM status_processes WHERE seen_at < %s", (now - KEEP_SAMPLES,))
        await conn.execute(
            "DELETE FROM status_days WHERE day < %s", (now.date() - timedelta(days=KEEP_DAYS),)
        )

    async def _load_days(self, conn: AsyncConnection[Any], now: datetime) -> None:
        """All 90 days every few minutes; today's rows at every tick."""
        full = self._days_loaded_at is None or now - self._days_loaded_at > FULL_DAYS_EVERY
        since = now.date() - timedelta(days=DAYS - 1) if full else now.date()
        cur = await conn.execute(
            "SELECT component, day, operational, degraded, outage, unknown FROM status_days"
            " WHERE day >= %s",
            (since,),
        )
        days: dict[str, dict[date, list[int]]] = {} if full else self.snapshot.days
        for cid, day, *counts in await cur.fetchall():
            days.setdefault(cid, {})[day] = counts
        self.snapshot.days = days
        if full:
            self._days_loaded_at = now

    # --- the answer ----------------------------------------------------------------------

    def render(self, now: datetime) -> None:
        s = self.snapshot
        s.at = now
        today = now.date()
        comps: list[dict[str, Any]] = []
        states: dict[str, tuple[str, str]] = {}
        for c in components.shown():
            state, detail = s.states.get(c.id, ("unknown", "not measured yet"))
            states[c.id] = (state, detail)
            days = s.days.get(c.id, {})
            up = uptime(days)
            comps.append(
                {
                    "id": c.id,
                    "name": c.name,
                    "state": state,
                    "detail": detail,
                    "uptime_90d": None if up is None else round(up, 5),
                    "days": bars(days, today),
                }
            )
        s.public = {
            "generated_at": now,
            "stale": s.stale,
            "overall": components.overall(states),
            "components": comps,
            "incidents": [incidents.public(r, u) for r, u in s.incidents],
        }
        s.json_bytes = dumps(s.public).encode()
        s.html_bytes = render_html(s.public).encode()

    def gateways_of(self, account_id: str) -> list[dict[str, Any]]:
        """One account's gateways, with their bars (the authenticated view)."""
        today = (self.snapshot.at or self.cfg.clock()).date()
        out = []
        for g in self.snapshot.figures.get("gateways") or []:
            if g["account_id"] != account_id:
                continue
            days = self.snapshot.days.get(f"gateway:{g['id']}", {})
            up = uptime(days)
            out.append(
                {
                    "id": g["id"],
                    "site_id": g["site_id"],
                    "name": g["name"],
                    "state": g["state"],
                    "last_seen_at": g["last_seen_at"],
                    "health": g["health"],
                    "uptime_90d": None if up is None else round(up, 5),
                    "days": bars(days, today),
                }
            )
        return out


__all__ = ["LATENCY_BUCKETS", "Snapshot", "StatusMonitor"]
