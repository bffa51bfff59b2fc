"""A paho-mqtt client that behaves like a node: TLS with the CA verified, QoS 1,
its token as password. Blocking; async tests call it through asyncio.to_thread."""

from __future__ import annotations

import queue
import ssl
import threading
from typing import Any

import paho.mqtt.client as mqtt


class Node:
    def __init__(
        self,
        host: str,
        port: int,
        username: str,
        password: str,
        *,
        ca_file: str | None,
        client_id: str | None = None,
        clean: bool = True,
        will: tuple[str, bytes] | None = None,
        tls: bool = True,
    ) -> None:
        self.host, self.port = host, port
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id or username,
            clean_session=clean,
        )
        self.client.username_pw_set(username, password)
        if tls:
            # CERT_REQUIRED with the CA and the host name checked, as the firmware does
            self.client.tls_set(ca_certs=ca_file, cert_reqs=ssl.CERT_REQUIRED)
        if will:
            self.client.will_set(will[0], will[1], qos=1, retain=True)
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.connack: Any = None
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = lambda c, u, m: self.messages.put((m.topic, m.payload))

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        self.connack = rc
        self.connected.set()
        self.disconnected.clear()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        self.disconnected.set()

    def connect(self, timeout: float = 10, keepalive: int = 30) -> Any:
        """The CONNACK reason code (0 / "Success" when accepted), or None with no CONNACK."""
        self.client.connect(self.host, self.port, keepalive=keepalive)
        self.client.loop_start()
        self.connected.wait(timeout)
        return self.connack

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, timeout: float = 10) -> bool:
        """True once the broker acknowledged it (PUBACK for QoS 1)."""
        info = self.client.publish(topic, payload, qos=qos)
        info.wait_for_publish(timeout)
        return info.is_published()

    def subscribe(self, topic_filter: str, timeout: float = 10) -> list[Any]:
        done = threading.Event()
        granted: list[Any] = []

        def on_subscribe(client: Any, userdata: Any, mid: Any, codes: Any, props: Any) -> None:
            granted.extend(codes)
            done.set()

        self.client.on_subscribe = on_subscribe
        self.client.subscribe(topic_filter, qos=1)
        done.wait(timeout)
        return granted

    def next_message(self, timeout: float = 10) -> tuple[str, bytes] | None:
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
