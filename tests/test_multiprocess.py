"""Several server processes on one database share everything that matters:
token revocation, rate limits, and scheduled jobs run once."""

from __future__ import annotations

import asyncio
import subprocess
import time
from datetime import UTC, datetime, timedelta

import aiohttp
import pytest
from psycopg_pool import AsyncConnectionPool

from opensense import jobs
from opensense.settings import Config

from .fixtures.clock import FakeClock
from .fixtures.processes import BIN, opensense_env
from .fixtures.server import make_world, test_config

# several server processes against one database: once, on the embedded PostgreSQL
pytestmark = [pytest.mark.db, pytest.mark.e2e]


def body() -> dict:
    return {"device": "fridge01", "measurements": [{"type": "temperature", "value": 4.0}]}


async def test_rotation_is_seen_by_every_process_at_once(dsn, server_processes):
    a, b = server_processes(), server_processes()
    world = await make_world(dsn, test_config(FakeClock(datetime.now(UTC))))
    old = {"Authorization": f"Bearer {world.devices['fridge01']}"}
    async with aiohttp.ClientSession() as http:
        for s in (a, b):  # both processes have verified (and cached) the old token
            async with http.post(s.url + "/v1/ingest", json=body(), headers=old) as r:
                assert r.status == 200
        async with http.post(
            f"{a.url}/v1/devices/{world.device_ids['fridge01']}/rotate-token", headers=world.auth
        ) as r:
            new = {"Authorization": f"Bearer {(await r.json())['ingest_token']}"}
        async with http.post(b.url + "/v1/ingest", json=body(), headers=old) as r:
            assert r.status == 401
        async with http.post(b.url + "/v1/ingest", json=body(), headers=new) as r:
            assert r.status == 200


async def test_rate_limit_is_counted_across_processes(dsn, server_processes):
    a, b = (
        server_processes(OPENSENSE_INGEST_RATE_PER_MIN="10"),
        server_processes(OPENSENSE_INGEST_RATE_PER_MIN="10"),
    )
    world = await make_world(dsn, test_config(FakeClock(datetime.now(UTC))))
    if datetime.now(UTC).second > 45:  # keep the burst inside one minute window
        await asyncio.sleep(61 - datetime.now(UTC).second)
    h = world.dev_auth("fridge01")
    statuses = []
    async with aiohttp.ClientSession() as http:
        for i in range(12):
            s = (a, b)[i % 2]
            async with http.post(s.url + "/v1/ingest", json=body(), headers=h) as r:
                statuses.append(r.status)
    assert statuses == [200] * 10 + [429, 429]


async def test_each_job_run_happens_once_with_many_schedulers(dsn):
    clock = FakeClock(datetime.now(UTC))
    cfg = Config(clock=clock, jobs_enabled=True)
    kw = {"autocommit": True, "options": "-c timezone=UTC"}
    ran: list[str] = []

    async def count(conn, cfg_, now):  # type: ignore[no-untyped-def]
        ran.append("x")
        await asyncio.sleep(0.05)
        return "counted"

    job = (jobs.Job(f"test_once_{time.time_ns()}", jobs.JOBS[0].every, count, "test"),)
    pools = [
        AsyncConnectionPool(dsn, min_size=1, max_size=2, kwargs=kw, open=False) for _ in range(4)
    ]
    for p in pools:
        await p.open()
    try:
        await asyncio.gather(*(jobs.run_due(p, cfg, job) for p in pools))
        assert len(ran) == 1
        await asyncio.gather(*(jobs.run_due(p, cfg, job) for p in pools))
        assert len(ran) == 1  # not due again yet
        clock.advance(hours=7)
        await asyncio.gather(*(jobs.run_due(p, cfg, job) for p in pools))
        assert len(ran) == 2
    finally:
        for p in pools:
            await p.close()


def test_serve_refuses_an_unmigrated_database(new_database):
    fresh = new_database(migrated=False)
    r = subprocess.run(
        [str(BIN), "serve", "--port", "0"],
        env=opensense_env(fresh),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert "opensense db migrate" in r.stderr
    r = subprocess.run(
        [str(BIN), "db", "status"], env=opensense_env(fresh), capture_output=True, text=True
    )
    assert r.returncode == 1 and "pending" in r.stdout
    r = subprocess.run(
        [str(BIN), "db", "migrate"], env=opensense_env(fresh), capture_output=True, text=True
    )
    assert r.returncode == 0 and "0001_init.sql, 0002_events_reports.sql" in r.stdout
    r = subprocess.run(
        [str(BIN), "db", "status"], env=opensense_env(fresh), capture_output=True, text=True
    )
    assert r.returncode == 0 and "up to date" in r.stdout


def test_cli_account_site_device_token(new_database):
    import json

    dsn = new_database()

    def run(*args: str) -> dict | list:
        r = subprocess.run(
            [str(BIN), *args], env=opensense_env(dsn), capture_output=True, text=True, timeout=60
        )
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)  # type: ignore[no-any-return]

    acc = run("account", "create", "--name", "Café", "--email", "owner@example.invalid")
    assert acc["api_token"].startswith("ua_live_")
    site = run(
        "site",
        "create",
        "--account",
        acc["account_id"],
        "--name",
        "Main",
        "--timezone",
        "Europe/Paris",
    )
    dev = run(
        "device",
        "create",
        "--account",
        acc["account_id"],
        "--site",
        site["id"],
        "--local-id",
        "fridge01",
    )
    assert dev["ingest_token"].startswith("ds_live_")
    rot = run("device", "rotate-token", "fridge01", "--account", acc["account_id"])
    assert rot["ingest_token"] != dev["ingest_token"]
    site2 = run("site", "create", "--account", acc["account_id"], "--name", "Second")
    moved = run("device", "move", "fridge01", "--account", acc["account_id"], "--site", site2["id"])
    assert moved["site_id"] == site2["id"]
    assert [d["local_id"] for d in run("device", "list", "--account", acc["account_id"])] == [
        "fridge01"
    ]
    tok = run("token", "create", "--account", acc["account_id"], "--kind", "whk", "--name", "ttn")
    assert tok["token"].startswith("whk_")
    run("token", "revoke", tok["id"], "--account", acc["account_id"])
    run("device", "delete", "fridge01", "--account", acc["account_id"])
    assert run("device", "list", "--account", acc["account_id"]) == []


