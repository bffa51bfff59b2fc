"""What the rest of the server asks of the MQTT side, whichever broker it is."""

from __future__ import annotations

from typing import Protocol


class MqttSide(Protocol):
    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> bool:
        """Publish as the server (commands, error envelopes). False: there is no broker."""

    async def credentials_changed(
        self, device_id: str, account_id: str, local_id: str, token: str
    ) -> None:
        """A device got a new ingest token (create, rotate). Brokers that keep their own
        credentials (Mosquitto dynamic security) need the plaintext now: it is never stored."""

    async def token_revoked(self, device_id: str) -> None:
        """A device's token was revoked (rotate, delete): refuse it and close its live
        session at once. Called in every server process (LISTEN opensense_token_revoked)."""

    async def device_deleted(self, device_id: str) -> None:
        """The device is gone: remove whatever the broker keeps for it."""

    async def channels_changed(self, device_id: str | None) -> None:
        """A device's channels changed (a calibration offset): whatever the broker side
        keeps of them (a session's device, a cache) is read again, so the next reading
        gets the offset in force. None: any device's may have (a listener that was
        away). Called in every server process (LISTEN opensense_channels_changed)."""


class NoMqtt:
    """OPENSENSE_MQTT=off: commands cannot be delivered."""

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> bool:
        return False

    async def credentials_changed(
        self, device_id: str, account_id: str, local_id: str, token: str
    ) -> None:
        return None

    async def token_revoked(self, device_id: str) -> None:
        return None

    async def device_deleted(self, device_id: str) -> None:
        return None

    async def channels_changed(self, device_id: str | None) -> None:
        return None
