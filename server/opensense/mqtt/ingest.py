"""What a message on a device topic does, whichever broker carried it.

Measurements go through the same validation, deduplication, channel creation and
error envelope as HTTP ingest (opensense.ingest). `handle` returns the envelope to
publish on …/err for a refused payload (also kept in the request log), or None.
An exception means the message was not stored: the caller must not acknowledge it
(no PUBACK on the embedded broker, no ack to Mosquitto) so it comes again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from aiohttp import web
from psycopg.types.json import Jsonb

from opensense_contract import topics

from .. import ratelimit, tokens
from ..api.keys import CONFIG, MQTT, POOL, REQUEST_LOG, VERIFIER, WRITER
from ..devices.routes import send_cadence
from ..errors import ApiError, envelope
from ..ids import new_id
from ..ingest import pipeline
from ..ingest.routes import oldest_accepted
from ..ingest.validate import parse_json, read_payload

log = logging.getLogger(__name__)

CADENCE_RESEND_S = 60.0  # a device's cadence is sent again at most this often

DEVICE_SQL = """
SELECT d.id, d.account_id, d.local_id, s.vertical,
       (SELECT coalesce(jsonb_agg(jsonb_build_array(c.kind, c.label, c.id, c.num, c.unit, c."offset")),
                        '[]'::jsonb) FROM channels c WHERE c.device_id = d.id)
