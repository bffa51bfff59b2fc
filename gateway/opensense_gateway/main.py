"""The gateway process: intake (site MQTT + local HTTP) -> durable queue -> server.

Threads, each owning one job:
- paho's network thread hands every message to `inbox` (nothing else);
- the writer commits inbox items to SQLite in groups, evaluates the local rules in
  the same transaction, then acknowledges (MQTT PUBACK / HTTP 200);
- the uplink thread syncs, posts local alerts (before any reading), forwards the
  queue oldest first at a bounded rate, and publishes health;
- the alarm thread checks absence rules and sends local alerts when the server has
  been out of reach longer than `uplink_down_after_s`;
- the watch thread holds the sync long-poll: a change of the site's devices, tokens
  or rules (a rotated token) reaches the site broker at once;
- the HTTP server thread(s) take POST /v1/ingest.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import queue
import random
import re
import signal
import socket
import ssl
import sys
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from opensense_contract import retry, topics
from opensense_contract.errors import CODES
from opensense_contract.payload import MAX_BODY_BYTES

from . import __version__, mosquitto, notify, payload, rules
from .config import Config, example, http_address, load
from .store import Queued, Store
from .uplink import Answer, Api, Link, error_text, group

log = logging.getLogger("opensense-gateway")

WRITE_GROUP = 5000  # inbox items per transaction at most


def busy_rows(done: int) -> int:
    return done >> 3


def iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class HttpWait:
    """An HTTP request waiting for its readings to be committed."""

    def __init__(self, readings: list[payload.Reading]) -> None:
        self.readings = readings
        self.done = threading.Event()
        self.error: str | None = None


class Gateway:
    def __init__(self, cfg: Config, clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.clock = clock
        self.store = Store(cfg.queue_path)
        last_ok = self.store.get_meta("uplink_last_ok")
        self.link = Link(float(last_ok) if last_ok else None, clock())
        self.stop = threading.Event()
        self.resume = threading.Event()  # SIGHUP: retry after a 401/403, resync
        self.inbox: queue.Queue[Any] = queue.Queue()
        self.states = self.store.load_states()
        self.last_heard: dict[tuple[str, str, str], float] = {}
        self.sync_doc: dict[str, Any] = {}
        cached = self.store.get_meta("sync")
        if cached:
            self.sync_doc = json.loads(cached)
        self.rules = rules.rules_from_sync(self.sync_doc)
        self.last_sync = self.store.get_meta("last_sync")
        self.generation = 0  # MQTT connection number: an ack never crosses a reconnect
        self.mqtt: mqtt.Client | None = None
        self.http: DoorServer | None = None
        self.token_ok: dict[bytes, str] = {}  # sha256(token) -> local_id, for HTTP intake
        self.qos0_dropped = 0
        # the broker keeps readings for the gateway only once its persistent session
        # has subscribed (the very first start): health shows it
        self.subscribed = False
        self.forwarded = 0
        self.sent_at = 0.0  # when the last batch was sent (the rate bound)
        self.health_lock = threading.Lock()
        self.sync_lock = threading.Lock()  # the uplink and the watch both apply syncs
        self.watch_api: Api | None = None
        self.threads: list[threading.Thread] = []

    # --- sync -------------------------------------------------------------------------

    @property
    def account(self) -> str | None:
        return self.sync_doc.get("account_id")

    def apply_sync(self, doc: dict[str, Any]) -> None:
        self.sync_doc = doc
        self.rules = rules.rules_from_sync(doc)
        self.token_ok = {}
        self.write_broker_files()

    def write_broker_files(self) -> None:
        cfg = self.cfg
        if not (cfg.mqtt_password_file and cfg.mqtt_acl_file and self.account):
            return
        salt = hashlib.sha256(("opensense-gateway:" + cfg.mqtt_password).encode()).digest()[:12]
        gw_hash = mosquitto.mosquitto_hash(cfg.mqtt_password, salt)
        if mosquitto.apply(
            cfg.mqtt_password_file,
            cfg.mqtt_acl_file,
            cfg.mqtt_reload_command,
            mosquitto.password_file(self.sync_doc.get("devices", []), cfg.mqtt_username, gw_hash),
            mosquitto.acl_file(self.account, self.sync_doc.get("devices", []), cfg.mqtt_username),
        ):
            log.info("site broker credentials updated (%d devices)", len(self.sync_doc["devices"]))

    def sync(self, api: Api) -> Answer:
        a = api.call("GET", "/v1/gateway/sync")
        if a.status == 200 and isinstance(a.body, dict):
            self.take_sync(a.body)
        return a

    def take_sync(self, doc: dict[str, Any]) -> None:
        with self.sync_lock:
            self.store.set_meta("sync", json.dumps(doc))
            self.last_sync = iso(self.clock())
            self.store.set_meta("last_sync", self.last_sync or "")
            self.apply_sync(doc)

    def watch(self) -> None:
        """The sync long-poll (server push): held open for sync_wait_s; the server
        answers at once when the site's document changes. A failure only waits and
        tries again: the uplink thread owns the link state, and its periodic sync
        stays the fallback. While the WAN is down the site keeps the last synced
        hashes (a token rotated meanwhile works at the site until the link is back)."""
        wait = self.cfg.sync_wait_s
        api = self.watch_api = Api(self.cfg, timeout=wait + self.cfg.server_timeout_s)
        attempt = 0
        while not self.stop.is_set():
            version = self.sync_doc.get("version")
            if not version or self.link.state == "refused":
                self.stop.wait(1)  # no sync yet, or an old server: nothing to hold
                continue
            try:
                a = api.call("GET", f"/v1/gateway/sync?wait={wait:g}&version={version}")
            except Exception:  # the thread must never die
                if self.stop.is_set():
                    break  # shutdown() cut the held request
                log.exception("sync long-poll failed")
                a = Answer(0, None)
            if a.status == 200 and isinstance(a.body, dict):
                if a.body.get("version") != version:
                    log.info("site changed on the server: synced at once")
                self.take_sync(a.body)
                attempt = 0
            elif a.status == 304:
                attempt = 0
            else:
                api.close()
                self.stop.wait(retry.backoff(attempt, random.random()))
                attempt = min(attempt + 1, 6)
        api.close()

    # --- intake: MQTT ------------------------------------------------------------------

    def start_mqtt(self) -> None:
        cfg = self.cfg
        c = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=cfg.mqtt_client_id,
            clean_session=False,  # the broker keeps our subscription and queue while we are down
            protocol=mqtt.MQTTv311,
            manual_ack=True,  # PUBACK only after the reading is on disk
        )
        c.username_pw_set(cfg.mqtt_username, cfg.mqtt_password)
        c.max_inflight_messages_set(1000)
        c.reconnect_delay_set(1, 30)

        def on_connect(client: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
            if rc.is_failure:
                log.warning("site broker refused the gateway: %s", rc)
                return
            self.generation += 1
            client.subscribe(f"{topics.ROOT}/+/+", qos=topics.MEASUREMENT_QOS)
            log.info("connected to the site broker (session present: %s)", _f.session_present)

        def on_subscribe(_c: mqtt.Client, _u: Any, _mid: int, codes: Any, _p: Any) -> None:
            self.subscribed = all(not rc.is_failure for rc in codes)
            log.info("subscribed on the site broker: %s", self.subscribed)

        def on_disconnect(_c: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
            self.subscribed = False

        def on_message(_c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
            self.inbox.put(("mqtt", self.generation, msg.mid, msg.qos, msg.topic, msg.payload))

        c.on_connect = on_connect
        c.on_subscribe = on_subscribe
        c.on_disconnect = on_disconnect
        c.on_message = on_message
        c.connect_async(cfg.mqtt_host, cfg.mqtt_port, keepalive=30)
        c.loop_start()
        self.mqtt = c

    # --- the writer -------------------------------------------------------------------

    def writer(self) -> None:
        while not self.stop.is_set():
            try:
                first = self.inbox.get(timeout=0.5)
            except queue.Empty:
                continue
            items = [first]
            while len(items) < WRITE_GROUP:
                try:
                    items.append(self.inbox.get_nowait())
                except queue.Empty:
                    break
            while not self.stop.is_set():
                try:
                    self.commit(items)
                    break
                except Exception:
                    # disk full, I/O error: nothing was acknowledged. HTTP callers get
                    # 503 and resend; MQTT messages are kept and written again (the
                    # broker would redeliver them only after a reconnect).
                    log.exception("writing to the queue failed; retrying")
                    for it in items:
                        if it[0] == "http":
                            it[1].error = "the gateway could not store the readings"
                            it[1].done.set()
                    items = [it for it in items if it[0] == "mqtt"]
                    self.stop.wait(1)

    def commit(self, items: list[Any]) -> None:
        now = self.clock()
        readings: list[tuple[payload.Reading, float]] = []
        dead: list[tuple[bytes, str, float]] = []
        acks: list[tuple[int, int, int]] = []
        for it in items:
            if it[0] == "mqtt":
                _, gen, mid, qos, topic, raw = it
                if qos == 0:
                    self.qos0_dropped += 1  # docs/product.md#mqtt: QoS 0 measurements are dropped
                    continue
                acks.append((gen, mid, qos))
                parts = topic.split("/")
                account = self.account or (parts[1] if len(parts) > 1 else "")
                device = topics.measurement_device(topic, account)
                try:
                    if device is None:
                        raise payload.PayloadError(f"not a measurement topic: {topic[:100]}")
                    readings += [(r, now) for r in payload.parse(raw, device, now)]
                except Exception as exc:  # a poison message must never block the queue
                    dead.append((bytes(raw[:4096]), f"{topic[:100]}: {exc}"[:500], now))
            else:
                readings += [(r, now) for r in it[1].readings]
        changed, opened, cleared = self.evaluate([r for r, _ in readings], now)
        self.store.add(readings, dead, changed, opened, cleared)
        self.states.update(changed)  # only once committed
        for r, _ in readings:
            self.last_heard[(r.device, r.kind, r.label)] = now
        c = self.mqtt
        for gen, mid, qos in acks:
            if c is not None and gen == self.generation:
                c.ack(mid, qos)
        for it in items:
            if it[0] == "http":
                it[1].done.set()

    def evaluate(
        self, readings: list[payload.Reading], now: float
    ) -> tuple[dict[str, rules.State], list[dict[str, Any]], list[tuple[str, float]]]:
        """Range rules over the new readings (pure steps; state kept with the queue)."""
        changed: dict[str, rules.State] = {}
        opened: list[dict[str, Any]] = []
        cleared: list[tuple[str, float]] = []
        down = 0 if self.link.is_up() else 1
        for r in sorted(readings, key=lambda r: r.ts):
            for rule in rules.rules_for(self.rules, r.device, r.kind, r.label):
                if rule.kind != "range":
                    continue
                key = f"{rule.id}|{r.device}|{r.kind}|{r.label}"
                st = changed.get(key) or self.states.get(key) or rules.State()
                new, ev = rules.step_range(rule, st, r.ts, r.value)
                if new != st:
                    changed[key] = new
                if ev is None:
                    continue
                ref = f"{key}|{int((new.open_at if ev.what == 'open' else st.open_at) or 0)}"
                if ev.what == "open":
                    opened.append(
                        dict(
                            ref=ref,
                            rule_id=rule.id,
                            device=r.device,
                            kind=r.kind,
                            label=r.label,
                            unit=r.unit,
                            opened_at=ev.at,
                            value=ev.value,
                            uplink_down=down,
                        )
                    )
                else:
                    cleared.append((ref, ev.at))
        return changed, opened, cleared

    # --- the uplink ----------------------------------------------------------------

    def uplink(self) -> None:
        api = Api(self.cfg)
        attempt = 0
        next_sync = next_health = next_send = 0.0
        while not self.stop.is_set():
            if self.link.state == "refused":
                self.post_health_locally()
                if self.resume.wait(5):
                    self.resume.clear()
                    self.link.down("resumed after SIGHUP")
                    next_sync = 0.0
                continue
            try:
                a, busy = self.uplink_round(api, next_sync, next_health, next_send)
            except Exception:  # the uplink thread must never die: log, wait, go on
                log.exception("uplink round failed; retrying")
                api.close()
                self.stop.wait(retry.backoff(attempt, random.random()))
                attempt = min(attempt + 1, 10)
                continue
            now = self.clock()
            if a is None or a.status == 200:
                attempt = 0
                if a is not None:
                    self.mark_ok()
                if busy & 1:
                    next_sync = now + self.cfg.sync_interval_s
                if busy & 2:
                    next_health = now + self.cfg.health_interval_s
                if busy & 4:  # the bound counts from the batch's start, not its end
                    next_send = self.sent_at + busy_rows(busy) / self.cfg.max_rate
                else:
                    self.stop.wait(0.2)
                continue
            wait = self.failed(a, attempt)
            if a.status == 0 or a.status >= 500:
                attempt += 1
            self.stop.wait(wait)
        api.close()

    def uplink_round(
        self, api: Api, next_sync: float, next_health: float, next_send: float
    ) -> tuple[Answer | None, int]:
        """One round: sync when due, local alerts, one batch, health when due. Returns
        the first failed answer (or the last good one) and what was done (bits: 1
        synced, 2 health, 4 a batch, batch size << 3)."""
        now = self.clock()
        done = 0
        last: Answer | None = None
        if now >= next_sync:
            last = self.sync(api)
            if last.status != 200:
                return last, 0
            done |= 1
        got = self.post_alerts(api)  # before any reading: the server learns first
        if got is not None:
            if got.status != 200:
                return got, done
            last = got
        rows = self.store.oldest(self.cfg.batch_size)
        if rows:
            if now < next_send:
                self.stop.wait(next_send - now)
            self.sent_at = self.clock()
            got = self.forward(api, rows)
            if got.status != 200:
                return got, done
            last = got
            done |= 4 | (len(rows) << 3)
        if now >= next_health:
            got = self.post_health(api)
            if got.status != 200:
                return got, done
            last = got
            done |= 2
        return last, done

    def mark_ok(self) -> None:
        now = self.clock()
        if not self.link.is_up():
            log.info("server reachable")
            # alarms not sent locally by now are the server's: it gets their readings
            self.store.hand_over_alarms()
        self.link.ok(now)
        self.store.set_meta("uplink_last_ok", repr(now))

    def failed(self, a: Answer, attempt: int) -> float:
        """How long to wait after a failed call (the contract's retry rule)."""
        code, msg = error_text(a)
        if a.status == 0 or a.status >= 500:
            if self.link.is_up() or self.link.state == "unknown":
                log.warning("server unreachable (%s: %s); keeping readings", code, msg)
            self.link.down(f"{code}: {msg}")
            return retry.backoff(attempt, random.random())
        if a.status == 429:
            return retry.retry_after(a.retry_after)
        # 401/403: never retried; the rows stay queued until an operator fixes the token
        log.error("server refused the gateway (%s: %s); waiting for SIGHUP", code, msg)
        self.link.refused(f"{code}: {msg}")
        return 0.0

    def forward(self, api: Api, rows: list[Queued]) -> Answer:
        body, ids = group(rows)
        body["batch"] = uuid.uuid4().hex
        a = api.call("POST", "/v1/gateway/ingest", body)
        now = self.clock()
        if a.status == 200 and isinstance(a.body, dict):
            dead = []
            for rej in a.body.get("rejected", []):
                try:
                    rid = ids[int(rej["series"])][int(rej["index"])]
                except (KeyError, IndexError, ValueError, TypeError):
                    continue
                dead.append((rid, str(rej.get("code")), str(rej.get("message"))[:500]))
            self.store.settle(rows[-1].id, [r.id for r in rows], dead, now)
            self.forwarded += len(rows)
            if dead:
                log.warning("server refused %d readings; kept in dead_letters", len(dead))
        elif a.status in (400, 413, 422):
            # the batch as a whole is refused and would be refused again: keep it aside
            code, msg = error_text(a)
            self.store.settle(
                rows[-1].id, [r.id for r in rows], [(r.id, code, msg[:500]) for r in rows], now
            )
            log.error("server refused a batch of %d (%s); kept in dead_letters", len(rows), code)
            return Answer(200, a.body)
        return a

    def post_alerts(self, api: Api) -> Answer | None:
        alerts = self.store.unposted_alerts()
        if not alerts:
            return None
        body = {
            "alerts": [
                {
                    "ref": x["ref"],
                    "device": x["device"],
                    "type": x["kind"],
                    "label": x["label"],
                    "unit": x["unit"] or None,
                    "rule_id": x["rule_id"] if str(x["rule_id"]).startswith("rul_") else None,
                    "opened_at": iso(x["opened_at"]),
                    "notified_at": iso(x["notified_at"]),
                    "cleared_at": iso(x["cleared_at"]),
                    "path": x["path"],
                }
                for x in alerts
            ]
        }
        a = api.call("POST", "/v1/gateway/local-alerts", body)
        if a.status == 200:
            self.store.mark_posted(
                [x["ref"] for x in alerts], {x["ref"]: x["cleared_at"] for x in alerts}
            )
            log.info("posted %d local alerts", len(alerts))
        elif a.status in (400, 422):
            # refused as a whole and would be again (e.g. an alarm outside the uplink
            # gap the server saw): set aside, not resent every round. The server then
            # notifies for those alarms itself: people may hear twice, never not at all.
            log.error("server refused %d local alerts: %s", len(alerts), error_text(a))
            self.store.mark_posted(
                [x["ref"] for x in alerts], {x["ref"]: x["cleared_at"] for x in alerts}
            )
            return Answer(200, a.body)
        return a

    def health(self) -> dict[str, Any]:
        now = self.clock()
        depth, oldest = self.store.depth()
        return {
            "queue_depth": depth,
            "oldest_unsent_s": round(now - oldest, 1) if oldest is not None else None,
            "uplink": self.link.state,
            "uplink_down_s": round(self.link.down_for(now), 1),
            "last_sync": self.last_sync,
            "dead_letters": self.store.dead_count(),
            "qos0_dropped": self.qos0_dropped,
            "site_broker": "subscribed" if self.subscribed else "not subscribed",
            "version": __version__,
        }

    def post_health(self, api: Api) -> Answer:
        h = self.post_health_locally()
        h["uplink"] = "up"  # it is, since this reaches the server
        h["uplink_down_s"] = 0
        return api.call("POST", "/v1/gateway/health", h)

    def post_health_locally(self) -> dict[str, Any]:
        """health.json, written whole (two threads write it: one at a time)."""
        h = self.health()
        path = Path(self.cfg.state_dir) / "health.json"
        with self.health_lock:
            tmp = path.with_suffix(".tmp")
            try:
                tmp.write_text(json.dumps(h))
                tmp.replace(path)
            except OSError as exc:
                log.warning("cannot write %s: %s", path, exc)
        return h

    # --- local alarms ------------------------------------------------------------------

    def alarm_loop(self) -> None:
        paths = notify.paths(self.cfg)
        while not self.stop.wait(self.cfg.check_interval_s):
            try:
                self.check_absence()
                self.notify_due(paths)
                self.post_health_locally()
            except Exception:
                log.exception("local alarm round failed")

    def check_absence(self) -> None:
        now = self.clock()
        changed: dict[str, rules.State] = {}
        opened, cleared = [], []
        down = 0 if self.link.is_up() else 1
        for (device, kind, label), heard in list(self.last_heard.items()):
            for rule in rules.rules_for(self.rules, device, kind, label):
                if rule.kind != "absence":
                    continue
                key = f"{rule.id}|{device}|{kind}|{label}"
                st = self.states.get(key) or rules.State()
                new, ev = rules.check_absence(rule, st, heard, now)
                if ev is None:
                    continue
                changed[key] = new
                ref = f"{key}|{int(new.open_at or st.open_at or 0)}"
                if ev.what == "open":
                    opened.append(
                        dict(
                            ref=ref,
                            rule_id=rule.id,
                            device=device,
                            kind=kind,
                            label=label,
                            unit="",
                            opened_at=ev.at,
                            value=None,
                            uplink_down=down,
                        )
                    )
                else:
                    cleared.append((ref, ev.at))
        if changed:
            self.store.add([], (), changed, opened, cleared)
            self.states.update(changed)

    def notify_due(self, paths: list[str]) -> None:
        """Alert locally for alarms raised while the server was out, once the server
        has been out longer than uplink_down_after_s."""
        now = self.clock()
        if not paths or self.link.down_for(now) < self.cfg.uplink_down_after_s:
            return
        for alarm in self.store.unnotified_alarms():
            for path in paths:
                try:
                    notify.send(self.cfg, path, alarm, "open")
                except Exception as exc:
                    log.warning("local alert by %s failed: %s", path, exc)
                    continue
                self.store.add_alert(alarm["ref"], path, self.clock())
                log.warning("local alarm sent by %s: %s %s", path, alarm["device"], alarm["kind"])

    # --- HTTP intake --------------------------------------------------------------------

    def device_for_token(self, token: str) -> str | None:
        digest = hashlib.sha256(token.encode()).digest()
        if digest in self.token_ok:
            return self.token_ok[digest]
        if not token.startswith("ds_live_"):
            return None
        key_id = token[8:].partition("_")[0]
        for d in self.sync_doc.get("devices", []):
            if d.get("key_id") == key_id and d.get("site_hash"):
                if mosquitto.check_hash(token, d["site_hash"]):
                    self.token_ok[digest] = d["local_id"]
                    return str(d["local_id"])
        return None

    def start_http(self) -> None:
        host, port, tls = http_address(self.cfg)
        ctx: ssl.SSLContext | None = None
        if tls:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # ESP32 mbedTLS speaks 1.2
            ctx.load_cert_chain(self.cfg.http_cert_file, self.cfg.http_key_file)
        self.http = DoorServer((host, port), door_handler(self), ctx)
        self._thread(self.http.serve_forever, "http")
        log.info("local HTTP door on %s:%d (%s)", host, port, "TLS" if tls else "plain HTTP")

    # --- life -------------------------------------------------------------------------

    def _thread(self, fn: Callable[[], None], name: str) -> None:
        t = threading.Thread(target=fn, name=name, daemon=True)
        t.start()
        self.threads.append(t)

    def run(self) -> None:
        self.write_broker_files()  # from the last sync, before the broker needs them
        self._thread(self.writer, "writer")
        self._thread(self.uplink, "uplink")
        self._thread(self.alarm_loop, "alarms")
        if self.cfg.sync_wait_s > 0:
            self._thread(self.watch, "watch")
        if self.cfg.mqtt_host:
            self.start_mqtt()
        if self.cfg.http_listen:
            self.start_http()
        log.info("opensense-gateway %s running", __version__)
        while not self.stop.wait(1):
            pass
        self.shutdown()

    def shutdown(self) -> None:
        if self.watch_api is not None:
            self.watch_api.close()  # a held long-poll returns now
        if self.mqtt is not None:
            self.mqtt.disconnect()
            self.mqtt.loop_stop()
        if self.http is not None:
            self.http.shutdown()
            self.http.server_close()  # the listening socket too, not only the loop
        for t in self.threads:
            t.join(10)
        self.store.close()


# --- the local HTTP door --------------------------------------------------------------
# Nodes on the LAN that can only POST. Every input is hostile: the length is known and
# bounded before a byte of body is read, the token is checked before the body is
# read, each connection has a time limit, and only so many are served at once.

MAX_BODY = MAX_BODY_BYTES  # the server's own HTTP limit (the contract's)
DOOR_TIMEOUT_S = 15.0  # per socket operation: a slow or silent client lets go
DOOR_CONNECTIONS = 64  # served at once; more are closed at accept
LENGTH = re.compile(r"[0-9]{1,7}")  # digits only: no sign, no spaces, no underscores
LINGER_S, LINGER_BYTES = 2.0, 1024 * 1024  # the lingering close's bounds


class DoorServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        tls: ssl.SSLContext | None,
    ) -> None:
        self.tls = tls
        self.slots = threading.BoundedSemaphore(DOOR_CONNECTIONS)
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)  # full: the node retries later
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def shutdown_request(self, request: Any) -> None:
        """A lingering close, bounded (as nginx's lingering_close): a refused request's
        unread body would make close() send a reset that can destroy the answer
        before the client read it. Stop sending, read and drop what is in flight (at
        most LINGER_BYTES for LINGER_S), then close."""
        try:
            request.shutdown(socket.SHUT_WR)
            request.settimeout(0.5)
            deadline, dropped = time.monotonic() + LINGER_S, 0
            while dropped < LINGER_BYTES and time.monotonic() < deadline:
                chunk = request.recv(65536)
                if not chunk:
                    break
                dropped += len(chunk)
        except OSError:
            pass
        self.close_request(request)

    def finish_request(self, request: Any, client_address: Any) -> None:
        if self.tls is None:
            super().finish_request(request, client_address)
            return
        # the handshake runs here, in the connection's own thread and under its
        # timeout: a client that never finishes it holds one slot, not the door
        request.settimeout(DOOR_TIMEOUT_S)
        try:
            conn = self.tls.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError) as exc:
            log.debug("http: TLS handshake with %s failed: %s", client_address, exc)
            return
        try:
            super().finish_request(conn, client_address)
        finally:
            conn.close()


