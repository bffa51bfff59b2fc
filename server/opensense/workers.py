"""Several server processes on one port (OPENSENSE_WORKERS > 1, docs/scaling.md):
what each worker runs. The supervisor that starts them is opensense/supervisor.py.

`opensense serve` becomes a supervisor: it starts the embedded PostgreSQL if there is
one, then OPENSENSE_WORKERS worker processes, each an ordinary server process that
binds the HTTP port with SO_REUSEPORT (aiohttp's `run_app(reuse_port=True)`), so the
kernel spreads new connections over them. The supervisor serves nothing itself.

Worker 0 is the leader: the only one that runs what must run once per host or is
cheaper once:
- the embedded MQTT broker (it binds the MQTT port); the other workers hand their
  broker calls (commands to nodes, a deleted device's session) to it through
  NOTIFY opensense_mqtt_relay;
- the scheduled jobs (each run is claimed in the database anyway; one scheduler is
  enough and keeps backups and compaction off the other workers' cores);
- the rule engine and the sender (they claim their work with SKIP LOCKED, so several
  would be correct, but every commit's NOTIFY would wake all of them to fight over
  the same rows; one keeps the single-process behaviour the alarm tests cover).

Which worker leads is decided by the supervisor, not by a lock: a leader that dies is
started again at once as worker 0 (after the old one is gone, so two brokers never
race for the port). Leadership therefore never moves inside a living process, and the
broker, scheduler and rule engine start and stop through the same app contexts as in
a single process. The price is the leader's start time (about a second or two) of
no MQTT, jobs and rule engine after it dies; its nodes reconnect and resend what was
not acknowledged, and the rule engine catches up from the dirty rows.

An external broker's consumer is not tied to the leader: every worker keeps its own
control connection (dynamic security, commands), and the consumer is already elected
by its PostgreSQL advisory lock (consumer=single) or runs in every worker under its
own client id (consumer=shared) (mqtt/external.py).

A worker that dies is started again, at once the first time, then after 1, 2, 4 … 30 s
while it keeps dying within 10 s of its start. SIGTERM, SIGINT or SIGHUP to the
supervisor stops every worker (SIGTERM, then SIGKILL after the stop budget); a worker
whose supervisor is gone stops itself.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .mqtt.side import NoMqtt

if TYPE_CHECKING:
    from psycopg_pool import AsyncConnectionPool

    from .settings import Config

log = logging.getLogger("opensense.workers")

HEADER = "X-OpenSense-Worker"  # "<index> <pid>" of the worker that answered
RELAY_CHANNEL = "opensense_mqtt_relay"
RELAY_MAX_BYTES = 6000  # NOTIFY payloads end at 8000 bytes; commands are a few bytes
ORPHAN_POLL_S = 1.0


@dataclass(frozen=True)
class Worker:
    index: int
    count: int
    parent_pid: int

    @property
    def leader(self) -> bool:
        return self.index == 0


WORKER = web.AppKey("worker", Worker)


def is_leader(app: web.Application) -> bool:
    """True in the leader and in a single server process (no workers)."""
    w = app.get(WORKER)
    return w is None or w.leader


def worker_config(cfg: Config, index: int) -> Config:
    """A worker's settings: the leader keeps everything; the others run no jobs and no
    rule engine (the embedded broker is decided in mqtt/ctx.py by `is_leader`)."""
    if index == 0:
        return cfg
    return cfg.replace(jobs_enabled=False, alarms_enabled=False)


# --- in a worker ---------------------------------------------------------------------


def setup(app: web.Application, worker: Worker) -> None:
    """Name the answering worker on every response and stop when the supervisor is
    gone (the relay of broker calls is the mqtt feature's: mqtt/__init__.py)."""
    app[WORKER] = worker
    value = f"{worker.index} {os.getpid()}"

    async def name_worker(request: web.Request, response: web.StreamResponse) -> None:
        response.headers[HEADER] = value

    app.on_response_prepare.append(name_worker)
    app.cleanup_ctx.append(_orphan_ctx)


async def _orphan_ctx(app: web.Application) -> AsyncIterator[None]:
    import asyncio

    from . import aio

    parent = app[WORKER].parent_pid

    async def watch() -> None:
        while True:
            await asyncio.sleep(ORPHAN_POLL_S)
            if os.getppid() != parent:
                break
        log.error("the supervisor (pid %d) is gone: stopping", parent)
        os.kill(os.getpid(), signal.SIGTERM)  # aiohttp's graceful stop

    task = asyncio.create_task(watch())
    yield
    await aio.cancel(task)


class LeaderRelay(NoMqtt):
    """The MQTT side of a worker that is not the leader, with the embedded broker: the
    broker lives in the leader, so what has to reach it goes there by NOTIFY.
    Token revocations and channel changes need nothing here (the leader hears the
    database's own NOTIFYs) and nor do credentials (the embedded broker checks each
    CONNECT in the database): NoMqtt's nothing-to-do for those."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self.pool = pool

    async def _send(self, note: dict[str, Any]) -> bool:
        payload = json.dumps(note, separators=(",", ":"))
        if len(payload) > RELAY_MAX_BYTES:
            log.error("MQTT call too large to hand to the leader (%d bytes)", len(payload))
            return False
        try:
            async with self.pool.connection() as conn:
                await conn.execute("SELECT pg_notify(%s, %s)", (RELAY_CHANNEL, payload))
        except Exception:
            log.exception("handing an MQTT call to the leader failed")
            return False
        return True

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> bool:
        data = base64.b64encode(payload).decode()
        note = {"op": "publish", "topic": topic, "payload": data, "qos": qos, "retain": retain}
        return await self._send(note)

    async def device_deleted(self, device_id: str) -> None:
        await self._send({"op": "device_deleted", "device_id": device_id})


async def relay_ctx(app: web.Application) -> AsyncIterator[None]:
    """In the leader with the embedded broker: carry out the relayed calls. Only the
    server's own database role can NOTIFY; each note is still checked and bounded."""
    import asyncio

    from . import aio
    from .api.keys import DSN, MQTT

    async def on_note(payload: str | None) -> None:
        if payload is None:
            return
        try:
            note = json.loads(payload)
            op = note["op"]
            if op == "publish":
                body = base64.b64decode(note["payload"], validate=True)
                qos = int(note["qos"])
                if qos not in (0, 1, 2) or not isinstance(note["topic"], str):
                    raise ValueError("bad qos or topic")
                await app[MQTT].publish(
                    note["topic"], body, qos=qos, retain=bool(note.get("retain"))
                )
            elif op == "device_deleted":
                await app[MQTT].device_deleted(str(note["device_id"]))
            else:
                raise ValueError(f"unknown op {op!r}")
        except (ValueError, KeyError, TypeError, binascii.Error) as exc:
            log.error("refused a relayed MQTT call: %r", exc)

    task = asyncio.create_task(aio.listen(app[DSN], RELAY_CHANNEL, on_note, "MQTT relay"))
    yield
    await aio.cancel(task)
