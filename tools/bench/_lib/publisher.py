"""What the benches' paho publishers share (`mqtt_worker.py`, `fleet_worker.py`): one
client publishing QoS 1 messages and timing each from its publish to its PUBACK.
Standard library and paho only: the workers run as scripts and import it."""

from __future__ import annotations

import threading
import time
from typing import Any


class Publisher:
    """One paho client with at most `inflight` messages in flight and none queued
    beyond; a subclass sets the credentials and TLS, counts a message in `sent` and
    `sending` before it calls `_publish`, and says what a PUBACK counts for (`_acked`)."""

    def __init__(self, client_id: str, topic: str, inflight: int, **options: Any) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.client_id = client_id
        self.topic = topic
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, **options)
        self.c.max_inflight_messages_set(inflight)
        self.c.max_queued_messages_set(0)  # beyond the in-flight window paho queues
        self.connected = threading.Event()
        self.refusal = ""
        # never held while calling into paho (paho holds its own lock around on_publish)
        self.lock = threading.Lock()
        self.sent_at: dict[int, float] = {}
        self.early: dict[int, float] = {}  # PUBACKs that came before publish() returned
        self.sending = 0  # in publish() right now
        self.sent = 0
        self.acked = 0
        self.c.on_connect = self._on_connect
        self.c.on_publish = self._on_publish

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if rc.is_failure:
            self.refusal = str(rc)
        else:
            self.connected.set()

    def connect(self, host: str, port: int) -> None:
        self.c.connect(host, port, keepalive=60)
        self.c.loop_start()

    def outstanding(self) -> int:
        """Published (or being published) and not yet acknowledged."""
        with self.lock:
            return len(self.sent_at) + self.sending

    def _publish(self, data: bytes) -> None:
        """Publish a message the caller has counted in `sending` (this takes it out);
        its PUBACK goes to `_acked` with the publish time, whichever comes first."""
        t = time.monotonic()
        info = self.c.publish(self.topic, data, qos=1)
        with self.lock:
            self.sending -= 1
            acked_at = self.early.pop(info.mid, None)
            if acked_at is None:
                self.sent_at[info.mid] = t
        if acked_at is not None:
            self._acked(t, acked_at)

    def _on_publish(self, client: Any, userdata: Any, mid: int, rc: Any, props: Any) -> None:
        now = time.monotonic()
        with self.lock:
            t = self.sent_at.pop(mid, None)
            if t is None:
                self.early[mid] = now
                return
        self._acked(t, now)

    def _acked(self, sent: float, now: float) -> None:
        """A message published at `sent` was acknowledged at `now` (monotonic)."""
        raise NotImplementedError

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()