def door_handler(gw: Gateway) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = DOOR_TIMEOUT_S

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            log.debug("http: " + format, *args)

        def answer(self, status: int, body: dict[str, Any], close: bool = False) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if close:
                # a body left unread must never be taken for the next request
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(data)

        def error(self, code: str, message: str, close: bool = False) -> None:
            """The server's envelope, with the status the contract gives the code."""
            status = CODES[code]
            rid = "req_" + uuid.uuid4().hex[:16]
            self.answer(
                status, {"error": {"code": code, "message": message, "request_id": rid}}, close
            )

        def do_GET(self) -> None:  # noqa: N802
            if self.path == "/healthz":
                self.answer(200, gw.health())
            else:
                self.error("not_found", "only POST /v1/ingest and GET /healthz here")

        def body_length(self) -> int | None:
            """The body's length from the headers, or None once refused."""
            if self.headers.get("Transfer-Encoding") is not None:
                self.error(
                    "length_required",
                    "chunked bodies are not taken: send Content-Length",
                    True,
                )
                return None
            lengths = self.headers.get_all("Content-Length") or []
            if not lengths:
                self.error("length_required", "send Content-Length (at most 64 KiB)", True)
                return None
            if len(lengths) > 1 or not LENGTH.fullmatch(lengths[0]):
                self.error(
                    "invalid_request",
                    "Content-Length must be one non-negative integer",
                    True,
                )
                return None
            n = int(lengths[0])
            if n > MAX_BODY:
                self.error("payload_too_large", "the body is over 64 KiB", True)
                return None
            return n

        def do_POST(self) -> None:  # noqa: N802
            if self.path.split("?")[0] != "/v1/ingest":
                return self.error("not_found", "only POST /v1/ingest here", True)
            n = self.body_length()
            if n is None:
                return None
            auth = self.headers.get("Authorization", "")
            token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
            if not token:
                return self.error("auth_required", "send Authorization: Bearer ds_live_…", True)
            device = gw.device_for_token(token)
            if device is None:
                return self.error(
                    "token_invalid", "the token is not a live token of this site", True
                )
            raw = self.rfile.read(n)  # bounded, and only for a node of this site
            if len(raw) < n:
                return self.error("invalid_request", "the body ended early", True)
            try:
                named = self.headers.get("X-Device-Id")
                if named is not None and named != device:
                    raise payload.PayloadError(f"this token belongs to {device!r}")
                readings = payload.parse(raw, device, gw.clock())
            except payload.PayloadError as exc:
                return self.error(exc.code, str(exc))
            w = HttpWait(readings)
            gw.inbox.put(("http", w))
            if not w.done.wait(30) or w.error:
                return self.error("unavailable", w.error or "the gateway is busy")
            self.answer(
                200,
                {
                    "accepted": len(readings),
                    "deduplicated": 0,
                    "channels": [],
                    "queued": len(readings),
                },
            )
            return None

    return Handler


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="opensense-gateway", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="/etc/opensense-gateway.conf")
    p.add_argument("--print-config", action="store_true", help="print every key with its default")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    if args.print_config:
        print(example())
        return 0
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    gw = Gateway(load(Path(args.config)))
    signal.signal(signal.SIGTERM, lambda *_: gw.stop.set())
    signal.signal(signal.SIGINT, lambda *_: gw.stop.set())
    signal.signal(signal.SIGHUP, lambda *_: gw.resume.set())
    gw.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
