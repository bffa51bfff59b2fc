"""OPENSENSE_WORKERS=2: `opensense serve` as a supervisor of two real worker processes
on one HTTP port (SO_REUSEPORT), worker 0 leading (embedded broker, jobs, rule
engine). docs/scaling.md, "Several workers on one port"."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import psycopg
import pytest

from opensense.serving import APP_NAME, EXTRA_CONNECTIONS
from opensense.settings import Config
from opensense.workers import HEADER, worker_config
from opensense_contract import topics

from .fixtures.clock import FakeClock
from .fixtures.processes import BIN, free_port, opensense_env
from .fixtures.server import count_rows, make_world, test_config
from .mqtt_node import Node
from .test_mqtt_mosquitto import Stream

pytestmark = [pytest.mark.db, pytest.mark.e2e]


class Workers:
    """`opensense serve` with OPENSENSE_WORKERS=2, the embedded broker and the jobs on."""

    def __init__(self, dsn: str, state: Path, **extra: str) -> None:
        self.port, self.mqtt_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ca = str(state / "mqtt-tls" / "ca.pem")
        self.log = state / "serve.log"
        settings = {
            "OPENSENSE_WORKERS": "2",
            "OPENSENSE_JOBS": "true",
            "OPENSENSE_MQTT": "embedded",
            "OPENSENSE_MQTT_PORT": str(self.mqtt_port),
            "OPENSENSE_STATE_DIR": str(state),
            "OPENSENSE_STATUS_INTERVAL_S": "1",
            "OPENSENSE_INGEST_RATE_PER_MIN": "100000",
        }
        env = opensense_env(dsn, **{**settings, **extra})
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [str(BIN), "serve", "--port", str(self.port)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    async def answer(self, http: aiohttp.ClientSession) -> tuple[int, int] | None:
        """(index, pid) of the worker that answered a request on a new connection."""
        try:
            async with http.get(self.url + "/healthz") as r:
                index, pid = r.headers[HEADER].split()
                return int(index), int(pid)
        except aiohttp.ClientError:
            return None

    async def pids(self, within: float = 60, not_leader: int | None = None) -> dict[int, int]:
        """index -> pid of both workers, once both have answered on the shared port
        (and, with not_leader, once worker 0 is a process other than that pid)."""
        seen: dict[int, int] = {}
        deadline = time.monotonic() + within
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
            while time.monotonic() < deadline:
                assert self.proc.poll() is None, self.text()
                got = await self.answer(http)
                if got is not None and (got[0] != 0 or got[1] != not_leader):
                    seen[got[0]] = got[1]
                if set(seen) == {0, 1}:
                    return seen
                await asyncio.sleep(0.02)
        raise AssertionError(f"workers seen: {seen}\n{self.text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture
def workers(dsn: str, tmp_path: Path) -> Iterator[Workers]:
    os.chmod(tmp_path, 0o755)
    w = Workers(dsn, tmp_path)
    yield w
    try:
        left = psutil.Process(w.proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        left = []
    w.stop()
    for child in left:  # nothing left behind, even after a failed test
        if child.is_running():
            child.kill()


def listening(pid: int, port: int) -> bool:
    p = psutil.Process(pid)
    conns = p.net_connections("tcp") if hasattr(p, "net_connections") else p.connections("tcp")
    return any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in conns)


async def health_of(dsn: str, pid: int) -> dict[str, Any]:
    """The health a worker last published in its status heartbeat (status_processes)."""
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT health FROM status_processes WHERE process LIKE %s ORDER BY seen_at DESC",
            (f"%:{pid}:%",),
        )
        row = await cur.fetchone()
        return dict(row[0]) if row else {}


async def until(check: Any, within: float = 15) -> None:
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.1)


def reading(value: float, ts: datetime) -> bytes:
    from opensense.api.jsonutil import rfc3339

    m = {"type": "temperature", "value": value, "ts": rfc3339(ts)}
    return json.dumps({"measurements": [m]}).encode()


def test_only_the_leader_runs_the_singletons() -> None:
    cfg = Config(jobs_enabled=True, alarms_enabled=True)
    assert worker_config(cfg, 0) == cfg
    other = worker_config(cfg, 1)
    assert (other.jobs_enabled, other.alarms_enabled) == (False, False)


async def test_two_workers_share_the_port_and_the_leader_is_replaced(dsn, workers):
    world = await make_world(
        dsn, test_config(FakeClock(datetime.now(UTC))), ("fridge01", "fridge02")
    )
    pids = await workers.pids()
    leader, other = pids[0], pids[1]
    assert leader != other and workers.proc.pid not in pids.values()
    # both listen on the HTTP port (SO_REUSEPORT); only the leader on the MQTT port
    assert listening(leader, workers.port) and listening(other, workers.port)
    assert listening(leader, workers.mqtt_port) and not listening(other, workers.mqtt_port)

    # HTTP ingest through both workers: every reading stored once
    t0 = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    answered: list[int] = []
    h = world.dev_auth("fridge01")
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
        for i in range(40):
            body = {
                "device": "fridge01",
                "measurements": [
                    {
                        "type": "temperature",
                        "value": 4.0,
                        "ts": (t0 + timedelta(seconds=i)).isoformat(),
                    }
                ],
            }
            for _ in range(2):  # each reading twice: the second is a duplicate
                async with http.post(workers.url + "/v1/ingest", json=body, headers=h) as r:
                    assert r.status == 200, await r.text()
                    answered.append(int(r.headers[HEADER].split()[0]))
    assert set(answered) == {0, 1}, answered
    assert await count_rows(dsn, world.account) == 40

    # the leader alone runs the broker and the rule engine (status heartbeats), and jobs
    async def leader_reports() -> bool:
        hl = await health_of(dsn, leader)
        return "rule_engine" in hl and "mqtt" in hl

    await until(leader_reports)
    ho = await health_of(dsn, other)
    assert ho is not None and "rule_engine" not in ho and "mqtt" not in ho, ho
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute("SELECT count(*) FROM jobs WHERE last_run_at IS NOT NULL")
        ran = await cur.fetchone()
    assert ran is not None and ran[0] > 0

    # MQTT ingest through the leader's broker, and a command sent by the other worker
    # reaches the node through the leader (the relay)
    def node() -> Node:
        n = Node(
            "localhost",
            workers.mqtt_port,
            world.device_ids["fridge02"],
            world.devices["fridge02"],
            ca_file=workers.ca,
        )
        assert str(n.connect()) == "Success"
        return n

    topic = topics.topic(world.account, "fridge02")
    n = await asyncio.to_thread(node)
    assert await asyncio.to_thread(n.subscribe, topics.topic(world.account, "fridge02", "cmd/#"))
    assert await asyncio.to_thread(n.publish, topic, reading(5.0, t0))
    assert await count_rows(dsn, world.account) == 41
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
        url = f"{workers.url}/v1/devices/{world.device_ids['fridge02']}/identify"
        for _ in range(100):
            async with http.post(url, headers=world.auth) as r:
                assert r.status == 202, await r.text()
                if r.headers[HEADER].split()[0] == "1":
                    break
        else:
            raise AssertionError("worker 1 never answered")
    got = await asyncio.to_thread(n.next_message, 10)
    assert got is not None and got[0].endswith("/cmd/identify"), got
    await asyncio.to_thread(n.close)

    # SIGKILL the leader: the other worker goes on answering, a new leader starts
    # with the broker, and MQTT ingest resumes
    os.kill(leader, signal.SIGKILL)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
        assert await workers.answer(http) is not None
    pids = await workers.pids(not_leader=leader)
    assert pids[1] == other and pids[0] != leader
    assert not psutil.pid_exists(leader) or psutil.Process(leader).status() == "zombie"

    async def mqtt_up() -> bool:
        return listening(pids[0], workers.mqtt_port)

    await until(mqtt_up)
    n = await asyncio.to_thread(node)
    assert await asyncio.to_thread(n.publish, topic, reading(6.0, t0 + timedelta(seconds=1)))
    await asyncio.to_thread(n.close)
    assert await count_rows(dsn, world.account) == 42
    assert "leader 0 (pid" in workers.text() and "starting it again" in workers.text()

    # SIGTERM to the supervisor stops every worker, and the port is free again
    workers.proc.terminate()
    assert workers.proc.wait(30) == 0, workers.text()
    for pid in pids.values():
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
    with socket.socket() as s:  # nobody listens on it (closed connections may linger)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", workers.port))


def test_a_port_held_by_another_process_stops_the_start(dsn, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = subprocess.run(
            [str(BIN), "serve", "--port", str(port)],
            env=opensense_env(dsn, OPENSENSE_WORKERS="2", OPENSENSE_STATE_DIR=str(tmp_path)),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert proc.returncode == 2, proc.stderr
    assert "SO_REUSEPORT" in proc.stderr


def test_more_connections_than_postgresql_allows_stops_the_start(dsn, tmp_path):
    """Workers whose pools could outgrow max_connections are refused at the start (a
    pool waiting for a connection that never comes, a listener that cannot LISTEN),
    with the settings to change."""
    proc = subprocess.run(
        [str(BIN), "serve", "--port", str(free_port())],
        env=opensense_env(
            dsn, OPENSENSE_WORKERS="3", OPENSENSE_POOL_MAX="40", OPENSENSE_STATE_DIR=str(tmp_path)
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    budget = 3 * (40 + EXTRA_CONNECTIONS)
    assert f"= {budget} connections, but PostgreSQL allows" in proc.stderr
    assert "OPENSENSE_POOL_MAX" in proc.stderr and "max_connections" in proc.stderr


def test_the_docs_give_the_budget_s_own_connections() -> None:
    """docs/scaling.md and OPENSENSE_POOL_MAX's help say what the start's check counts."""
    root = Path(__file__).resolve().parents[1]
    scaling = " ".join((root / "docs" / "scaling.md").read_text().split())
    assert f"N × (`OPENSENSE_POOL_MAX` + {EXTRA_CONNECTIONS})" in scaling
    settings = (root / "docs" / "settings.md").read_text()
    assert f"OPENSENSE_WORKERS x (this + {EXTRA_CONNECTIONS})" in settings


async def test_each_worker_holds_the_connections_the_budget_counts(dsn, tmp_path):
    """The start's check (opensense.serving.check_connection_budget) counts a process's
    pool and EXTRA_CONNECTIONS of its own: on running workers, each worker's
    connections (named by worker in pg_stat_activity) are its pool and its listeners,
    and the leader's are all of EXTRA_CONNECTIONS but the partitions job's, which it
    holds only while the job runs."""
    os.chmod(tmp_path, 0o755)
    w = Workers(dsn, tmp_path, OPENSENSE_POOL_MIN="3", OPENSENSE_POOL_MAX="3")
    try:
        await w.pids()
        counts: dict[str, int] = {}
        steady = 0
        deadline = time.monotonic() + 30
        while steady < 10 and time.monotonic() < deadline:  # listeners connect as they start
            async with await psycopg.AsyncConnection.connect(dsn) as conn:
                cur = await conn.execute(
                    "SELECT application_name, count(*) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND application_name LIKE %s"
                    " GROUP BY 1",
                    (APP_NAME + " w%",),
                )
                now = {str(name): int(n) for name, n in await cur.fetchall()}
            steady = steady + 1 if now == counts else 0
            counts = now
            await asyncio.sleep(0.2)
        leader, other = counts[f"{APP_NAME} w0"], counts[f"{APP_NAME} w1"]
        assert leader == 3 + EXTRA_CONNECTIONS - 1, counts
        assert other <= 3 + EXTRA_CONNECTIONS, counts
    finally:
        w.stop()


async def test_workers_stop_when_the_supervisor_is_killed(dsn, workers):
    """A SIGKILLed supervisor runs no stop: its workers notice and stop themselves."""
    pids = await workers.pids()
    workers.proc.kill()
    workers.proc.wait(10)

    async def gone() -> bool:
        return not any(
            psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
            for p in pids.values()
        )

    await until(gone)
    assert "is gone: stopping" in workers.text()


@pytest.mark.parametrize("consumer", ["single", "shared"])
async def test_workers_consume_from_mosquitto_once(dsn, clock, mosquitto, tmp_path, consumer):
    """With an external broker every worker keeps its control connection; the readings
    of a stream are stored exactly once while worker 1 is SIGKILLed and started again.
    consumer=single: one consumer among the workers (the advisory lock); shared: one
    session per worker, each under its own client id."""
    os.chmod(tmp_path, 0o755)
    (tmp_path / "server").mkdir()
    url = mosquitto.url + ("?consumer=shared" if consumer == "shared" else "")
    w = Workers(dsn, tmp_path / "server", OPENSENSE_MQTT="external", OPENSENSE_MQTT_URL=url)
    try:
        pids = await w.pids()
        stream = await Stream.make(dsn, clock, mosquitto, w.url, 4)
        now = datetime.now(UTC).replace(microsecond=0)
        await stream.phase(
            now - timedelta(hours=3), 600, 300.0, lambda: os.kill(pids[1], signal.SIGKILL)
        )
        stream.close()
        await w.pids(not_leader=None)  # worker 1 is back
        log = w.text()
        assert "worker 1 (pid" in log and "starting it again" in log
        if consumer == "shared":
            me = f"opensense-{socket.gethostname()}-{w.port}"
            for i in (0, 1):
                assert f"MQTT consumer {me}-w{i} connected" in log, log
        else:
            assert log.count("MQTT consumer opensense-consumer runs in this process") >= 1
    finally:
        w.stop()