FROM devices d JOIN sites s ON s.id = d.site_id
WHERE d.deleted_at IS NULL AND {where}
"""


def _device(row: Any) -> pipeline.Device:
    device_id, account_id, local_id, vertical, channels = row
    return pipeline.Device(
        device_id, account_id, local_id, vertical, pipeline.read_channels(channels)
    )


@dataclass
class Counters:
    """What the MQTT side did, for /metrics and the status page later."""

    stored: int = 0
    deduplicated: int = 0
    rejected: int = 0
    qos0_dropped: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)


class MqttIngest:
    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.counters = Counters()
        # the ingest rate limit of the publishes this process receives (over_rate);
        # a broker that counts runs its flush loop (`run_rate_flush`)
        self.rate = ratelimit.LocalCounter(app[POOL], app[CONFIG].clock)
        # device id -> when its cadence was last sent again (`_send_cadence`)
        self._cadence_sent: dict[str, float] = {}

    async def final_rate_flush(self) -> None:
        """At shutdown: what was counted since the last flush (best effort, bounded:
        a database that does not answer costs only the counts, not the shutdown)."""
        try:
            async with asyncio.timeout(5):
                await self.rate.flush()
        except Exception as exc:
            log.warning("rate counters not written at shutdown (%s)", exc)

    # --- who is this ---------------------------------------------------------------

    async def authenticate(self, username: str | None, password: str | None) -> pipeline.Device:
        """A device's CONNECT: username = its dev_ id, password = its ds_live_ token.
        Raises ApiError (token_invalid, auth_required) with the reason."""
        cfg = self.app[CONFIG]
        now = cfg.clock()
        async with self.app[POOL].connection() as conn:
            tok = await tokens.authenticate(conn, self.app[VERIFIER], password, ("ds_live",), now)
            if tok.device_id != username:
                raise ApiError(
                    "forbidden",
                    f"this token belongs to {tok.device_id}, not to {str(username)[:64]!r}",
                )
            cur = await conn.execute(DEVICE_SQL.format(where="d.id = %s"), (username,))
            dev = await cur.fetchone()
        if dev is None:
            raise ApiError("token_invalid", "the token's device was deleted")
        return _device(dev)

    async def device_for_topic(self, t: topics.DeviceTopic) -> pipeline.Device | None:
        """For an external broker, whose ACL already tied the topic to its device."""
        async with self.app[POOL].connection() as conn:
            cur = await conn.execute(
                DEVICE_SQL.format(where="d.account_id = %s AND d.local_id = %s"),
                (t.account, t.device),
            )
            row = await cur.fetchone()
        return _device(row) if row else None

    # --- what it said ---------------------------------------------------------------

    async def handle(
        self,
        dev: pipeline.Device,
        t: topics.DeviceTopic,
        payload: bytes,
        qos: int,
        refreshed: Callable[[pipeline.Device], None] | None = None,
    ) -> dict[str, Any] | None:
        """`refreshed`, if given, gets the device read again when this message created
        channels: a caller that keeps `dev` (a broker session) passes it on to the next
        messages, whose readings then take the group-commit writer (`store_fast` needs
        every channel known) instead of a transaction each."""
        now = self.app[CONFIG].clock()
        started = time.perf_counter()
        try:
            if t.sub == "":
                await self._measurements(dev, payload, qos, now, refreshed)
            elif t.sub == topics.LWT:
                await self._lwt(dev, payload, now)
            elif t.sub == topics.INFO:
                await self._info(dev, payload)
            else:
                raise ApiError("forbidden", f"a device does not publish to {t.sub!r}")
        except ApiError as err:
            self.counters.rejected += 1
            self.counters.by_reason[err.code] = self.counters.by_reason.get(err.code, 0) + 1
            rid = new_id("req")
            self._log(
                now,
                rid,
                topics.topic(t.account, t.device, t.sub),
                err.status,
                err.code,
                err.message,
                dev,
                started,
            )
            return envelope(err.code, err.message, rid)
        return None

    async def over_rate(self, dev: pipeline.Device, t: topics.DeviceTopic) -> dict[str, Any] | None:
        """Count one measurement publish against the device's ingest rate limit (the
        counter HTTP ingest uses: one allowance per device, whatever the door). Over
        it: the `rate_limited` envelope (logged); the caller must not acknowledge.

        Counted in this process (`ratelimit.LocalCounter`, no round trip), flushed to
        the shared counter every second by its `run` loop (the broker's task); a refusal flushes at once
        so that HTTP ingest sees the spent allowance before the node is told."""
        cfg = self.app[CONFIG]
        now = cfg.clock()
        started = time.perf_counter()
        try:
            self.rate.hit(
                f"ingest:{dev.id}", cfg.ingest_rate_per_min, 60, now, "ingest for this device"
            )
        except ApiError as err:
            try:
                await self.rate.flush()
            except Exception as exc:  # the refusal stands; the count goes with the next flush
                log.warning("rate counters not written yet (%s)", exc)
            self.counters.rejected += 1
            self.counters.by_reason[err.code] = self.counters.by_reason.get(err.code, 0) + 1
            rid = new_id("req")
            path = topics.topic(t.account, t.device, t.sub)
            self._log(now, rid, path, err.status, err.code, err.message, dev, started)
            return envelope(err.code, err.message, rid)
        return None

    async def _measurements(
        self,
        dev: pipeline.Device,
        payload: bytes,
        qos: int,
        now: datetime,
        refreshed: Callable[[pipeline.Device], None] | None = None,
    ) -> None:
        if qos == 0:
            self.counters.qos0_dropped += 1
            async with self.app[POOL].connection() as conn:
                await conn.execute(
                    "UPDATE devices SET qos0_dropped = qos0_dropped + 1 WHERE id = %s", (dev.id,)
                )
            raise ApiError(
                "invalid_measurement",
                "a QoS 0 measurement publish is dropped: publish measurements with QoS 1",
            )
        cfg = self.app[CONFIG]
        batch = read_payload(
            payload, now=now, oldest=oldest_accepted(cfg, now), require_device=False
        )
        if batch.device is not None and batch.device not in (dev.local_id, dev.id):
            raise ApiError(
                "forbidden", f"this topic belongs to {dev.local_id!r}, not {batch.device[:64]!r}"
            )
        answer = await pipeline.store_fast(
            self.app[POOL],
            self.app[WRITER],
            dev,
            batch.entries,
            now=now,
            compact_after_days=cfg.compact_after_days,
            listed=False,
        )
        self.counters.stored += answer["accepted"]
        self.counters.deduplicated += answer["deduplicated"]
        known = dev.channels or {}
        if refreshed is not None and any((e.kind, e.label) not in known for e in batch.entries):
            # stored: the channels exist now. A failure here costs only speed
            try:
                fresh = await self.device_by_id(dev.id)
            except Exception as exc:
                log.warning("reading %s's new channels failed (%s)", dev.id, exc)
                return
            if fresh is not None:
                refreshed(fresh)

    async def device_by_id(self, device_id: str) -> pipeline.Device | None:
        """A live device with its channels (None: deleted)."""
        async with self.app[POOL].connection() as conn:
            cur = await conn.execute(DEVICE_SQL.format(where="d.id = %s"), (device_id,))
            row = await cur.fetchone()
        return _device(row) if row else None

    async def _lwt(self, dev: pipeline.Device, payload: bytes, now: datetime) -> None:
        state = payload.decode("utf-8", "replace").strip().lower()
        if state not in ("online", "offline"):
            raise ApiError("invalid_request", "lwt must be 'online' or 'offline'")
        async with self.app[POOL].connection() as conn:
            await conn.execute(
                "UPDATE devices SET connected = %s, connected_changed_at = %s WHERE id = %s",
                (state == "online", now, dev.id),
            )

    async def _info(self, dev: pipeline.Device, payload: bytes) -> None:
        info = parse_json(payload)
        if not isinstance(info, dict):
            raise ApiError("invalid_request", "info must be a JSON object")
        fw, model = info.get("fw_version"), info.get("model")
        if fw is not None and (not isinstance(fw, str) or len(fw) > 64):
            raise ApiError(
                "invalid_request", "info.fw_version must be a string of at most 64 characters"
            )
        if model is not None and (not isinstance(model, str) or len(model) > 64):
            raise ApiError(
                "invalid_request", "info.model must be a string of at most 64 characters"
            )
        if len(json.dumps(info)) > 4096:
            raise ApiError("invalid_request", "info is larger than 4 KiB")
        async with self.app[POOL].connection() as conn:
            cur = await conn.execute(
                "UPDATE devices SET info = %s, fw_version = coalesce(%s, fw_version),"
                " model = coalesce(%s, model) WHERE id = %s RETURNING cadence_s",
                (Jsonb(info), fw, model, dev.id),
            )
            row = await cur.fetchone()
        reported = info.get("cadence")
        if row is not None and type(reported) is int and reported != row[0]:
            await self._send_cadence(dev, int(row[0]), reported)

    async def _send_cadence(self, dev: pipeline.Device, wanted: int, reported: int) -> None:
        """The node's info (sent on every connect) reports a cadence other than the
        device's: the retained cmd/cadence of a change never reached it (a broker that
        restarted and kept retained messages in memory only, a broker down at the
        PATCH, a command relayed while the leader restarted: docs/mqtt.md). The
        database's cadence is sent again, retained, as PATCH /v1/devices/{id} sends
        it; a node takes the same value twice alike. At most once a minute a device:
        the command is retained, so a node connecting again meanwhile gets it on its
        subscription, and a device repeating its info cannot flood the broker."""
        now = time.monotonic()
        if now - self._cadence_sent.get(dev.id, -CADENCE_RESEND_S) < CADENCE_RESEND_S:
            return
        if len(self._cadence_sent) >= 10_000:  # bounded: forget the ones past the minute
            self._cadence_sent = {
                k: t for k, t in self._cadence_sent.items() if now - t < CADENCE_RESEND_S
            }
        self._cadence_sent[dev.id] = now
        log.info(
            "device %s reports cadence %d s, the device's is %d s: cmd/cadence sent again",
            dev.id,
            reported,
            wanted,
        )
        await send_cadence(self.app[MQTT], dev.id, dev.account_id, dev.local_id, wanted)

    def _log(
        self,
        now: datetime,
        rid: str,
        path: str,
        status: int,
        code: str | None,
        reason: str | None,
        dev: pipeline.Device,
        started: float,
    ) -> None:
        reqlog = self.app.get(REQUEST_LOG)
        if reqlog is not None:
            reqlog.add(
                now,
                rid,
                "MQTT",
                path,
                status,
                code,
                reason,
                dev.account_id,
                dev.id,
                (time.perf_counter() - started) * 1000,
            )
