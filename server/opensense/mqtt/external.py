"""OPENSENSE_MQTT=external: the server as a client of a production broker (Mosquitto 2
with the dynamic-security plugin, deploy/mosquitto/).

OPENSENSE_MQTT_URL = mqtt[s]://user:password@host:port[?consumer=single|shared&client_id=…]

Two MQTT connections, each with paho's network loop driven by the aiohttp event loop
(`_PahoLoop`: paho's external-loop API, the socket watched by the loop; only the
blocking connect and TLS handshake run in a worker thread). It was a thread a
connection, each message handed over by call_soon_threadsafe: 26–40 µs more of the
server's CPU a message (docs/ingest-cost.md, stop 30).

- the consumer: a persistent session (MQTT 5, clean_start false, no session expiry)
  under a fixed client id, so the broker keeps queueing while the server is down
  and sends it all when it is back. Two ways to run it:

  `consumer=single` (the default): one consumer for all server processes, held by
  the process that holds a PostgreSQL advisory lock (the others take over within a
  second when it dies), client id `opensense-consumer`, plain subscriptions
  `opensense/+/+`, `…/lwt`, `…/info`. Mosquitto 2.0.11 keeps plain subscriptions
  of a persistent session across its own restart, but NOT shared ones: readings
  published after a broker restart and before the server subscribed again would be
  acknowledged to the node and then dropped (tests/test_mqtt_mosquitto.py shows
  it). So this is the mode that keeps "stored exactly once" through broker restarts.

  `consumer=shared`: every process consumes, splitting the measurements through
  `$share/opensense/opensense/+/+`, under its own client id
  `opensense-<host name>-<HTTP port>` (or `client_id`); lwt/info stay plain
  subscriptions, since retained messages never go to a shared subscription. For
  brokers that keep shared subscriptions across restarts (EMQX), or when losing the
  readings of a broker restart's first second is acceptable.

  Acknowledgement is manual: a QoS 1 message is acknowledged only after
  `MqttIngest.handle` returned, i.e. its rows are committed (a refused payload:
  after its envelope went to …/err). A message whose handling raised is not
  acknowledged; the broker sends it again only on a new connection, so after a
  failure the consumer reconnects, after 1 s, then 2, 4 … 60 s while failures go on
  (no reconnect storm when the database is down; the broker stops sending once
  ReceiveMaximum messages wait for an acknowledgement). Measurements are handled
  concurrently (up to ReceiveMaximum, riding the group-commit writer together); a
  device's lwt and info messages in order. A device's row (channels, offsets) is
  read once and kept up to 10 minutes (`DEVICE_TTL_S`); a change made through the API
  reaches it at once.
- the control connection (clean session, one per process): server publishes
  (commands, error envelopes) and the dynamic-security API (dynsec.py). On every
  (re)connect it grants the server's role, sends the credentials still waiting in
  this process, and reconciles the broker's device clients with the database.

A device's password exists in plaintext only while its token is created or rotated
(it is never stored). So `credentials_changed` sends it at once and, if the broker is
unreachable, keeps it in this process's memory and sends it as soon as the broker is
back. If the process ends first, the device has no (or a stale) broker password;
reconciliation disables a stale one, logs every device without credentials, and a
token rotation fixes it (HTTP ingest keeps working with the token meanwhile).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import paho.mqtt.client as mqtt
import psycopg
from aiohttp import web
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from opensense_contract import retry, topics

from .. import aio, tokens
from ..api.keys import CONFIG, DSN, POOL
from ..errors import ApiError
from ..ingest import pipeline
from . import dynsec
from .ingest import MqttIngest

log = logging.getLogger(__name__)

SHARE_GROUP = "opensense"
RECEIVE_MAXIMUM = 500  # messages the broker may have in flight to the consumer, unacknowledged
SESSION_NEVER_EXPIRES = 0xFFFFFFFF
KEEPALIVE = 30
MAX_BACKOFF = float(retry.BACKOFF_CAP_S)  # the contract's cap; no jitter: one consumer
STREAK_RESET_S = 300.0  # a failure this long after the last one starts the backoff again at 1 s
DRAIN_S = 10.0  # how long a reconnect or a stop waits for messages being handled
CONNECT_WAIT_S = 10.0  # start() waits this long for the broker, then goes on without it
RETRY_PENDING_S = 10.0
# beyond this many messages being handled, QoS 0 ones are dropped unhandled
# (QoS 1 ones are bounded by ReceiveMaximum)
MAX_HANDLERS = 5000
# Messages handled at once. Mosquitto 2.0.11 sends well past RECEIVE_MAXIMUM once it has
# a backlog for the session (measured: 487 in flight with a limit of 210), so the bound
# is kept here: the rest wait for a worker, not for a pool connection (which times out).
WORKERS = 32
# A device's row (channels, offsets) is kept this long. Every change made through the
# API reaches the cache at once (channels_changed, token_revoked, device_deleted: each
# process hears the NOTIFY), and a message that creates channels reads it again; the
# expiry is only for what changes unannounced (SQL by hand), which the embedded broker
# sees at the node's next CONNECT. It was 5 s: shorter than a node's minute, so every
# message of a real fleet read its device again (the fleet bench's top statement:
# docs/ingest-cost.md, stop 29).
DEVICE_TTL_S = 600.0
DEVICE_CACHE_MAX = 100_000
SINGLE_CLIENT_ID = "opensense-consumer"
LOCK_CLASS = 0x6F70656E  # pg_try_advisory_lock(LOCK_CLASS, hashtext(consumer client id))
LEADER_POLL_S = 1.0


@dataclass(frozen=True)
class BrokerUrl:
    host: str
    port: int
    tls: bool
    username: str
    password: str | None
    consumer: str = "single"  # or "shared"
    client_id: str | None = None

    @classmethod
    def parse(cls, url: str) -> BrokerUrl:
        u = urlsplit(url)
        if u.scheme not in ("mqtt", "mqtts") or not u.hostname:
            raise ValueError(  # the URL itself is not quoted: it holds a password
                "OPENSENSE_MQTT_URL must look like mqtts://user:password@host:8883"
            )
        if not u.username:
            raise ValueError(
                "OPENSENSE_MQTT_URL needs the server's broker account:"
                " mqtt://user:password@127.0.0.1:1883 (deploy/mosquitto/README.md)"
            )
        query = {k: v[-1] for k, v in parse_qs(u.query).items()}
        unknown = set(query) - {"consumer", "client_id"}
        if unknown:
            raise ValueError(f"OPENSENSE_MQTT_URL: unknown parameter(s) {sorted(unknown)}")
        consumer = query.get("consumer", "single")
        if consumer not in ("single", "shared"):
            raise ValueError(
                f"OPENSENSE_MQTT_URL: consumer must be single or shared, not {consumer!r}"
            )
        tls = u.scheme == "mqtts"
        return cls(
            u.hostname,
            u.port or (8883 if tls else 1883),
            tls,
            unquote(u.username),
            unquote(u.password) if u.password else None,
            consumer,
            query.get("client_id") or None,
        )


def default_client_id(url: BrokerUrl, http_port: int) -> str:
    if url.client_id:
        return url.client_id
    if url.consumer == "single":
        return SINGLE_CLIENT_ID
    return f"opensense-{socket.gethostname()}-{http_port}"


@dataclass(frozen=True)
class _Msg:
    gen: int
    mid: int
    qos: int
    topic: str
    payload: bytes


class ExternalBroker:
    def __init__(self, app: web.Application, *, client_id: str | None = None) -> None:
        cfg = app[CONFIG]
        self.app = app
        self.ingest = MqttIngest(app)
        self.url = BrokerUrl.parse(cfg.mqtt_url)
        self.ca_file = cfg.mqtt_ca or None
        self.client_id = client_id or default_client_id(self.url, cfg.port)
        self.missing: list[str] = []  # live devices the broker has no credentials for
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drivers: dict[mqtt.Client, _PahoLoop] = {}  # each client's network loop
        self._loop_thread = 0
        self._control: mqtt.Client | None = None
        self._consumer: mqtt.Client | None = None
        self._dynsec: dynsec.DynSec | None = None
        self._control_up = asyncio.Event()
        self._synced = asyncio.Event()
        self._sync_lock = asyncio.Lock()
        # device id -> (account, local_id, token): credentials the broker has not got yet
        self._pending: dict[str, tuple[str, str, str]] = {}
        # consumer state
        self._gen = 0
        self._ack_lock = threading.Lock()
        self._paused = True
        self._closing = False
        self._tails: dict[tuple[str, str, str], asyncio.Task[None]] = {}
        self._devices: dict[tuple[str, str], tuple[pipeline.Device, float]] = {}
        self._lookups: dict[tuple[str, str], asyncio.Lock] = {}
        self._work = asyncio.Semaphore(WORKERS)
        self._handlers: set[asyncio.Task[None]] = set()
        self._streak = 0
        self._last_failure = 0.0
        self._recycle_task: asyncio.Task[None] | None = None
        self._lead_task: asyncio.Task[None] | None = None
        self._leading = False  # consumer=single: this process holds the consumer lock
        self._background: set[asyncio.Task[None]] = set()
        self._qos0_overflow = 0

    # --- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        control_id = f"opensense-{socket.gethostname()}-{os.getpid()}-ctl"
        self._control = self._client(control_id, persistent=False)
        self._control.on_connect = self._control_connected
        self._control.on_subscribe = self._control_subscribed
        self._control.on_disconnect = self._control_disconnected
        self._control.on_message = self._control_message
        self._dynsec = dynsec.DynSec(loop, self._send_control)
        self._connect(self._control)
        self._spawn(self._retry_pending())
        # the first synchronisation before the consumer connects and before the API
        # serves: the server's role is in place, stale passwords are disabled
        try:
            async with asyncio.timeout(CONNECT_WAIT_S):
                await self._synced.wait()
        except TimeoutError:
            log.warning(
                "MQTT broker %s:%d not reachable yet; the server starts anyway and keeps trying",
                self.url.host,
                self.url.port,
            )
        if self.url.consumer == "shared":
            self._start_consumer()
        else:
            self._lead_task = asyncio.create_task(self._lead())

    def connected(self) -> bool:
        """The control connection to the broker is up (the status page asks)."""
        return self._control_up.is_set()

    async def stop(self) -> None:
        self._closing = True
        self._paused = True
        for t in [*self._background, self._recycle_task]:
            if t is not None:
                t.cancel()
        await aio.cancel(self._lead_task)
        await self._drain()
        clients = [c for c in (self._consumer, self._control) if c is not None]
        await self._close(*clients)
        if self._pending:
            log.error(
                "stopping with MQTT credentials never delivered to the broker for %s:"
                " rotate their tokens",
                ", ".join(sorted(self._pending)),
            )

    def _client(self, client_id: str, *, persistent: bool) -> mqtt.Client:
        c = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
            manual_ack=persistent,
        )
        if self.url.username is not None:
            c.username_pw_set(self.url.username, self.url.password)
        if self.url.tls:
            c.tls_set_context(ssl.create_default_context(cafile=self.ca_file))
        c.on_connect_fail = lambda client, userdata: log.warning(
            "MQTT connection %s to %s:%d failed; retrying",
            client_id,
            self.url.host,
            self.url.port,
        )
        return c

    def _connect(self, c: mqtt.Client, *, persistent: bool = False) -> None:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        if persistent:
            props.SessionExpiryInterval = SESSION_NEVER_EXPIRES
            props.ReceiveMaximum = RECEIVE_MAXIMUM
        c.connect_async(
            self.url.host,
            self.url.port,
            keepalive=KEEPALIVE,
            clean_start=not persistent,
            properties=props,
        )
        assert self._loop is not None
        driver = self._drivers[c] = _PahoLoop(c, self._loop)
        driver.start()  # retries the first connection too, then reconnects by itself

    async def _close(self, *clients: mqtt.Client) -> None:
        """Disconnect and stop their network loops."""
        await asyncio.gather(*(d.stop() for c in clients if (d := self._drivers.pop(c, None))))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _call(self, fn: Any, *args: Any) -> None:
        """From a paho callback (run by `_PahoLoop` on the event loop, or by `reconnect`
        in its thread) to the event loop, after the callback."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        if threading.get_ident() == self._loop_thread:
            loop.call_soon(fn, *args)  # (the hot path: each message; no wake-up needed)
        else:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(fn, *args)

    # --- consumer -------------------------------------------------------------------

    def _start_consumer(self) -> None:
        c = self._client(self.client_id, persistent=True)
        c.on_pre_connect = self._consumer_pre_connect
        c.on_connect = self._consumer_connected
        c.on_message = self._consumer_message
        c.on_disconnect = lambda client, userdata, flags, rc, props: log.info(
            "MQTT consumer %s disconnected (%s)", self.client_id, rc
        )
        self._consumer = c
        self._paused = self._closing
        self._connect(c, persistent=True)

    def _consumer_pre_connect(self, client: mqtt.Client, userdata: Any) -> None:
        # a new connection: acknowledgements of the previous one are void (the broker
        # sends those messages again, with the same packet ids)
        with self._ack_lock:
            self._gen += 1

    def _consumer_connected(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any
    ) -> None:
        if rc.is_failure:
            log.error("MQTT consumer %s refused by the broker: %s", self.client_id, rc)
            return
        shared = (
            self.url.consumer == "shared" and getattr(props, "SharedSubscriptionAvailable", 1) != 0
        )
        measurements = f"{topics.ROOT}/+/+"
        if shared:
            measurements = f"$share/{SHARE_GROUP}/{measurements}"
        # retained lwt/info come once, when the subscription is new (retainHandling 1);
        # later changes reach the persistent session like any message
        client.subscribe(
            [
                (measurements, SubscribeOptions(qos=1)),
                (f"{topics.ROOT}/+/+/lwt", SubscribeOptions(qos=1, retainHandling=1)),
                (f"{topics.ROOT}/+/+/info", SubscribeOptions(qos=1, retainHandling=1)),
            ]
        )
        log.info(
            "MQTT consumer %s connected (session %s, %s subscription)",
            self.client_id,
            "resumed" if flags.session_present else "new",
            "shared" if shared else "plain",
        )

    def _consumer_message(self, client: mqtt.Client, userdata: Any, m: mqtt.MQTTMessage) -> None:
        if self._paused:
            return  # not acknowledged: the broker sends it again on the next connection
        msg = _Msg(self._gen, m.mid, m.qos, m.topic, bytes(m.payload))
        self._call(self._dispatch, msg)

    def _dispatch(self, m: _Msg) -> None:
        t = topics.parse(m.topic)
        if t is None or t.sub not in topics.DEVICE_PUBLISHES:
            log.warning("MQTT message on %r is not a device topic; dropped", m.topic[:200])
            self._ack(m)
            return
        if m.qos == 0 and len(self._handlers) >= MAX_HANDLERS:
            self._qos0_overflow += 1
            if self._qos0_overflow % 1000 == 1:
                log.warning(
                    "MQTT consumer overloaded: %d QoS 0 messages dropped", self._qos0_overflow
                )
            return
        if t.sub == "":
            # measurements in any order: (channel, ts) makes each reading land once
            task = asyncio.create_task(self._handle(m, t, None))
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)
            return
        # a device's lwt/info in the order they came: "offline" then "online" is online
        key = (t.account, t.device, t.sub)
        task = asyncio.create_task(self._handle(m, t, self._tails.get(key)))
        self._tails[key] = task
        self._handlers.add(task)
        task.add_done_callback(lambda done: self._handled(key, done))

    def _handled(self, key: tuple[str, str, str], task: asyncio.Task[None]) -> None:
        self._handlers.discard(task)
        if self._tails.get(key) is task:
            del self._tails[key]

    async def _device(self, t: topics.DeviceTopic) -> pipeline.Device | None:
        """The device of a topic, read at most every DEVICE_TTL_S (as the embedded broker
        reads it once per connection): its channels, vertical and offsets."""
        key = (t.account, t.device)
        hit = self._devices.get(key)
        if hit is not None and hit[1] > time.monotonic():
            return hit[0]
        # one lookup per device at a time: a backlog of one device's messages must not
        # send a query each
        lock = self._lookups.setdefault(key, asyncio.Lock())
        async with lock:
            hit = self._devices.get(key)
            if hit is not None and hit[1] > time.monotonic():
                return hit[0]
            dev = await self.ingest.device_for_topic(t)
            if dev is None:
                self._devices.pop(key, None)
            else:
                if len(self._devices) > DEVICE_CACHE_MAX:
                    self._devices.clear()
                    self._lookups.clear()
                self._devices[key] = (dev, time.monotonic() + DEVICE_TTL_S)
            return dev

    def _refreshed(
        self, t: topics.DeviceTopic, dev: pipeline.Device, fresh: pipeline.Device
    ) -> None:
        """A message created channels: the cached device gets them now rather than at
        its expiry (so the next messages take the group-commit writer), unless the
        entry changed meanwhile (forgotten by a revocation or deletion, or read again)."""
        key = (t.account, t.device)
        hit = self._devices.get(key)
        if hit is not None and hit[0] is dev:
            self._devices[key] = (fresh, hit[1])

    def _forget(self, device_id: str) -> None:
        for key, (dev, _) in list(self._devices.items()):
            if dev.id == device_id:
                del self._devices[key]

    async def _handle(
        self, m: _Msg, t: topics.DeviceTopic, before: asyncio.Task[None] | None
    ) -> None:
        if before is not None:
            await asyncio.wait([before])  # this device's earlier messages first
        async with self._work:
            await self._handle_one(m, t)

    async def _handle_one(self, m: _Msg, t: topics.DeviceTopic) -> None:
        try:
            dev = await self._device(t)
            if dev is None:
                # the broker's ACL let it through, so the device was deleted meanwhile
                log.info("MQTT message on %s: no such device (deleted?); dropped", m.topic)
            else:
                answer = await self.ingest.handle(
                    dev, t, m.payload, m.qos, lambda fresh: self._refreshed(t, dev, fresh)
                )
                if answer is not None:
                    self._publish_nowait(
                        topics.topic(t.account, t.device, topics.ERR), json.dumps(answer).encode()
                    )
        except Exception:
            log.exception(
                "MQTT message on %s not stored; it comes again after a reconnect", m.topic
            )
            self._failed()
            return
        self._ack(m)

    def _ack(self, m: _Msg) -> None:
        if m.qos == 0:
            return
        with self._ack_lock:
            if m.gen == self._gen and self._consumer is not None:
                self._consumer.ack(m.mid, m.qos)

    def _failed(self) -> None:
        now = time.monotonic()
        if now - self._last_failure > STREAK_RESET_S:
            self._streak = 0
        self._last_failure = now
        if self._closing or (self._recycle_task is not None and not self._recycle_task.done()):
            return
        delay = min(MAX_BACKOFF, 2.0**self._streak)
        self._streak += 1
        self._recycle_task = asyncio.create_task(self._recycle(delay))

    async def _recycle(self, delay: float) -> None:
        """Reconnect the consumer so the broker sends the unacknowledged messages again."""
        log.warning("MQTT consumer reconnects in %g s to get unstored messages again", delay)
        await asyncio.sleep(delay)
        if self._closing:
            return
        if self._consumer is None:
            return  # no longer the consumer (single mode: the lock was lost)
        await self._stop_consumer()
        if not self._closing and (self.url.consumer == "shared" or self._leading):
            self._start_consumer()

    async def _stop_consumer(self) -> None:
        self._paused = True
        await self._drain()
        old, self._consumer = self._consumer, None
        if old is not None:
            await self._close(old)

    async def _lead(self) -> None:
        """consumer=single: consume only while this process holds the advisory lock.
        A process that dies loses its database session and so the lock; another one
        takes it within LEADER_POLL_S and resumes the same broker session."""
        while not self._closing:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self.app[DSN], autocommit=True
                ) as conn:
                    while True:
                        cur = await conn.execute(
                            "SELECT pg_try_advisory_lock(%s, hashtext(%s))",
                            (LOCK_CLASS, self.client_id),
                        )
                        row = await cur.fetchone()
                        if row is not None and row[0]:
                            break
                        await asyncio.sleep(LEADER_POLL_S)
                    log.info("MQTT consumer %s runs in this process", self.client_id)
                    self._leading = True
                    self._start_consumer()
                    try:
                        while True:  # a lost database connection means a lost lock
                            await asyncio.sleep(LEADER_POLL_S)
                            await conn.execute("SELECT 1")
                    finally:
                        self._leading = False
                        await self._stop_consumer()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("MQTT consumer lock: %s; trying again", exc)
                await asyncio.sleep(LEADER_POLL_S)

    async def _drain(self) -> None:
        if self._handlers:
            await asyncio.wait(list(self._handlers), timeout=DRAIN_S)

    # --- control connection ---------------------------------------------------------

    def _send_control(self, payload: bytes) -> bool:
        c = self._control
        if c is None or not c.is_connected():
            return False
        return c.publish(dynsec.CONTROL_TOPIC, payload, qos=1).rc == mqtt.MQTT_ERR_SUCCESS

    def _control_connected(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any
    ) -> None:
        if rc.is_failure:
            log.error(
                "MQTT broker %s:%d refused the server's account (%s): check OPENSENSE_MQTT_URL",
                self.url.host,
                self.url.port,
                rc,
            )
            return
        client.subscribe(dynsec.RESPONSE_TOPIC, qos=1)

    def _control_subscribed(
        self, client: mqtt.Client, userdata: Any, mid: int, codes: Any, props: Any
    ) -> None:
        if codes and not codes[0].is_failure:
            self._call(self._control_ready)
        else:
            log.error(
                "the server's MQTT account may not subscribe %s: is it the dynsec admin"
                " made by `mosquitto_ctrl dynsec init`?",
                dynsec.RESPONSE_TOPIC,
            )

    def _control_ready(self) -> None:
        self._control_up.set()
        self._spawn(self._sync())

    def _control_disconnected(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any
    ) -> None:
        self._call(self._control_up.clear)

    def _control_message(self, client: mqtt.Client, userdata: Any, m: mqtt.MQTTMessage) -> None:
        if m.topic == dynsec.RESPONSE_TOPIC and self._dynsec is not None:
            self._dynsec.feed(bytes(m.payload))

    def _publish_nowait(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False
    ) -> None:
        c = self._control
        if c is None:
            return
        info = c.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            log.warning("MQTT publish to %s failed: %s", topic, mqtt.error_string(info.rc))

    async def _sync(self) -> None:
        """After the control connection (re)connected: the server's role, the
        credentials waiting here, then what can be reconciled."""
        try:
            async with self._sync_lock:
                assert self._dynsec is not None and self.url.username is not None
                if await self._dynsec.ensure_server_role(self.url.username):
                    log.info("MQTT: the server's account got the %s role", dynsec.SERVER_ROLE)
                    return  # the broker disconnects us now; the next connection syncs
                await self._flush_pending()
                await self._reconcile()
            self._synced.set()
        except dynsec.DynSecError as exc:
            log.error("MQTT broker synchronisation failed: %s", exc)
        except Exception:
            log.exception("MQTT broker synchronisation failed")

    async def _flush_pending(self) -> None:
        assert self._dynsec is not None
        for device_id, creds in list(self._pending.items()):
            await self._put(device_id, *creds)

    async def _put(self, device_id: str, account: str, local_id: str, token: str) -> None:
        assert self._dynsec is not None
        parsed = tokens.parse(token)
        if parsed is None:
            raise ValueError(f"not a device token for {device_id}")
        await self._dynsec.put_device(device_id, account, local_id, token, parsed[1])
        if self._pending.get(device_id, (None, None, None))[2] == token:
            del self._pending[device_id]

    async def _retry_pending(self) -> None:
        while True:
            await asyncio.sleep(RETRY_PENDING_S)
            if self._pending and self._control_up.is_set():
                try:
                    async with self._sync_lock:
                        await self._flush_pending()
                except Exception as exc:
                    log.warning("MQTT credentials still not delivered: %s", exc)

    async def _db_states(self, device_ids: list[str]) -> dict[str, dynsec.DeviceState]:
        async with self.app[POOL].connection() as conn:
            cur = await conn.execute(
                "SELECT d.id, d.deleted_at IS NOT NULL,"
                " (SELECT t.key_id FROM tokens t WHERE t.device_id = d.id AND t.kind = 'ds_live'"
                "   AND t.revoked_at IS NULL ORDER BY t.created_at DESC LIMIT 1)"
                " FROM devices d WHERE d.id = ANY(%s)",
                (device_ids,),
            )
            return {r[0]: dynsec.DeviceState(r[1], r[2]) for r in await cur.fetchall()}

    async def _reconcile(self) -> None:
        """Make the broker's device clients agree with the database, as far as that is
        possible without plaintext: delete what is deleted, disable a revoked or stale
        password, enable a client whose password is the live token."""
        assert self._dynsec is not None
        clients = [
            c
            for c in await self._dynsec.list_clients()
            if c.get("textname") == dynsec.DEVICE_TEXTNAME
        ]
        names = [str(c["username"]) for c in clients]
        states = await self._db_states(names)
        actions: dict[str, str] = {}
        for c in clients:
            if c["username"] in self._pending:
                continue
            act = dynsec.decide(c, states.get(c["username"]))
            if act is not None:
                actions[str(c["username"])] = act
        if actions:
            log.info("MQTT broker reconciliation: %s", actions)
            await self._dynsec.apply(actions)
            # a new password that another process set meanwhile must not stay disabled
            for dev in [d for d, a in actions.items() if a == "disable"]:
                await self._converge(dev)
        async with self.app[POOL].connection() as conn:
            cur = await conn.execute(
                "SELECT d.id FROM devices d WHERE d.deleted_at IS NULL AND d.id <> ALL(%s)"
                " AND EXISTS (SELECT 1 FROM tokens t WHERE t.device_id = d.id"
                "  AND t.kind = 'ds_live' AND t.revoked_at IS NULL) ORDER BY d.id",
                (names,),
            )
            self.missing = [r[0] for r in await cur.fetchall() if r[0] not in self._pending]
        if self.missing:
            log.warning(
                "MQTT broker has no credentials for %d device(s) (created while it was unreachable,"
                " or before OPENSENSE_MQTT=external): %s%s. Rotate their tokens"
                " (POST /v1/devices/{id}/rotate-token) to let them connect; HTTP ingest works meanwhile",
                len(self.missing),
                ", ".join(self.missing[:20]),
                " …" if len(self.missing) > 20 else "",
            )

    async def _converge(self, device_id: str) -> None:
        """One device: bring the broker's client in line with the database."""
        assert self._dynsec is not None
        client = await self._dynsec.get_client(device_id)
        if client is None or client.get("textname") != dynsec.DEVICE_TEXTNAME:
            return
        state = (await self._db_states([device_id])).get(device_id)
        act = dynsec.decide(client, state)
        if act is None:
            return
        await self._dynsec.apply({device_id: act})
        if act == "disable":
            # another process may have set the new password between our read and the
            # disable: read again, and undo the disable if the password is the live one
            again = await self._dynsec.get_client(device_id)
            if again is not None and dynsec.decide(again, state) == "enable":
                await self._dynsec.set_enabled(device_id, True)

    # --- MqttSide -------------------------------------------------------------------

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> bool:
        """True once the broker has it (its PUBACK for QoS 1); 503 when it is unreachable."""
        c = self._control
        if c is None or not self._control_up.is_set():
            raise ApiError("unavailable", "the MQTT broker is not reachable; try again later")
        info = c.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise ApiError("unavailable", f"MQTT publish failed: {mqtt.error_string(info.rc)}")
        if qos > 0:
            await asyncio.to_thread(info.wait_for_publish, 5.0)
            if not info.is_published():
                raise ApiError("unavailable", "the MQTT broker did not acknowledge the publish")
        return True

    async def credentials_changed(
        self, device_id: str, account_id: str, local_id: str, token: str
    ) -> None:
        """Give the broker the new password now; if it is unreachable, keep it here and
        send it when the broker is back (never raises: the token is already issued)."""
        self._pending[device_id] = (account_id, local_id, token)
        if not self._control_up.is_set():
            log.warning(
                "MQTT broker unreachable: credentials of %s sent when it is back", device_id
            )
            return
        try:
            await self._put(device_id, account_id, local_id, token)
        except Exception as exc:
            log.warning("MQTT credentials of %s not delivered yet (%s); retrying", device_id, exc)

    async def token_revoked(self, device_id: str) -> None:
        """Every process hears it. Disable the broker's client if its password is no
        longer a live token (disabling disconnects it); a rotation's new password,
        sent by the process that rotated, kicks the old session by itself."""
        self._forget(device_id)
        if not self._control_up.is_set():
            log.warning("MQTT broker unreachable: %s is reconciled when it is back", device_id)
            return
        pending = self._pending.get(device_id)
        if pending is not None:
            with contextlib.suppress(Exception):
                await self._put(device_id, *pending)
        await self._converge(device_id)

    async def channels_changed(self, device_id: str | None) -> None:
        """The cached device is read again at its next message."""
        if device_id is None:
            self._devices.clear()
        else:
            self._forget(device_id)

    async def device_deleted(self, device_id: str) -> None:
        self._pending.pop(device_id, None)
        self._forget(device_id)
        if not self._control_up.is_set():
            log.warning("MQTT broker unreachable: %s is removed when it is back", device_id)
            return
        assert self._dynsec is not None
        async with self.app[POOL].connection() as conn:
            cur = await conn.execute(
                "SELECT account_id, local_id FROM devices WHERE id = %s", (device_id,)
            )
            row = await cur.fetchone()
        try:
            await self._dynsec.remove_device(device_id)
        except dynsec.DynSecError as exc:
            log.warning("MQTT credentials of %s not removed yet (%s)", device_id, exc)
            return
        if row is not None:
            # forget its retained state, so nothing shows a gone device as online
            for sub in (topics.LWT, topics.INFO):
                self._publish_nowait(topics.topic(row[0], row[1], sub), b"", retain=True)


