"""The durable queue: one SQLite database in WAL mode.

A reading is inserted and committed (synchronous=FULL: on disk, not only in the OS
cache) before its node is acknowledged; it leaves `readings` only when the server
answered for it: accepted (or a duplicate) -> deleted; refused one by one (401/403/
422-class per reading) -> moved to `dead_letters`, which health reports.

Memory stays flat whatever the backlog: batches are read by primary key, oldest
first, a few thousand rows at a time; nothing keeps the backlog in Python.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from .payload import Reading
from .rules import State


class Queued(NamedTuple):
    """A reading waiting in the queue for the server."""

    id: int  # the queue's row id: settled up to the batch's last one
    device: str
    kind: str
    label: str
    unit: str
    ts: float
    value: float


SCHEMA = """
CREATE TABLE IF NOT EXISTS readings (
  id INTEGER PRIMARY KEY,
  device TEXT NOT NULL, kind TEXT NOT NULL, label TEXT NOT NULL, unit TEXT NOT NULL,
  ts REAL NOT NULL, value REAL NOT NULL, received REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS dead_letters (
  id INTEGER PRIMARY KEY,
  device TEXT, kind TEXT, label TEXT, unit TEXT, ts REAL, value REAL, received REAL,
  code TEXT NOT NULL, message TEXT NOT NULL, at REAL NOT NULL, raw BLOB
);
CREATE TABLE IF NOT EXISTS alarm_state (
  key TEXT PRIMARY KEY, state TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS alarms (
  ref TEXT PRIMARY KEY, rule_id TEXT NOT NULL, device TEXT NOT NULL, kind TEXT NOT NULL,
  label TEXT NOT NULL, unit TEXT NOT NULL DEFAULT '', opened_at REAL NOT NULL, value REAL,
  uplink_down INTEGER NOT NULL,
  cleared_at REAL
);
CREATE TABLE IF NOT EXISTS alerts (
  ref TEXT PRIMARY KEY, alarm_ref TEXT NOT NULL, path TEXT NOT NULL,
  notified_at REAL NOT NULL, cleared_at REAL, posted INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def connect(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.executescript(SCHEMA)
    return conn


def _dicts(cur: sqlite3.Cursor) -> list[dict[str, Any]]:
    """A query's rows as dicts by column name."""
    cols = [c[0] for c in cur.description]
    return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]


class Store:
    """Thread-safe access to the queue database (one connection, one lock: SQLite
    serialises writers anyway, and the hot path writes in large transactions)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.db = connect(path)
        self.lock = threading.Lock()

    def close(self) -> None:
        with self.lock:
            self.db.close()

    # --- intake ------------------------------------------------------------------

    def add(
        self,
        readings: Sequence[tuple[Reading, float]],
        dead: Sequence[tuple[bytes, str, float]] = (),
        states: dict[str, State] | None = None,
        alarms: Sequence[dict[str, Any]] = (),
        cleared: Sequence[tuple[str, float]] = (),
    ) -> None:
        """One transaction: readings (with receive time), unreadable payloads, alarm
        states and alarm changes. Returns once committed to disk."""
        with self.lock:
            db = self.db
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany(
                    "INSERT INTO readings (device, kind, label, unit, ts, value, received)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [(r.device, r.kind, r.label, r.unit, r.ts, r.value, rc) for r, rc in readings],
                )
                db.executemany(
                    "INSERT INTO dead_letters (code, message, at, raw) VALUES ('unreadable', ?, ?, ?)",
                    [(msg, at, raw) for raw, msg, at in dead],
                )
                if states:
                    db.executemany(
                        "INSERT OR REPLACE INTO alarm_state (key, state) VALUES (?, ?)",
                        [(k, json.dumps(s.__dict__)) for k, s in states.items()],
                    )
                db.executemany(
                    "INSERT OR IGNORE INTO alarms (ref, rule_id, device, kind, label, unit,"
                    " opened_at, value, uplink_down) VALUES (:ref, :rule_id, :device, :kind,"
                    " :label, :unit, :opened_at, :value, :uplink_down)",
                    alarms,
                )
                for ref, at in cleared:
                    db.execute("UPDATE alarms SET cleared_at = ? WHERE ref = ?", (at, ref))
                    db.execute(
                        "UPDATE alerts SET cleared_at = ?, posted = 0 WHERE alarm_ref = ?",
                        (at, ref),
                    )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def load_states(self) -> dict[str, State]:
        with self.lock:
            rows = self.db.execute("SELECT key, state FROM alarm_state").fetchall()
        return {k: State(**json.loads(s)) for k, s in rows}

    # --- forwarding -----------------------------------------------------------------

    def oldest(self, n: int) -> list[Queued]:
        with self.lock:
            rows = self.db.execute(
                "SELECT id, device, kind, label, unit, ts, value FROM readings ORDER BY id LIMIT ?",
                (n,),
            ).fetchall()
        return [Queued._make(r) for r in rows]

    def settle(
        self, last_id: int, ids: Sequence[int], dead: Iterable[tuple[int, str, str]], now: float
    ) -> None:
        """The server answered for rows `ids` (all ids <= last_id of the batch):
        refused ones go to dead_letters, then all of them leave the queue."""
        with self.lock:
            db = self.db
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany(
                    "INSERT INTO dead_letters (device, kind, label, unit, ts, value, received,"
                    " code, message, at) SELECT device, kind, label, unit, ts, value, received,"
                    " ?, ?, ? FROM readings WHERE id = ?",
                    [(code, msg, now, rid) for rid, code, msg in dead],
                )
                db.execute("DELETE FROM readings WHERE id >= ? AND id <= ?", (ids[0], last_id))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def depth(self) -> tuple[int, float | None]:
        """(rows queued, receive time of the oldest)."""
        with self.lock:
            n, oldest = self.db.execute("SELECT count(*), min(received) FROM readings").fetchone()
        return int(n), oldest

    def dead_count(self) -> int:
        with self.lock:
            (n,) = self.db.execute("SELECT count(*) FROM dead_letters").fetchone()
        return int(n)

    # --- alarms and alerts -----------------------------------------------------------

    def unnotified_alarms(self) -> list[dict[str, Any]]:
        with self.lock:
            cur = self.db.execute(
                "SELECT a.ref, a.rule_id, a.device, a.kind, a.label, a.opened_at, a.value,"
                " a.cleared_at FROM alarms a WHERE a.uplink_down = 1"
                " AND NOT EXISTS (SELECT 1 FROM alerts x WHERE x.alarm_ref = a.ref)"
            )
            return _dicts(cur)

    def hand_over_alarms(self) -> None:
        """The server is reachable again: alarms not alerted locally are left to it."""
        with self.lock:
            self.db.execute(
                "UPDATE alarms SET uplink_down = 0 WHERE uplink_down = 1"
                " AND NOT EXISTS (SELECT 1 FROM alerts x WHERE x.alarm_ref = alarms.ref)"
            )

    def add_alert(self, alarm_ref: str, path: str, notified_at: float) -> None:
        """Record a sent alert (with the alarm's clear time, if it cleared already: an
        excursion replayed from a node's buffer may open and clear at once)."""
        with self.lock:
            self.db.execute(
                "INSERT OR IGNORE INTO alerts (ref, alarm_ref, path, notified_at, cleared_at)"
                " SELECT ?, ?, ?, ?, cleared_at FROM alarms WHERE ref = ?",
                (f"{alarm_ref}:{path}", alarm_ref, path, notified_at, alarm_ref),
            )

    def unposted_alerts(self) -> list[dict[str, Any]]:
        with self.lock:
            cur = self.db.execute(
                "SELECT x.ref, x.path, x.notified_at, x.cleared_at, a.rule_id, a.device, a.kind,"
                " a.label, a.unit, a.opened_at FROM alerts x JOIN alarms a ON a.ref = x.alarm_ref"
                " WHERE x.posted = 0 ORDER BY x.notified_at LIMIT 1000"
            )
            return _dicts(cur)

    def mark_posted(self, refs: Sequence[str], cleared: dict[str, float | None]) -> None:
        """Posted as they were read: a clear that arrived meanwhile stays unposted."""
        with self.lock:
            for ref in refs:
                self.db.execute(
                    "UPDATE alerts SET posted = 1 WHERE ref = ? AND cleared_at IS ?",
                    (ref, cleared[ref]),
                )

    # --- meta ------------------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        with self.lock:
            row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        (value,) = row
        return str(value) if value is not None else None

    def set_meta(self, key: str, value: str) -> None:
        with self.lock:
            self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))