async def test_sigkill_mid_stream_loses_nothing_and_duplicates_nothing(dsn, server_processes):
    """A client that follows docs/product.md#client-retry-rule (retry until a 200) against a
    server that is SIGKILLed twice mid-stream: every reading ends up stored once."""
    import random

    from opensense.api.jsonutil import rfc3339

    srv = server_processes(OPENSENSE_INGEST_RATE_PER_MIN="100000")
    world = await make_world(dsn, test_config(FakeClock(datetime.now(UTC))), ("n1", "n2", "n3"))
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=20)
    batches = []
    for dev in ("n1", "n2", "n3"):
        for b in range(25):  # 3 devices x 25 batches x 32 = 2400 readings
            ms = [
                {
                    "type": "temperature",
                    "value": round(random.uniform(2, 6), 2),
                    "ts": rfc3339(start + timedelta(minutes=b * 32 + i)),
                }
                for i in range(32)
            ]
            batches.append((dev, {"device": dev, "measurements": ms}))
    random.Random(7).shuffle(batches)
    kills = {len(batches) // 3, 2 * len(batches) // 3}
    retries = 0

    async def post_until_ok(http: aiohttp.ClientSession, dev: str, body: dict) -> None:
        nonlocal retries
        for _ in range(200):
            try:
                async with http.post(
                    srv.url + "/v1/ingest",
                    json=body,
                    headers=world.dev_auth(dev),
                    timeout=aiohttp.ClientTimeout(total=5),
                ) as r:
                    if r.status == 200:
                        return
                    assert r.status >= 500, await r.text()  # 4xx would be a bug here
            except (TimeoutError, aiohttp.ClientError):
                pass
            retries += 1
            await asyncio.sleep(0.1)
        raise AssertionError("server never came back")

    async with aiohttp.ClientSession() as http:
        sent = 0

        async def worker(queue: asyncio.Queue) -> None:
            nonlocal sent
            while not queue.empty():
                dev, body = queue.get_nowait()
                await post_until_ok(http, dev, body)
                sent += 1

        q: asyncio.Queue = asyncio.Queue()
        for item in batches:
            q.put_nowait(item)
        workers = [asyncio.create_task(worker(q)) for _ in range(8)]
        killed = 0
        while any(not w.done() for w in workers):
            if killed < len(kills) and sent >= sorted(kills)[killed]:
                srv.kill()
                await asyncio.sleep(0.3)
                await asyncio.to_thread(srv.start)
                killed += 1
            await asyncio.sleep(0.02)
        await asyncio.gather(*workers)
    assert killed == 2 and retries > 0

    import psycopg

    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM measurements m"
            " JOIN channels c ON c.num = m.channel_num WHERE c.account_id = %s",
            (world.account,),
        )
        (total,) = await cur.fetchone()  # type: ignore[misc]
    # every reading, exactly: the count proves none was lost (a count of distinct
    # (channel, ts) would add nothing: the primary key makes it equal by construction)
    assert total == 2400


def test_migrations_apply_one_by_one_and_are_recorded(new_database):
    """A database at version 1 gets only the newer migrations, each recorded."""
    import psycopg

    from opensense import db

    fresh = new_database(migrated=False)
    first = db.migration_files()[:1]
    with psycopg.connect(fresh, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        with conn.transaction():
            conn.execute(first[0][2].encode())
            conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES (1, %s)", (first[0][1],)
            )
    assert db.migrate(fresh) == [name for _, name, _ in db.migration_files()[1:]]
    with psycopg.connect(fresh) as conn:
        assert db.pending(conn) == []
        versions = [r[0] for r in conn.execute("SELECT version FROM schema_migrations ORDER BY 1")]
    assert versions == [number for number, _, _ in db.migration_files()]


def test_opensense_ca_prints_the_brokers_ca(tmp_path):
    from cryptography import x509

    env = opensense_env("", OPENSENSE_STATE_DIR=str(tmp_path))
    pem = subprocess.run([str(BIN), "ca"], env=env, capture_output=True, text=True, timeout=60)
    assert pem.returncode == 0 and pem.stdout.startswith("-----BEGIN CERTIFICATE-----")
    r = subprocess.run(
        [str(BIN), "ca", "--der", str(tmp_path / "ca.der")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0
    der = x509.load_der_x509_certificate((tmp_path / "ca.der").read_bytes())
    assert der == x509.load_pem_x509_certificate(pem.stdout.encode())  # the same CA, made once
    assert der.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