class _PahoLoop:
    """paho's network loop on the asyncio event loop, for one client, in place of
    `loop_start`'s thread. paho's external-loop API (its examples/loop_asyncio.py):
    the socket's readability calls `loop_read`, its writability (watched only while
    paho has something to send) `loop_write`, and a task calls `loop_misc` every
    second (keepalive PINGREQ, a broker gone silent). `reconnect` (TCP connect, TLS
    handshake: blocking) runs in a worker thread; the callbacks it makes are passed to
    the loop. A lost connection is made again as `loop_start` did with the delays
    this server set (1 s doubling to 30 s, back to 1 s after a CONNACK), and a failed
    attempt calls `on_connect_fail`."""

    MIN_DELAY_S = 1.0
    MAX_DELAY_S = 30.0

    def __init__(self, client: mqtt.Client, loop: asyncio.AbstractEventLoop) -> None:
        self.client = client
        self.loop = loop
        self._thread = threading.get_ident()  # the loop's (made on it)
        self._fd: int | None = None
        self._closed = asyncio.Event()  # the socket was closed (set) or is open
        self._kick = asyncio.Event()  # wakes `_run`: the socket closed, or stop()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        client.on_socket_open = self._opened
        client.on_socket_close = self._closing
        client.on_socket_register_write = self._want_write
        client.on_socket_unregister_write = self._wrote

    def start(self) -> None:
        self._task = self.loop.create_task(self._run())

    async def stop(self) -> None:
        """The task ended (a connect under way in its thread finishes first), then
        DISCONNECT sent when connected and the socket closed."""
        self._stopping = True
        self._kick.set()
        if self._task is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(15.0):
                    await asyncio.shield(self._task)
            await aio.cancel(self._task)
        if self.client.socket() is not None:
            self.client.disconnect()  # written by loop_write; paho closes after it
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await self._closed.wait()
        if self.client.socket() is not None:  # it did not go: close it here
            self.client._sock_close()  # (paho has no public way)

    def _on_loop(self, fn: Any, *args: Any) -> None:
        if threading.get_ident() == self._thread:
            fn(*args)
        elif not self.loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                self.loop.call_soon_threadsafe(fn, *args)

    # paho's socket callbacks (on the loop, or from `reconnect` in its thread)

    def _opened(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._on_loop(self._watch, sock)

    def _watch(self, sock: Any) -> None:
        fd = sock.fileno() if sock is not None else -1
        if fd < 0 or self.client.socket() is not sock:
            return  # closed before the loop got to it
        self._fd = fd
        self._closed.clear()
        self.loop.add_reader(self._fd, self._readable)

    def _closing(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        # paho closes the socket right after this: on the loop, unwatch it first
        self._on_loop(self._unwatch)

    def _unwatch(self) -> None:
        if self._fd is not None:
            self.loop.remove_reader(self._fd)
            self.loop.remove_writer(self._fd)
            self._fd = None
        self._closed.set()
        self._kick.set()

    def _want_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._on_loop(self._watch_write, sock)

    def _watch_write(self, sock: Any, again: bool = True) -> None:
        if self.client.socket() is not sock:
            return
        if self._fd is not None:
            self.loop.add_writer(self._fd, self.client.loop_write)
        elif again:  # opened in `reconnect`'s thread, `_watch` still on its way to the loop
            self.loop.call_soon(self._watch_write, sock, False)

    def _wrote(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._on_loop(self._unwatch_write)

    def _unwatch_write(self) -> None:
        if self._fd is not None:
            self.loop.remove_writer(self._fd)

    def _readable(self) -> None:
        c = self.client
        rc = c.loop_read()
        # TLS: what the socket gave may hold more records than paho read; the loop
        # would not say "readable" for those (they left the kernel already)
        while rc == mqtt.MQTT_ERR_SUCCESS:
            sock = c.socket()
            if not isinstance(sock, ssl.SSLSocket) or not sock.pending():
                break
            rc = c.loop_read()

    async def _run(self) -> None:
        c = self.client
        delay = self.MIN_DELAY_S
        while not self._stopping:
            self._closed.clear()
            try:
                await asyncio.to_thread(c.reconnect)
            except Exception:
                # a socket it opened before failing (CONNECT not sent) is closed here,
                # on the loop, so it is unwatched before its descriptor can be reused
                if c.socket() is not None:
                    c._sock_close()
                if self._stopping:
                    break
                if c.on_connect_fail is not None:
                    c.on_connect_fail(c, None)
                await self._pause(delay)
                delay = min(self.MAX_DELAY_S, delay * 2)
                continue
            acked = False
            while c.socket() is not None and not self._stopping:
                await self._pause(1.0)
                acked = acked or c.is_connected()
                c.loop_misc()
            if self._stopping:
                break  # (stop() disconnects)
            if acked:
                delay = self.MIN_DELAY_S
            await self._pause(delay)
            delay = min(self.MAX_DELAY_S, delay * 2)

    async def _pause(self, seconds: float) -> None:
        """`seconds`, or less when the socket closed or stop() was called."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._kick.wait()
        self._kick.clear()
