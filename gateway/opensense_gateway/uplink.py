"""Talking to the server: one persistent HTTPS connection, the gw_ token, and the
client retry rule (opensense_contract.retry). Everything here runs on the uplink thread."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .config import Config
from .store import Queued


@dataclass
class Answer:
    status: int  # 0: no answer (connection refused, reset, timeout)
    body: Any
    retry_after: str | None = None


class Api:
    def __init__(self, cfg: Config, timeout: float | None = None) -> None:
        u = urllib.parse.urlsplit(cfg.server_url)
        self.https = u.scheme == "https"
        self.host = u.hostname or "localhost"
        self.port = u.port or (443 if self.https else 80)
        self.base = u.path.rstrip("/")
        self.timeout = cfg.server_timeout_s if timeout is None else timeout
        self.token = cfg.server_token
        self.ctx: ssl.SSLContext | None = None
        if self.https:
            self.ctx = ssl.create_default_context(cafile=cfg.server_ca_file or None)
        self.conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self.conn is None:
            if self.https:
                self.conn = http.client.HTTPSConnection(
                    self.host, self.port, timeout=self.timeout, context=self.ctx
                )
            else:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        return self.conn

    def close(self) -> None:
        conn = self.conn
        if conn is not None:
            self.conn = None
            if conn.sock is not None:
                # wakes a thread blocked in this connection's recv (the held sync
                # long-poll, when the gateway stops): a bare close() of the fd does not
                with contextlib.suppress(OSError):
                    conn.sock.shutdown(socket.SHUT_RDWR)
            conn.close()

    def call(self, method: str, path: str, body: Any = None) -> Answer:
        data = None if body is None else json.dumps(body, separators=(",", ":")).encode()
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        try:
            conn = self._connection()
            conn.request(method, self.base + path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        except (OSError, http.client.HTTPException):
            self.close()
            return Answer(0, None)
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = None
        if resp.getheader("Connection", "").lower() == "close":
            self.close()
        return Answer(resp.status, parsed, resp.getheader("Retry-After"))


class Link:
    """The uplink's state, shared by the threads. `last_ok` (the last time the
    server answered) survives restarts through the store, so an outage that spans a
    gateway restart keeps its true length."""

    def __init__(self, last_ok: float | None, now: float) -> None:
        self._lock = threading.Lock()
        self.state = "unknown"  # up | down | refused | unknown (not tried since start)
        self.last_ok = last_ok
        self.started = now
        self.detail = ""

    def ok(self, now: float) -> None:
        with self._lock:
            self.state, self.last_ok, self.detail = "up", now, ""

    def down(self, detail: str) -> None:
        with self._lock:
            self.state, self.detail = "down", detail

    def refused(self, detail: str) -> None:
        with self._lock:
            self.state, self.detail = "refused", detail

    def is_up(self) -> bool:
        return self.state == "up"

    def down_for(self, now: float) -> float:
        """Seconds the server has been out of reach (0 while up)."""
        with self._lock:
            if self.state == "up":
                return 0.0
            since = self.last_ok if self.last_ok is not None else self.started
            return max(0.0, now - since)


def error_text(a: Answer) -> tuple[str, str]:
    """(code, message) of an error answer, from the server's envelope when it sent one."""
    if isinstance(a.body, dict) and isinstance(a.body.get("error"), dict):
        e = a.body["error"]
        return str(e.get("code", f"http_{a.status}")), str(e.get("message", ""))
    return f"http_{a.status}", "no answer" if a.status == 0 else f"HTTP {a.status}"


def group(rows: Sequence[Queued]) -> tuple[dict[str, Any], list[list[int]]]:
    """Rows (oldest first) as the columnar batch body, and each series' row ids."""
    series: dict[tuple[str, str, str, str], tuple[dict[str, Any], list[int]]] = {}
    for rid, device, kind, label, unit, ts, value in rows:
        key = (device, kind, label, unit)
        got = series.get(key)
        if got is None:
            s: dict[str, Any] = {
                "device": device,
                "type": kind,
                "label": label,
                "ts": [],
                "values": [],
            }
            if unit:
                s["unit"] = unit
            got = series[key] = (s, [])
        got[0]["ts"].append(int(ts) if ts == int(ts) else ts)
        got[0]["values"].append(value)
        got[1].append(rid)
    body = {"batch": "", "series": [s for s, _ in series.values()]}
    return body, [ids for _, ids in series.values()]


def now() -> float:
    return time.time()
