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
checked against the database at every CONNECT. A revoked or rotated token closes the
device's live session at once (opensense_token_revoked notifications). ACL: a
device publishes only its own measurements, lwt and info, and subscribes only to
its own cmd/# and err (opensense.mqtt.topics); anything else is refused and logged
with the reason.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.mqtt.constants import QOS_1
from amqtt.mqtt.protocol.handler import INCOMING, ProtocolHandler
from amqtt.plugins.base import BaseAuthPlugin, BasePlugin, BaseTopicPlugin
from amqtt.session import Session

from ..api.keys import CONFIG, REQUEST_LOG
from ..errors import ApiError
from ..ids import new_id
from ..ingest.pipeline import Device
from . import topics
from .ca import ensure_tls
from .ingest import MqttIngest

log = logging.getLogger(__name__)


def _side_of(handler: ProtocolHandler[Any]) -> EmbeddedBroker | None:
    broker = getattr(
        getattr(handler.plugins_manager, "app_context", None), "_broker_instance", None
    )
    return getattr(broker, "opensense", None)


_qos1_flow = ProtocolHandler._handle_qos1_message_flow
_qos0_flow = ProtocolHandler._handle_qos0_message_flow
_qos2_flow = ProtocolHandler._handle_qos2_message_flow


async def _store_then_ack(self: ProtocolHandler[Any], app_message: Any, original: Any) -> None:
    side = _side_of(self)
    if side is None or app_message.direction != INCOMING or self.session is None:
        return await original(self, app_message)
    if not await side.on_publish(
        self.session, app_message.topic, bytes(app_message.data), app_message.qos
    ):
        # not stored: no acknowledgement; closing makes the node resend after reconnecting
        await self.handle_connection_closed()
        return None
    return await original(self, app_message)


async def _qos1(self: ProtocolHandler[Any], app_message: Any) -> None:
    await _store_then_ack(self, app_message, _qos1_flow)


async def _qos2(self: ProtocolHandler[Any], app_message: Any) -> None:
    # QoS 2 is handled as QoS 1 (PRODUCT.md): stored before PUBREC
    await _store_then_ack(self, app_message, _qos2_flow)


async def _qos0(self: ProtocolHandler[Any], app_message: Any) -> None:
    await _store_then_ack(self, app_message, _qos0_flow)


ProtocolHandler._handle_qos1_message_flow = _qos1
ProtocolHandler._handle_qos2_message_flow = _qos2
ProtocolHandler._handle_qos0_message_flow = _qos0


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
        # removed when this returns: amqtt may return while the connection lives on
        self.connections = {w for w in self.connections if not w.is_closing()}
        self.connections.add(writer)
        await super().stream_connected(reader, writer, listener_name)

    def cut_connections(self) -> None:
        for w in list(self.connections):
            sock = w.get_extra_info("socket")
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
        await super()._broadcast_message(session, topic, data, force_qos)


def _device(session: Session | None) -> Device | None:
    return getattr(session, "opensense_device", None)


class DeviceAuthPlugin(BaseAuthPlugin):
    """CONNECT: username = dev_ id, password = ds_live_ token."""

    @dataclass
    class Config:
        pass

    async def authenticate(self, *, session: Session) -> bool | None:
        side: EmbeddedBroker = self.context._broker_instance.opensense
        password = session.password
        if isinstance(password, bytes | bytearray):
            password = password.decode("utf-8", "replace")
        try:
            dev = await side.ingest.authenticate(session.username, password)
        except ApiError as err:
            side.refused(
                None, "CONNECT", f"client {str(session.client_id)[:64]!r}", err.code, err.message
            )
            return False
        session.opensense_device = dev
        return True


class DeviceTopicPlugin(BaseTopicPlugin):
    """The device ACL of opensense.mqtt.topics."""

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
                and t.sub == "lwt"
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
        broker = OpenSenseBroker(config)
        broker.opensense = self
        broker.connections = set()
        await broker.start()
        self.broker = broker
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

    async def on_publish(self, session: Session, topic: str, data: bytes, qos: int) -> bool:
        """Called before acknowledging a device's PUBLISH. False: not stored."""
        dev = _device(session)
        if dev is None:
            return False
        reason = topics.publish_refusal(dev.account_id, dev.local_id, topic)
        if reason:
            self.refused(dev, "PUBLISH", topic, "forbidden", reason)
            return True  # acknowledged and dropped: the broker's ACL stops it too
        t = topics.parse(topic)
        assert t is not None
        try:
            env = await self.ingest.handle(dev, t, data, qos)
        except Exception:
            log.exception("storing a publish of %s on %s failed; not acknowledged", dev.id, topic)
            return False
        if env is not None:
            await self.publish(
                topics.topic(dev.account_id, dev.local_id, "err"), json.dumps(env).encode()
            )
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

    async def _close_sessions(self, device_id: str) -> None:
        if self.broker is None:
            return
        for session, handler in list(self.broker._sessions.values()):
            dev = _device(session)
            if dev is not None and dev.id == device_id and handler is not None:
                log.info("closing the MQTT session of %s: its token was revoked", device_id)
                await handler.handle_connection_closed()
                session.opensense_device = None
