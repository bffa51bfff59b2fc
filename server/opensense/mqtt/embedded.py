"""The embedded broker: amqtt in the server's event loop, TLS only, devices only.

Guarantee: a QoS 1 (or 2) measurement publish is acknowledged to the node only
after its rows are committed. Stock amqtt sends PUBACK as soon as a PUBLISH is read
and keeps nothing on disk, so an amqtt subscriber could lose what the broker had
already acknowledged. Here the incoming QoS 1/2 flow of amqtt's protocol handler is
wrapped: the message is stored first (opensense.mqtt.ingest), then acknowledged. If
storing fails, no PUBACK is sent and the connection is closed, so the node (which
keeps the reading on flash until PUBACK) reconnects and sends it again; the
(channel, ts) key makes the resend a duplicate, never a second row.

Authentication: username = the device's dev_ id, password = its ds_live_ token,
checked against the database at every CONNECT, before amqtt looks at any session: a
refused CONNECT (wrong token, a client id other than the token's dev_ id, a will
outside the device's own topics) gets its CONNACK refusal and the connection closed,
and no existing session is deleted, taken over or changed by it. A revoked or rotated
token closes the device's live session at once (opensense_token_revoked
notifications). ACL: a device publishes only its own measurements, lwt and info, and
subscribes only to its own cmd/# and err (opensense_contract.topics); anything else is
refused and logged with the reason. A will is held to the same publish ACL at CONNECT
and again when the broker is about to publish it.

Bounds: a packet whose fixed header announces more than MAX_PACKET_BYTES (64 KiB, as
an HTTP body) closes the connection before its body is read. Measurement publishes
count against the device's ingest rate limit (OPENSENSE_INGEST_RATE_PER_MIN, shared
with HTTP ingest); one over the limit is not acknowledged, gets a `rate_limited`
envelope on …/err and its connection closed, so the node keeps the reading and sends
it again after its backoff. The count is kept in the process and written to the
shared counter once a second for all devices (ratelimit.LocalCounter; how exact that
is: docs/mqtt.md "Bounds").

Channels: a session's device (with its channels) is read at CONNECT; a publish that
created channels (a new node's first) reads it again for the session, so the next
publishes take the group-commit writer.

TLS: TLS 1.2 or 1.3 (whichever the client offers; MicroPython's mbedtls speaks only
1.2), and no client-certificate request: devices prove who they are with their token.

Several of these reach into amqtt internals; each such place names the amqtt version
it was read against (0.12.1, pinned in pyproject.toml).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn, cast

from aiohttp import web
from amqtt.adapters import StreamReaderAdapter, StreamWriterAdapter, WriterAdapter
from amqtt.broker import Broker
from amqtt.contexts import Action, ListenerConfig
from amqtt.errors import MQTTError, NoDataError
from amqtt.mqtt.connack import BAD_USERNAME_PASSWORD, NOT_AUTHORIZED, ConnackPacket
from amqtt.mqtt.constants import QOS_1
from amqtt.mqtt.disconnect import DisconnectPacket
from amqtt.mqtt.packet import MQTTFixedHeader
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.protocol.handler import INCOMING, ProtocolHandler
from amqtt.mqtt.puback import PubackPacket
from amqtt.plugins.base import BaseAuthPlugin, BasePlugin, BaseTopicPlugin
from amqtt.session import Session

from opensense_contract import topics
from opensense_contract.payload import MAX_BODY_BYTES

from .. import aio
from ..api.keys import CONFIG, REQUEST_LOG, WRITER
from ..errors import ApiError
from ..ids import new_id
from ..ingest.pipeline import Device
from .ca import ensure_tls
from .ingest import MqttIngest

log = logging.getLogger(__name__)

STOP_STORING_S = 10.0  # how long `stop` waits for publishes being stored


def _side_of(handler: ProtocolHandler[Any]) -> EmbeddedBroker | None:
    return _side_of_plugins(handler.plugins_manager)


def _broker_of(plugins_manager: Any) -> Broker | None:
    return getattr(getattr(plugins_manager, "app_context", None), "_broker_instance", None)


def _side_of_plugins(plugins_manager: Any) -> EmbeddedBroker | None:
    return getattr(_broker_of(plugins_manager), "opensense", None)


_qos1_flow = ProtocolHandler._handle_qos1_message_flow
_qos0_flow = ProtocolHandler._handle_qos0_message_flow
_qos2_flow = ProtocolHandler._handle_qos2_message_flow


async def _store_then_ack(self: ProtocolHandler[Any], app_message: Any, original: Any) -> None:
    side = _side_of(self)
    if side is None or app_message.direction != INCOMING or self.session is None:
        await original(self, app_message)
        return
    if getattr(_broker_of(self.plugins_manager), "stopping", False):
        # read after `stop` began (a connection's reader goes on with what it had
        # buffered when it was cut): not stored, not acknowledged, the node sends it
        # again. From here to on_publish's count of publishes being stored nothing
        # yields, so `stop` either waits for this one or it is refused here.
        await self.handle_connection_closed()
        return
    if not await side.on_publish(
        self.session, app_message.topic, bytes(app_message.data), app_message.qos, self
    ):
        # not stored: no acknowledgement; closing makes the node resend after reconnecting
        await self.handle_connection_closed()
        return
    if original is _qos1_flow and _own_measurement(self.session, app_message.topic):
        # Stored: only the PUBACK is left. amqtt's flow would also queue the message for
        # its client loop (a wait on four futures, two plugin events, the topic ACL
        # again, a broadcast that _broadcast_message drops for measurements anyway):
        # about a third of a stored message's server CPU, for nothing. Nobody may subscribe to
        # a device's measurements, so none is delivered or retained.
        puback = PubackPacket.build(app_message.packet_id)
        await self._send_packet(puback)
        app_message.puback_packet = puback
        return
    await original(self, app_message)


def _own_measurement(session: Session, topic: str) -> bool:
    dev = _device(session)
    return dev is not None and topic == topics.topic(dev.account_id, dev.local_id)


async def _qos1(self: ProtocolHandler[Any], app_message: Any) -> None:
    await _store_then_ack(self, app_message, _qos1_flow)


async def _qos2(self: ProtocolHandler[Any], app_message: Any) -> None:
    # QoS 2 is handled as QoS 1 (docs/product.md#mqtt): stored before PUBREC
    await _store_then_ack(self, app_message, _qos2_flow)


async def _qos0(self: ProtocolHandler[Any], app_message: Any) -> None:
    await _store_then_ack(self, app_message, _qos0_flow)


ProtocolHandler._handle_qos1_message_flow = _qos1
ProtocolHandler._handle_qos2_message_flow = _qos2
ProtocolHandler._handle_qos0_message_flow = _qos0


# --- CONNECT: authenticate before amqtt touches a session ---------------------------
# amqtt 0.12.1 (Broker._initialize_client_session) reads the CONNECT, then at once
# deletes the session of its client id (clean session) or resumes it and copies the
# new CONNECT's will and credentials onto it (persistent session), and only later
# (Broker._handle_client_session) authenticates, taking over a connected client's
# session even for a refused CONNECT. So a wrong password could wipe a device's
# subscriptions, kick it and plant a will on its session. The CONNECT packet is read by
# BrokerProtocolHandler.init_from_connect, right before all of that: it is wrapped so
# that, on this broker, a CONNECT is authenticated and checked (EmbeddedBroker.admit)
# before init_from_connect returns; a refusal raises MQTTError, which amqtt answers by
# closing the connection without any session lookup.
_init_from_connect = BrokerProtocolHandler.init_from_connect.__func__


async def _init_from_connect_admitted(
    cls: type[BrokerProtocolHandler],
    reader: Any,
    writer: WriterAdapter,
    plugins_manager: Any,
    loop: asyncio.AbstractEventLoop | None = None,
) -> tuple[BrokerProtocolHandler, Session]:
    side = _side_of_plugins(plugins_manager)
    try:
        handler, session = await _init_from_connect(cls, reader, writer, plugins_manager, loop)
    except NoDataError:
        if side is not None:
            log.info("MQTT connection from %s closed before its CONNECT", _peer(writer))
        raise
    except PacketTooLarge:
        raise  # logged as a refusal already
    except MQTTError as exc:  # a malformed CONNECT or an MQTT version amqtt does not speak
        if side is not None:
            reason = str(exc.args[0]) if exc.args and exc.args[0] else "invalid CONNECT"
            side.refused(None, "CONNECT", _peer(writer), "invalid_request", reason)
        raise
    if side is not None:
        await side.admit(session, reader, writer)
        if session.keep_alive > 0 and isinstance(reader, _BoundedReader):
            # MQTT 3.1.1 §3.1.2.10: 1.5 x the client's keep alive without a packet and the
            # server closes the connection. Timed here (_BoundedReader.watch), not by
            # amqtt: amqtt 0.12.1 reads every packet's fixed header inside
            # asyncio.wait_for(timeout=keep_alive), a task and a timer per packet, and
            # re-arms a (no-op) write timer per packet sent, both off with keep_alive 0
            # (copied onto a resumed session; the handler reads it at attach)
            reader.watch((session.keep_alive * 3 + 1) // 2)
            session.keep_alive = 0
    return handler, session


BrokerProtocolHandler.init_from_connect = classmethod(_init_from_connect_admitted)


# --- keep alive ----------------------------------------------------------------------
# amqtt 0.12.1's BrokerProtocolHandler.handle_read_timeout does nothing: a node that lost
# power with its connection open (no FIN ever comes) stayed connected, its will never
# published, the device "online" for good. On 1.5 x keep alive of silence
# (_BoundedReader.watch) the connection is cut: amqtt's reader sees EOF and ends the
# session as a connection lost without DISCONNECT, which publishes the will. Kept for a
# read timeout of amqtt's own (a connection not read through a _BoundedReader).
def _keepalive_expired(self: BrokerProtocolHandler) -> None:
    w = self.writer
    if not isinstance(w, StreamWriterAdapter):
        return
    _cut_silent(self.session.client_id if self.session is not None else "?", w._writer)


def _cut_silent(who: str, writer: asyncio.StreamWriter) -> None:
    log.info("MQTT keep alive of %s expired: closing its connection (its will follows)", who)
    writer.transport.abort()


BrokerProtocolHandler.handle_read_timeout = _keepalive_expired


# --- packet size ---------------------------------------------------------------------
# amqtt 0.12.1 reads a packet's whole body into memory in one go, whatever length its
# fixed header announced (one 60 MB PUBLISH stalled every tenant for 48 s and took
# 3.7 GB). This broker's connections read through a _BoundedReader, and amqtt's
# fixed-header decoder (used for every packet, CONNECT included) is wrapped: on such a
# reader, a header announcing a packet of more than MAX_PACKET_BYTES ends the
# connection before a byte of the body is read. Other readers are not affected.
MAX_PACKET_BYTES = MAX_BODY_BYTES  # the whole packet, as Mosquitto's max_packet_size


class PacketTooLarge(MQTTError):
    pass


class _BoundedReader(StreamReaderAdapter):
    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, side: EmbeddedBroker
    ) -> None:
        super().__init__(reader)
        self.writer = writer
        self.side = side
        self.device: Device | None = None  # once the CONNECT was admitted
        self.cut = False
        self.seen = 0.0  # loop time of the last packet's fixed header

    def watch(self, seconds: int) -> None:
        """Cut the connection once `seconds` pass without a packet from the client (its
        keep alive x 1.5). One timer a connection, re-armed to the last packet's time
        plus `seconds` when it fires: nothing per packet but a clock read."""
        loop = asyncio.get_running_loop()
        self.seen = loop.time()

        def check() -> None:
            if self.cut or self.writer.is_closing():
                return
            idle = loop.time() - self.seen
            if idle < seconds:
                loop.call_later(seconds - idle, check)
                return
            _cut_silent(self.device.id if self.device else _peer(self.writer), self.writer)

        loop.call_later(seconds, check)

    async def read(self, n: int = -1) -> bytes:
        if self.cut:  # amqtt's read_or_raise turns this into "no more data": the end
            raise asyncio.IncompleteReadError(b"", None)
        data: bytes = await super().read(n)
        return data

    def refuse(self, size: int) -> None:
        self.cut = True
        self.writer.transport.abort()
        who = self.device.id if self.device else _peer(self.writer)
        self.side.refused(
            self.device,
            "packet",
            who,
            "payload_too_large",
            f"a packet of {size} bytes; at most {MAX_PACKET_BYTES} (connection closed)",
        )


_fixed_header_from_stream = MQTTFixedHeader.from_stream.__func__


async def _bounded_fixed_header(cls: type[MQTTFixedHeader], reader: Any) -> Any:
    header = await _fixed_header_from_stream(cls, reader)
    if header is not None and isinstance(reader, _BoundedReader):
        reader.seen = asyncio.get_running_loop().time()
        size = header.bytes_length + header.remaining_length
        if size > MAX_PACKET_BYTES:
            reader.refuse(size)
            raise PacketTooLarge(f"packet of {size} bytes refused")
    return header


MQTTFixedHeader.from_stream = classmethod(_bounded_fixed_header)


def _peer(writer: Any) -> str:
    try:
        info = writer.get_peer_info() if isinstance(writer, WriterAdapter) else None
        if info is None:
            info = writer.get_extra_info("peername")
        return f"{info[0]}:{info[1]}"
    except Exception:
        return "?"


def _socket_open(writer: asyncio.StreamWriter) -> bool:
    """Whether the connection's socket is still open (its TLS shutdown may be under
    way: `is_closing()` is then true already)."""
    try:
        sock = writer.get_extra_info("socket")
    except AttributeError:  # (asyncio's SSL transport after a reset: nothing left)
        return False
    return sock is not None and sock.fileno() != -1


class _ConnectionEndFilter(logging.Filter):
    """amqtt 0.12.1 logs a client that drops its connection before or during its CONNECT
    as an ERROR ("No data from …") plus a WARNING, and a refused CONNECT as two
    WARNINGs. This broker logs each such end as one INFO line of its own
    (EmbeddedBroker.refused, "closed before its CONNECT"), so these are dropped."""

    PREFIXES = (
        "No data from ",
        "Failed to initialize client session",
        "Invalid connection from ",
        "Error while handling client session",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            record.levelno >= logging.WARNING
            and isinstance(record.msg, str)
            and record.msg.startswith(self.PREFIXES)
        )


_CONNECTION_END_FILTER = _ConnectionEndFilter()


class OpenSenseBroker(Broker):
    opensense: EmbeddedBroker
    connections: set[asyncio.StreamWriter]
    stopping: bool = False

    async def stream_connected(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
    ) -> None:
        if self.stopping:
            # a TLS handshake that began before stop() and ended after it: asyncio
            # hands the connection over even though the listener is closed
            writer.transport.abort()
            return
        # every open connection, so that stop() can cut them all (see there). Not
        # removed when this returns: amqtt may return while the connection lives on.
        # Nor once closing: a TLS connection closed by the broker (a refused CONNECT,
        # a take-over) waits up to asyncio's 30 s TLS shutdown timeout for a peer that
        # may never answer; kept until its socket is closed, stop() cuts it too
        # (left open, it outlived the broker: tests/test_attack_broker.py)
        self.connections = {w for w in self.connections if _socket_open(w)}
        self.connections.add(writer)
        # amqtt 0.12.1's stream_connected, with the size-bounded reader. A connection
        # that ends while amqtt writes to it (a refusal's CONNACK, a close) raises out
        # of amqtt; asyncio would log that as an ERROR with a traceback.
        try:
            await self._client_connected(
                listener_name,
                _BoundedReader(reader, writer, self.opensense),
                StreamWriterAdapter(writer),
            )
        except (OSError, EOFError, MQTTError, NoDataError) as exc:
            log.info("MQTT connection from %s ended: %s", _peer(writer), exc or type(exc).__name__)

    @staticmethod
    def _create_ssl_context(listener: ListenerConfig) -> ssl.SSLContext:
        ctx = Broker._create_ssl_context(listener)
        # amqtt 0.12.1 sets CERT_OPTIONAL, so every handshake asks the client for a
        # certificate; devices prove who they are with their token, none is asked
        ctx.verify_mode = ssl.CERT_NONE
        # TLS 1.2 at least, 1.3 whenever the client offers it. Not 1.3 only: the
        # firmware's TLS (MicroPython's mbedtls) offers 1.2 alone (tests/test_attack_broker.py)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return cast(ssl.SSLContext, ctx)

    async def _handle_disconnect(
        self, client_session: Session, handler: Any, disconnect_waiter: asyncio.Future[Any]
    ) -> None:
        result = disconnect_waiter.result()
        if not isinstance(result, DisconnectPacket):
            dev = _device(client_session)
            log.info(
                "MQTT connection of %s from %s:%s ended without DISCONNECT",
                dev.id if dev else str(client_session.client_id)[:64],
                client_session.remote_address,
                client_session.remote_port,
            )
            # amqtt 0.12.1 publishes (and retains) the will here: held to the device's
            # publish ACL once more, whatever let it onto the session
            if client_session.will_flag and not self.may_publish(
                client_session, client_session.will_topic, "will"
            ):
                client_session.will_flag = False
        await super()._handle_disconnect(client_session, handler, disconnect_waiter)

    def may_publish(self, session: Session | None, topic: str | None, what: str) -> bool:
        """Whether a message from `session` (None: the server itself) may go to `topic`:
        the publish ACL of the device admitted on it (a revoked device's session keeps
        it for this, so that its own lwt will still says "offline")."""
        if session is None:
            return True
        dev = _device(session) or getattr(session, "opensense_will_device", None)
        reason = (
            "no authenticated device"
            if dev is None
            else topics.publish_refusal(dev.account_id, dev.local_id, str(topic))
        )
        if reason:
            self.opensense.refused(dev, what, str(topic)[:200], "forbidden", reason)
            return False
        return True

    async def retain_message(
        self,
        source_session: Session | None,
        topic_name: str | None,
        data: bytes | bytearray | None,
        qos: int | None = None,
    ) -> None:
        if self.may_publish(source_session, topic_name, "retained PUBLISH"):
            await super().retain_message(source_session, topic_name, data, qos)

    def cut_connections(self) -> None:
        for w in list(self.connections):
            try:
                sock = w.get_extra_info("socket")
            except AttributeError:
                # asyncio's SSL transport of a connection the peer already reset has
                # lost its protocol's internals; aborting it below is all there is to do
                sock = None
            if sock is not None:
                try:  # at the socket too: an SSL transport mid-handshake may ignore abort()
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            w.transport.abort()

    async def _broadcast_message(
        self, session: Session | None, topic: str | None, data: Any, force_qos: int | None = None
    ) -> None:
        # A device's measurements are stored before their PUBACK and no client may
        # subscribe to them, so forwarding them would only queue work in amqtt's
        # one-at-a-time broadcast loop, ahead of the commands and err replies.
        if session is not None and topic is not None and _device(session) is not None:
            t = topics.parse(topic)
            if t is not None and t.sub == "":
                return
        if not self.may_publish(session, topic, "PUBLISH"):
            return
        await super()._broadcast_message(session, topic, data, force_qos)

    def subscribed(self, session: Session, topic: str) -> bool:
        return any(
            s is session and self._matches(topic, f)
            for f, subs in self._subscriptions.items()
            for s, _ in subs
        )


def _device(session: Session | None) -> Device | None:
    return getattr(session, "opensense_device", None)


def _refresher(session: Session, dev: Device) -> Callable[[Device], None]:
    """The session's device, read at CONNECT, gets the channels a publish created
    (MqttIngest.handle), so the next publishes take the group-commit writer. Only if
    it is still the same admission: a revocation (None) or a new CONNECT (its own
    read) since wins. Two publishes creating channels at once (a gateway's nodes on
    one connection) each refresh it: a refresh replaces one of the same admission
    unless it knows fewer channels (read before the other's commit), so neither
    publish's channels are lost to the race and left to the slow path."""
    admission = getattr(session, "opensense_admission", None)

    def refreshed(fresh: Device) -> None:
        if getattr(session, "opensense_admission", None) is not admission:
            return  # a new CONNECT since: its own read wins
        for attr in ("opensense_device", "opensense_will_device"):
            current = getattr(session, attr, None)
            if current is not None and (
                current is dev or len(current.channels or {}) <= len(fresh.channels or {})
            ):
                setattr(session, attr, fresh)

    return refreshed


class DeviceAuthPlugin(BaseAuthPlugin):
    """CONNECT: username = dev_ id, password = ds_live_ token."""

    @dataclass
    class Config:
        pass

    async def authenticate(self, *, session: Session) -> bool | None:
        # the CONNECT was authenticated before amqtt looked up any session
        # (EmbeddedBroker.admit); this only says whether that happened for this one
        admitted = bool(getattr(session, "opensense_admitted", False))
        session.opensense_admitted = False
        return admitted and _device(session) is not None


class DeviceTopicPlugin(BaseTopicPlugin):
    """The device ACL of opensense_contract.topics."""

    @dataclass
    class Config:
        pass

    async def topic_filtering(
        self,
        *,
        session: Session | None = None,
        topic: str | None = None,
        action: Action | None = None,
    ) -> bool | None:
        if action == Action.RECEIVE:
            return True  # deliveries follow subscriptions, which were checked
        dev = _device(session)
        side: EmbeddedBroker = self.context._broker_instance.opensense
        if dev is None or topic is None:
            return False
        if action == Action.SUBSCRIBE:
            reason = topics.subscribe_refusal(dev.account_id, dev.local_id, topic)
            if reason:
                side.refused(dev, "SUBSCRIBE", topic, "forbidden", reason)
            return reason is None
        return topics.publish_refusal(dev.account_id, dev.local_id, topic) is None


class DeviceStatePlugin(BasePlugin[Any]):
    """A device whose connection dropped without DISCONNECT is offline: amqtt publishes
    the will itself, outside the PUBLISH flow, so its state is recorded here."""

    @dataclass
    class Config:
        pass

    async def on_broker_client_disconnected(
        self, *, client_id: str, client_session: Session
    ) -> None:
        dev = _device(client_session)
        side: EmbeddedBroker = self.context._broker_instance.opensense
        if dev is not None and client_session.will_flag and client_session.will_topic:
            t = topics.parse(client_session.will_topic)
            if (
                t is not None
                and t.sub == topics.LWT
                and (t.account, t.device) == (dev.account_id, dev.local_id)
            ):
                try:
                    await side.ingest.handle(
                        dev, t, bytes(client_session.will_message or b""), QOS_1
                    )
                except Exception:
                    log.exception("recording %s offline failed", dev.id)


PLUGINS: dict[str, dict[str, Any]] = {
    f"{__name__}.{cls.__name__}": {}
    for cls in (DeviceAuthPlugin, DeviceTopicPlugin, DeviceStatePlugin)
}


class EmbeddedBroker:
    """MqttSide for OPENSENSE_MQTT=embedded."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.ingest = MqttIngest(app)
        self.broker: OpenSenseBroker | None = None
        self.refusals = 0
        self._rate_flush: asyncio.Task[None] | None = None
        # publishes being stored: `stop` waits for them, so nothing a stopped broker
        # received is written after it returned (the writer may linger: storage/batcher.py)
        self._storing = 0
        self._stored_all = asyncio.Event()
        self._stored_all.set()

    async def start(self) -> None:
        cfg = self.app[CONFIG]
        hosts = [h.strip() for h in cfg.mqtt_hostnames.split(",") if h.strip()]
        tls = ensure_tls(cfg.state_dir, hosts)
        config = {
            "listeners": {
                "default": {
                    "type": "tcp",
                    "bind": f"{cfg.mqtt_host}:{cfg.mqtt_port}",
                    "ssl": True,
                    "certfile": str(tls.server_cert),
                    "keyfile": str(tls.server_key),
                },
            },
            "plugins": PLUGINS,
        }
        # connection ends are this module's INFO lines (see _ConnectionEndFilter);
        # amqtt's own lines per connection (and its state machine's) are noise below it
        for name in ("amqtt", "transitions"):
            if logging.getLogger(name).level == logging.NOTSET:
                logging.getLogger(name).setLevel(logging.WARNING)
        amqtt_log = logging.getLogger("amqtt.broker")
        if _CONNECTION_END_FILTER not in amqtt_log.filters:
            amqtt_log.addFilter(_CONNECTION_END_FILTER)
        broker = OpenSenseBroker(config)
        broker.opensense = self
        broker.connections = set()
        await broker.start()
        self.broker = broker
        self._rate_flush = asyncio.create_task(self.ingest.rate.run())
        log.info("embedded MQTT broker: TLS on %s:%s", cfg.mqtt_host, cfg.mqtt_port)

    async def stop(self) -> None:
        if self.broker is not None:
            # amqtt's shutdown closes the listener but can leave a client's connection
            # open and still handled (one in its TLS handshake, or one whose handler it
            # stops without closing the socket): a stopped broker refuses connections
            # that complete later and cuts every connection, before its shutdown and
            # again after it
            self.broker.stopping = True
            self.broker.cut_connections()
            for _session, handler in list(self.broker._sessions.values()):
                if handler is not None:
                    await handler.handle_connection_closed()
            await self.broker.shutdown()
            self.broker.cut_connections()
            self.broker = None
        try:
            async with asyncio.timeout(STOP_STORING_S):
                await self._stored_all.wait()
                # a cut connection cancels its handler's tasks (amqtt's reader loop), a
                # publish's among them, while its rows wait in the group-commit writer,
                # which commits them all the same: wait for those too
                writer = self.app.get(WRITER)
                if writer is not None:
                    await writer.settled()
        except TimeoutError:
            log.warning("broker stopped with %d publishes still being stored", self._storing)
        await aio.cancel(self._rate_flush)
        self._rate_flush = None
        await self.ingest.final_rate_flush()

    async def admit(self, session: Session, reader: Any, writer: WriterAdapter) -> None:
        """A CONNECT, before amqtt looks up, deletes or resumes any session: the token,
        the client id (the token's dev_ id, as Mosquitto's dynamic security pins it) and
        the will (the device's publish ACL). Refused: CONNACK with the reason, the
        connection closed, MQTTError (amqtt then drops the connection, nothing else)."""
        password = session.password
        if isinstance(password, bytes | bytearray):
            password = password.decode("utf-8", "replace")
        cid = str(session.client_id)[:64]
        try:
            dev = await self.ingest.authenticate(session.username, password)
        except ApiError as err:
            rc = NOT_AUTHORIZED if err.code == "forbidden" else BAD_USERNAME_PASSWORD
            await self._refuse_connect(writer, None, f"client {cid!r}", err.code, err.message, rc)
        if session.client_id != dev.id:
            await self._refuse_connect(
                writer,
                dev,
                f"client {cid!r}",
                "forbidden",
                f"the client id must be the device's id {dev.id}, not {cid!r}",
                NOT_AUTHORIZED,
            )
        if session.will_flag:
            reason = topics.publish_refusal(dev.account_id, dev.local_id, str(session.will_topic))
            if reason:
                await self._refuse_connect(
                    writer,
                    dev,
                    f"will on {str(session.will_topic)[:200]}",
                    "forbidden",
                    reason,
                    NOT_AUTHORIZED,
                )
        session.opensense_device = dev
        session.opensense_will_device = dev
        session.opensense_admitted = True
        session.opensense_admission = object()  # what a publish's channel refresh belongs to
        if isinstance(reader, _BoundedReader):
            reader.device = dev
        old = self.broker._sessions.get(dev.id) if self.broker is not None else None
        if old is None:
            return
        old_session, old_handler = old
        if session.clean_session:
            # amqtt 0.12.1 drops the old session from its table but leaves its
            # connection running, unreachable by a revocation: close it (MQTT-3.1.4-2),
            # without its will, since the device is back
            old_session.will_flag = False
            if old_handler is not None:
                await old_handler.handle_connection_closed()
        else:
            # amqtt 0.12.1 resumes it, copying the new CONNECT's will, keep-alive and
            # credentials onto it; not will_retain, nor who the device is
            old_session.opensense_device = old_session.opensense_will_device = dev
            old_session.opensense_admitted = True
            old_session.opensense_admission = session.opensense_admission
            old_session.will_retain = session.will_retain

    async def _refuse_connect(
        self,
        writer: WriterAdapter,
        dev: Device | None,
        target: str,
        code: str,
        reason: str,
        rc: int,
    ) -> NoReturn:
        self.refused(dev, "CONNECT", target, code, reason)
        try:
            await ConnackPacket.build(0, rc).to_stream(writer)
            await writer.close()
        except OSError:
            pass  # the client is gone already
        raise MQTTError(f"CONNECT refused: {reason}")

    async def on_publish(
        self, session: Session, topic: str, data: bytes, qos: int, handler: ProtocolHandler[Any]
    ) -> bool:
        """Called before acknowledging a device's PUBLISH. False: not stored (no
        acknowledgement, the connection is closed)."""
        dev = _device(session)
        if dev is None:
            return False
        reason = topics.publish_refusal(dev.account_id, dev.local_id, topic)
        if reason:
            self.refused(dev, "PUBLISH", topic, "forbidden", reason)
            return True  # acknowledged and dropped: the broker's ACL stops it too
        t = topics.parse(topic)
        assert t is not None
        err_topic = topics.topic(dev.account_id, dev.local_id, topics.ERR)
        try:
            if t.sub == "":
                limited = await self.ingest.over_rate(dev, t)
                if limited is not None:
                    # not acknowledged: the node keeps the reading and sends it again
                    # after its backoff. The envelope goes straight to this connection,
                    # which is closed right after (a broadcast would come too late)
                    if self.broker is not None and self.broker.subscribed(session, err_topic):
                        await handler.mqtt_publish(
                            err_topic, json.dumps(limited).encode(), 0, False
                        )
                    return False
            self._storing += 1
            self._stored_all.clear()
            try:
                env = await self.ingest.handle(dev, t, data, qos, _refresher(session, dev))
            finally:
                self._storing -= 1
                if self._storing == 0:
                    self._stored_all.set()
        except Exception:
            log.exception("storing a publish of %s on %s failed; not acknowledged", dev.id, topic)
            return False
        if env is not None:
            if self.broker is not None and self.broker.subscribed(session, err_topic):
                # on this connection, before the PUBACK: the node learns which batch was
                # refused (it then sends its records one by one, firmware/sense/node.py)
                await handler.mqtt_publish(err_topic, json.dumps(env).encode(), 0, False)
            else:
                await self.publish(err_topic, json.dumps(env).encode())
        return True

    def refused(self, dev: Device | None, what: str, target: str, code: str, reason: str) -> None:
        self.refusals += 1
        log.info("MQTT %s %s refused: %s", what, target, reason)
        reqlog = self.app.get(REQUEST_LOG)
        if reqlog is not None:
            reqlog.add(
                self.app[CONFIG].clock(),
                new_id("req"),
                f"MQTT {what}",
                target,
                403 if dev else 401,
                code,
                reason,
                dev.account_id if dev else None,
                dev.id if dev else None,
                0.0,
            )

    # --- MqttSide ------------------------------------------------------------------

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> bool:
        if self.broker is None:
            return False
        if retain:
            await self.broker.retain_message(None, topic, payload, qos)
        await self.broker.internal_message_broadcast(topic, payload, qos)
        return True

    async def credentials_changed(
        self, device_id: str, account_id: str, local_id: str, token: str
    ) -> None:
        return None  # every CONNECT is checked against the database

    async def token_revoked(self, device_id: str) -> None:
        await self._close_sessions(device_id)

    async def device_deleted(self, device_id: str) -> None:
        await self._close_sessions(device_id)

    async def channels_changed(self, device_id: str | None) -> None:
        """A session keeps the device (and its channels' offsets) read at CONNECT: the
        sessions of `device_id` (None: every session) read it again."""
        if self.broker is None:
            return
        for session, _ in list(self.broker._sessions.values()):
            dev = _device(session)
            if dev is None or (device_id is not None and dev.id != device_id):
                continue
            try:
                fresh = await self.ingest.device_by_id(dev.id)
            except Exception:
                log.exception("reading %s's changed channels for its MQTT session failed", dev.id)
                continue
            if fresh is not None:
                _refresher(session, dev)(fresh)

    async def _close_sessions(self, device_id: str) -> None:
        if self.broker is None:
            return
        for session, handler in list(self.broker._sessions.values()):
            dev = _device(session)
            if dev is not None and dev.id == device_id and handler is not None:
                log.info("closing the MQTT session of %s: its token was revoked", device_id)
                await handler.handle_connection_closed()
                session.opensense_device = None
