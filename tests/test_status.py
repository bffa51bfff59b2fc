"""The status page, self-watching, incidents, incident mail and /metrics against a
real PostgreSQL (a fresh database per test: status tables are server-wide) and a
real SMTP server (aiosmtpd). Time is the injected clock; the monitor's background
loop is paused and each test drives `tick()`."""

from __future__ import annotations

import asyncio
import json
import re
from datetime import timedelta
from email import message_from_bytes
from typing import Any

import psycopg
import pytest
from aiohttp.test_utils import TestClient
from aiosmtpd.controller import Controller
from prometheus_client.parser import text_string_to_metric_families
from psycopg_pool import AsyncConnectionPool

from opensense.api.keys import OBSERVER, POOL, STATUS
from opensense.app import create_app
from opensense.settings import Config
from opensense.status import mail
from opensense.status.health import Health
from opensense.status.monitor import StatusMonitor
from opensense.status.observe import Observer

from .fixtures.clock import FakeClock
from .fixtures.contracts import create_contract_tables
from .fixtures.database import owner_of
from .fixtures.processes import free_port
from .fixtures.server import make_world, test_config

pytestmark = pytest.mark.db

OP = "op-secret"
OP_AUTH = {"Authorization": f"Bearer {OP}"}


class Inbox:
    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], Any]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(
            (envelope.mail_from, list(envelope.rcpt_tos), message_from_bytes(envelope.content))
        )
        return "250 OK"


@pytest.fixture
def smtp():
    inbox = Inbox()
    ctl = Controller(inbox, hostname="127.0.0.1", port=free_port())
    ctl.start()
    yield ctl, inbox
    ctl.stop()


@pytest.fixture
def fresh(new_database) -> str:
    return new_database()


def cfg_for(clock: FakeClock, **over: Any) -> Config:
    base: dict[str, Any] = dict(operator_token=OP, status_interval_s=10)
    base.update(over)
    return test_config(clock, **base)


async def start(aiohttp_client: Any, dsn: str, cfg: Config) -> TestClient:  # type: ignore[type-arg]
    client = await aiohttp_client(create_app(cfg, dsn))
    await client.app[STATUS].pause()
    return client


async def public(client: TestClient) -> dict[str, Any]:  # type: ignore[type-arg]
    r = await client.get("/status.json")
    assert r.status == 200
    return await r.json()


def comp(snap: dict[str, Any], cid: str) -> dict[str, Any]:
    return next(c for c in snap["components"] if c["id"] == cid)


async def sql(dsn: str, query: str, *args: Any) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(query, args or None)
        return await cur.fetchall() if cur.description else []


# --- the page ----------------------------------------------------------------------------


async def test_status_page_without_the_other_features_tables(aiohttp_client, fresh, clock):
    # every migration made these tables: move them aside (as the schema's owner) so the
    # page really meets a schema without them, as a server whose feature is not built does
    owners = {
        "dispatch_telegram": "outbound_log",
        "dispatch_email": "outbound_log",
        "dispatch_webhook": "outbound_log",
        "backups": "backup_runs",
        "gateways": "gateways",
    }
    for table in sorted(set(owners.values())):
        await sql(owner_of(fresh), f"ALTER TABLE {table} RENAME TO {table}_aside")
    client = await start(aiohttp_client, fresh, cfg_for(clock))
    await client.app[STATUS].tick()
    snap = await public(client)
    ids = [c["id"] for c in snap["components"]]
    assert ids[:3] == ["ingest_http", "mqtt", "database"]
    for cid, table in owners.items():
        (present,) = (await sql(fresh, "SELECT to_regclass(%s) IS NOT NULL", table))[0]
        assert not present, table
        # a feature whose table this schema lacks is unknown, not down
        assert comp(snap, cid)["state"] == "unknown", (cid, comp(snap, cid))
    assert comp(snap, "database")["state"] == "operational"
    assert comp(snap, "api")["state"] == "operational"
    # not built yet: not on the page at all (tests/test_attack_hygiene.py shows the
    # switch a feature uses to put them there); reports are built (issue 18)
    assert "dashboard" not in ids and "reports" in ids
    assert all(len(c["days"]) == 90 for c in snap["components"])
    today = comp(snap, "database")["days"][-1]
    assert today["day"] == clock.now.date().isoformat() and today["state"] == "operational"
    assert snap["stale"] is False
    r = await client.get("/status")
    assert r.status == 200 and r.content_type == "text/html"
    html = await r.text()
    assert "<script" not in html  # readable without JavaScript
    assert "Database" in html and "Alarm dispatch: telegram" in html
    assert html.count('title="') >= 90 * len(snap["components"])


async def test_ingest_answers_feed_the_figures(aiohttp_client, fresh, clock):
    cfg = cfg_for(clock)
    client = await start(aiohttp_client, fresh, cfg)
    world = await make_world(fresh, cfg)
    for _ in range(3):
        r = await client.post(
            "/v1/ingest",
            json={"device": "fridge01", "measurements": [{"type": "temperature", "value": 4}]},
            headers=world.dev_auth("fridge01"),
        )
        assert r.status == 200
        clock.advance(seconds=1)
    r = await client.post("/v1/ingest", data=b"{", headers=world.dev_auth("fridge01"))
    assert r.status == 400
    await client.get("/v1/account", headers=world.auth)  # not ingest: not counted
    mon = client.app[STATUS]
    assert sum(m.requests for m in client.app[OBSERVER].minutes.values()) == 4
    await mon.tick()
    assert mon.snapshot.figures["ingest"]["requests_2m"] == 4
    assert mon.snapshot.figures["ingest"]["errors_5xx_2m"] == 0
    text = (await (await client.get("/metrics")).read()).decode()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    counts = {
        s.labels["status_class"]: s.value
        for s in fams["opensense_ingest_requests"].samples
        if s.name.endswith("_total")
    }
    assert counts == {"2xx": 3.0, "4xx": 1.0}
    hist = fams["opensense_ingest_latency_seconds"]
    assert [s.value for s in hist.samples if s.name.endswith("_count")] == [4.0]
    state = {
        (s.labels["component"], s.labels["state"]): s.value
        for s in fams["opensense_component_state"].samples
    }
    assert state[("database", "operational")] == 1.0 and state[("database", "outage")] == 0.0


async def test_ingest_5xx_for_five_minutes_opens_one_p1(aiohttp_client, fresh, clock):
    client = await start(aiohttp_client, fresh, cfg_for(clock))
    mon = client.app[STATUS]
    obs = client.app[OBSERVER]
    for minute in range(7):
        for _ in range(20):
            obs.ingest(clock(), 503, 0.01)
        await mon.tick()
        opened = await sql(fresh, "SELECT class, condition, title FROM incidents")
        if minute < 5:
            assert opened == [], minute
        clock.advance(minutes=1)
    assert opened == [("P1", "ingest_5xx", "Ingest is answering 5xx")]
    snap = await public(client)
    assert comp(snap, "ingest_http")["state"] == "outage"
    assert snap["overall"] == "major_outage"
    (inc,) = snap["incidents"]
    assert inc["class"] == "P1" and inc["updates"][0]["body"].startswith("Opened automatically")


async def test_dispatch_path_failing_opens_p1_for_affected_accounts_only(
    aiohttp_client, fresh, clock
):
    create_contract_tables(fresh)
    cfg = cfg_for(clock)
    client = await start(aiohttp_client, fresh, cfg)
    hit = await make_world(fresh, cfg)
    calm = await make_world(fresh, cfg)
    now = clock()
    rows = [(calm.account, "telegram", "ok", now - timedelta(minutes=20))]
    rows += [
        (hit.account, "telegram", "failed", now - timedelta(minutes=m))
        for m in (7, 6, 5, 4, 3, 2, 1)
    ]
    rows += [(calm.account, "email", "ok", now - timedelta(minutes=1))]
    for acc, path, status, at in rows:
        await sql(
            fresh,
            "INSERT INTO outbound_log (account_id, path, target, kind, status, code, error, at)"
            " VALUES (%s, %s, 'https://hooks.secret.example/abc', 'alarm_opened', %s, 502,"
            " 'Bad Gateway from chat 12345', %s)",
            acc,
            path,
            status,
            at,
        )
    clock.advance(seconds=10)  # the next tick (the start's tick claimed the current one)
    await client.app[STATUS].tick()
    snap = await public(client)
    assert comp(snap, "dispatch_telegram")["state"] == "outage"
    assert comp(snap, "dispatch_email")["state"] == "operational"
    (row,) = await sql(fresh, "SELECT class, condition, affected_accounts FROM incidents")
    assert row == ("P1", "dispatch_failing:telegram", [hit.account])
    # public: no account, e-mail, target or error text of any tenant
    blob = json.dumps(snap) + await (await client.get("/status")).text()
    for secret in (hit.account, calm.account, "t@example.invalid", "hooks.secret", "12345"):
        assert secret not in blob, secret
    # the next tick does not open a second incident for the same condition
    clock.advance(seconds=30)
    await client.app[STATUS].tick()
    assert len(await sql(fresh, "SELECT 1 FROM incidents")) == 1
    # the operator sees the raw figures, error text included
    r = await client.get("/v1/status/internal", headers=OP_AUTH)
    body = await r.json()
    assert body["figures"]["dispatch"]["telegram"]["last_error"] == "Bad Gateway from chat 12345"


async def test_backups_and_gateways_from_their_tables(aiohttp_client, fresh, clock):
    create_contract_tables(fresh)
    # backups are configured here (a recipient to encrypt to): late ones are degraded
    cfg = cfg_for(clock, backup_recipients="age1placeholder")
    client = await start(aiohttp_client, fresh, cfg)
    w1 = await make_world(fresh, cfg)
    w2 = await make_world(fresh, cfg)
    now = clock()
    await sql(
        fresh,
        "INSERT INTO backup_runs (kind, started_at, finished_at, ok) VALUES"
        " ('hourly', %s, %s, true), ('hourly', %s, %s, false)",
        now - timedelta(hours=3),
        now - timedelta(hours=3) + timedelta(minutes=1),
        now - timedelta(minutes=30),
        now - timedelta(minutes=29),
    )
    await sql(
        fresh,
        "INSERT INTO gateways (id, account_id, site_id, name, last_seen_at, health) VALUES"
        " ('gw_a', %s, %s, 'Kitchen gateway', %s, '{\"queue_depth\": 0}'),"
        " ('gw_b', %s, %s, 'Cellar gateway', %s, '{}')",
        w1.account,
        w1.site,
        now - timedelta(minutes=1),
        w2.account,
        w2.site,
        now - timedelta(hours=1),
    )
    mon = client.app[STATUS]
    clock.advance(seconds=10)
    await mon.tick()
    snap = await public(client)
    assert comp(snap, "backups")["state"] == "degraded"
    assert comp(snap, "gateways") == {
        **comp(snap, "gateways"),
        "state": "degraded",
        "detail": "1 of 2 reporting",
    }
    (inc,) = await sql(fresh, "SELECT class, condition FROM incidents")
    assert inc == ("P2", "backup_old")
    blob = json.dumps(snap)
    assert "gw_a" not in blob and "Kitchen" not in blob  # gateways are per account
    r = await client.get("/v1/status/gateways", headers=w1.auth)
    assert r.status == 200
    data = (await r.json())["data"]
    assert [(g["id"], g["state"]) for g in data] == [("gw_a", "operational")]
    assert len(data[0]["days"]) == 90 and data[0]["days"][-1]["state"] == "operational"
    r = await client.get("/v1/status/gateways")
    assert r.status == 401


async def test_bars_survive_a_restart_and_processes_count_once(aiohttp_client, fresh, clock):
    a = await start(aiohttp_client, fresh, cfg_for(clock, port=18001))
    b = await start(aiohttp_client, fresh, cfg_for(clock, port=18002))
    # the first ticks at start: both processes measured, one claimed the tick
    for _ in range(3):
        a.app[OBSERVER].ingest(clock(), 200, 0.01)
    b.app[OBSERVER].ingest(clock(), 200, 0.01)
    clock.advance(seconds=10)
    await a.app[STATUS].tick()
    await b.app[STATUS].tick()
    await a.app[STATUS].tick()  # a sees b's minute from b's last publish on
    # each process contributes; every process answers the same figures
    for c in (a, b):
        assert c.app[STATUS].snapshot.figures["ingest"]["requests_2m"] == 4
        assert c.app[STATUS].snapshot.figures["processes"]["alive"] == 2
    (counted,) = await sql(
        fresh, "SELECT operational FROM status_days WHERE component = 'database'"
    )
    assert counted == (2,)  # two ticks (start and +10 s), each counted by one process
    await a.close()
    await b.close()
    assert await sql(fresh, "SELECT process FROM status_processes") == []  # signed off
    c = await start(aiohttp_client, fresh, cfg_for(clock, port=18003))
    snap = await public(c)
    today = comp(snap, "database")["days"][-1]
    assert today["state"] == "operational" and today["uptime"] == 1.0
    assert comp(snap, "database")["uptime_90d"] == 1.0


async def test_database_gone_the_page_still_answers_from_memory(fresh, clock):
    cfg = cfg_for(clock)
    pool = AsyncConnectionPool(
        fresh, min_size=1, max_size=2, open=False, kwargs={"autocommit": True}
    )
    await pool.open()
    mon = StatusMonitor(cfg, pool, Observer(), Health(clock))
    await mon.tick()
    assert mon.snapshot.public["overall"] != "unknown" and not mon.snapshot.stale
    await pool.close()
    clock.advance(seconds=10)
    await mon.tick()
    snap = json.loads(mon.snapshot.json_bytes)
    assert snap["stale"] is True
    assert comp(snap, "database")["state"] == "outage"
    assert b"could not be refreshed" in mon.snapshot.html_bytes


async def test_health_registry_reports_reach_the_page(aiohttp_client, fresh, clock):
    from opensense.status import health

    client = await start(aiohttp_client, fresh, cfg_for(clock))
    health.ok(client.app, "rule_engine")
    await client.app[STATUS].tick()
    assert comp(await public(client), "rule_engine")["state"] == "operational"
    health.fail(client.app, "rule_engine", "evaluation loop raised KeyError")
    await client.app[STATUS].tick()
    c = comp(await public(client), "rule_engine")
    assert c["state"] == "outage" and "KeyError" not in c["detail"]


# --- incidents ------------------------------------------------------------------------------


async def test_incident_workflow_with_cadence_reminders_and_mail(
    aiohttp_client, fresh, clock, smtp
):
    ctl, inbox = smtp
    cfg = cfg_for(
        clock,
        incident_smtp_url=f"smtp://127.0.0.1:{ctl.port}",
        incident_mail_from="alerts@status.example",
        incident_operator_email="ops@example.invalid",
        status_backup_max_age_h=0,  # this test follows one incident; no backup ever runs here
    )
    client = await start(aiohttp_client, fresh, cfg)
    w = await make_world(fresh, cfg)
    other = await make_world(fresh, cfg)
    await sql(
        fresh, "UPDATE accounts SET email = 'other@example.invalid' WHERE id = %s", other.account
    )

    r = await client.post("/v1/incidents", json={"class": "P1", "title": "x", "body": "y"})
    assert r.status == 401
    r = await client.post(
        "/v1/incidents",
        json={
            "class": "P1",
            "title": "Telegram delays",
            "body": "Looking into it.",
            "affected_accounts": [w.account],
            "author": "anna",
        },
        headers=OP_AUTH,
    )
    assert r.status == 201, await r.text()
    inc = await r.json()
    iid = inc["id"]
    assert inc["next_due"]["what"] == "acknowledgement"
    assert inc["class_policy"].startswith("acknowledge within 0.5 h")
    # the status page shows it first, before any mail
    snap = await public(client)
    assert [i["id"] for i in snap["incidents"]] == [iid]
    assert "anna" not in json.dumps(snap)

    # 31 minutes without acknowledgement: the monitor reminds the operator once
    clock.advance(minutes=31)
    await client.app[STATUS].tick()
    await client.app[STATUS].tick()
    reminders = await sql(
        fresh, "SELECT to_addr, subject FROM incident_mail WHERE kind = 'operator'"
    )
    assert reminders == [
        ("ops@example.invalid", "[OpenSense P1] acknowledgement due: Telegram delays")
    ]
    # still not acknowledged half an hour later: reminded again, once
    clock.advance(minutes=30)
    await client.app[STATUS].tick()
    await client.app[STATUS].tick()
    assert len(await sql(fresh, "SELECT 1 FROM incident_mail WHERE kind = 'operator'")) == 2

    r = await client.post(f"/v1/incidents/{iid}/ack", json={"author": "anna"}, headers=OP_AUTH)
    assert r.status == 200
    acked = await r.json()
    assert acked["next_due"]["what"] == "update"
    notices = await sql(fresh, "SELECT to_addr FROM incident_mail WHERE kind = 'notice'")
    assert notices == [("t@example.invalid",)]  # the affected account only

    # an hour later the update is due; "Still investigating." is a valid update
    clock.advance(minutes=61)
    await client.app[STATUS].tick()
    got = await (await client.get(f"/v1/incidents/{iid}", headers=OP_AUTH)).json()
    assert got["next_due"]["what"] == "update" and got["next_due"]["overdue"] is True
    r = await client.post(
        f"/v1/incidents/{iid}/updates", json={"body": "Still investigating."}, headers=OP_AUTH
    )
    assert r.status == 200
    got = await r.json()
    assert got["next_due"]["overdue"] is False
    assert got["updates"][-1]["body"] == "Still investigating."

    clock.advance(minutes=10)
    r = await client.post(
        f"/v1/incidents/{iid}/resolve", json={"body": "Fixed: the queue drained."}, headers=OP_AUTH
    )
    assert (await r.json())["status"] == "resolved"
    r = await client.post(f"/v1/incidents/{iid}/updates", json={"body": "more"}, headers=OP_AUTH)
    assert r.status == 409 and (await r.json())["error"]["code"] == "incident_resolved"
    # it lasted over an hour: a P1 owes a post-mortem
    got = await (await client.get(f"/v1/incidents/{iid}", headers=OP_AUTH)).json()
    assert got["next_due"]["what"] == "post-mortem"
    r = await client.put(
        f"/v1/incidents/{iid}/postmortem",
        json={"text": "The bot token was revoked by mistake."},
        headers=OP_AUTH,
    )
    assert r.status == 200 and (await r.json())["next_due"] is None
    r = await client.get("/v1/incidents/inc_nope", headers=OP_AUTH)
    assert r.status == 404 and (await r.json())["error"]["code"] == "incident_not_found"

    # the incident mailer delivers through its own SMTP path
    while await mail.send_due(client.app[POOL], cfg, mail.SmtpPath.parse(cfg.incident_smtp_url)):
        pass
    got_to = sorted((rcpt[0], m["Subject"]) for _, rcpt, m in inbox.messages)
    assert ("t@example.invalid", "[OpenSense P1] Acknowledged: Telegram delays") in got_to
    assert ("t@example.invalid", "[OpenSense P1] Resolved: Telegram delays") in got_to
    assert ("t@example.invalid", "[OpenSense P1] Post-mortem: Telegram delays") in got_to
    assert ("ops@example.invalid", "[OpenSense P1] acknowledgement due: Telegram delays") in got_to
    assert not any(rcpt[0] == "other@example.invalid" for _, rcpt, _ in inbox.messages)
    assert {frm for frm, _, _ in inbox.messages} == {"alerts@status.example"}
    assert await sql(fresh, "SELECT count(*) FROM incident_mail WHERE sent_at IS NULL") == [(0,)]
    snap = await public(client)
    assert snap["incidents"][0]["postmortem"] == "The bot token was revoked by mistake."
    assert "Post-mortem" in await (await client.get("/status")).text()


async def test_incident_mail_is_retried_until_the_smtp_server_answers(fresh, clock, smtp):
    ctl, inbox = smtp
    down_port = free_port()
    cfg = cfg_for(clock, incident_smtp_url=f"smtp://127.0.0.1:{down_port}")
    async with AsyncConnectionPool(
        fresh, min_size=1, max_size=2, open=False, kwargs={"autocommit": True}
    ) as pool:
        w = await make_world(fresh, cfg)
        async with pool.connection() as conn, conn.transaction():
            from opensense.status import incidents

            iid = await incidents.open_incident(
                conn,
                clock(),
                klass="P2",
                title="Slow reports",
                body="b",
                author="op",
                affected=[w.account],
            )
            await incidents.acknowledge(conn, iid, clock(), "op", "")
        assert await mail.send_due(pool, cfg, mail.SmtpPath.parse(cfg.incident_smtp_url)) == 0
        ((attempts, err, sent),) = await sql(
            fresh, "SELECT attempts, last_error, sent_at FROM incident_mail"
        )
        assert attempts == 1 and err and sent is None
        # nothing is due before the backoff ends; then the real server takes it
        up = mail.SmtpPath.parse(f"smtp://127.0.0.1:{ctl.port}")
        assert await mail.send_due(pool, cfg, up) == 0
        clock.advance(seconds=31)
        assert await mail.send_due(pool, cfg, up) == 1
        assert [m["Subject"] for _, _, m in inbox.messages] == [
            "[OpenSense P2] Acknowledged: Slow reports"
        ]


async def test_operator_api_is_off_without_a_token_and_metrics_token(aiohttp_client, fresh, clock):
    client = await start(
        aiohttp_client, fresh, cfg_for(clock, operator_token="", metrics_token="m")
    )
    r = await client.get("/v1/incidents", headers=OP_AUTH)
    assert r.status == 404
    assert (await client.get("/metrics")).status == 401
    r = await client.get("/metrics", headers={"Authorization": "Bearer m"})
    assert r.status == 200 and r.content_type == "text/plain"
    assert (await client.get("/status.json")).status == 200  # the page stays public


# --- the CLI watchdog ------------------------------------------------------------------------


def _cli(dsn: str, *args: str) -> tuple[int, str, str]:
    import subprocess

    from .fixtures.processes import BIN, opensense_env

    p = subprocess.run(
        [str(BIN), *args], env=opensense_env(dsn), capture_output=True, text=True, timeout=60
    )
    return p.returncode, p.stdout, p.stderr


async def test_cli_watchdog_opens_dashboard_down_and_incident_commands(fresh):
    # a server process that stopped answering 20 minutes ago
    await sql(
        fresh,
        "INSERT INTO status_processes (process, started_at, seen_at) VALUES"
        " ('web1:1:8080', now() - interval '1 day', now() - interval '20 minutes')",
    )
    code, out, err = await asyncio.to_thread(_cli, fresh, "status", "--check")
    assert code == 1, err
    assert "firing: dashboard_down (P1)" in out
    assert re.search(r"outage .* API: no server process answers", out)
    ((iid, klass),) = await sql(
        fresh, "SELECT id, class FROM incidents WHERE condition = 'dashboard_down'"
    )
    assert klass == "P1"
    code, out, err = await asyncio.to_thread(
        _cli, fresh, "incident", "update", iid, "--body", "Still investigating.", "--author", "kim"
    )
    assert code == 0, err
    shown = json.loads(out)
    assert (
        shown["acknowledged_by"] == "kim" and shown["updates"][-1]["body"] == "Still investigating."
    )
    code, out, err = await asyncio.to_thread(_cli, fresh, "incident", "resolve", iid)
    assert code == 2 and "--body" in err
    code, out, err = await asyncio.to_thread(
        _cli, fresh, "incident", "resolve", iid, "--body", "Restarted web1."
    )
    assert code == 0 and json.loads(out)["status"] == "resolved"
    code, out, _ = await asyncio.to_thread(_cli, fresh, "incident", "list", "--open")
    assert code == 0 and json.loads(out) == []


async def test_a_status_only_process_serves_the_page_and_is_not_the_dashboard(
    aiohttp_client, fresh, clock
):
    page = await start(aiohttp_client, fresh, cfg_for(clock, role="status", port=18011))
    paths = {r.resource.canonical for r in page.app.router.routes() if r.resource}
    assert "/status.json" in paths and "/v1/ingest" not in paths and "/v1/sites" not in paths
    assert (await page.post("/v1/ingest", json={})).status == 404
    clock.advance(seconds=10)
    await page.app[STATUS].tick()
    snap = await public(page)
    # only the status process is alive: the API is not being served
    assert comp(snap, "api")["state"] == "outage"
    full = await start(aiohttp_client, fresh, cfg_for(clock, port=18012))
    full.app[OBSERVER].ingest(clock(), 200, 0.01)
    clock.advance(seconds=10)
    await full.app[STATUS].tick()
    await page.app[STATUS].tick()
    snap = await public(page)
    assert comp(snap, "api")["state"] == "operational"
    # both processes' ingest answers: the 404 above and the full process's one
    assert page.app[STATUS].snapshot.figures["ingest"]["requests_2m"] == 2
    assert page.app[STATUS].snapshot.figures["processes"] == {
        **page.app[STATUS].snapshot.figures["processes"],
        "alive": 1,
        "status_only": 1,
    }


async def test_ingest_5xx_answers_are_counted_by_the_error_translator(
    aiohttp_client, fresh, clock, monkeypatch
):
    """A database failure in the ingest path leaves as 503 through the one error
    translator; the status figures count it as a 5xx ingest answer."""
    import psycopg as pg

    from opensense.ingest import pipeline

    cfg = cfg_for(clock)
    client = await start(aiohttp_client, fresh, cfg)
    world = await make_world(fresh, cfg)

    async def broken(*args: Any, **kw: Any) -> Any:
        raise pg.OperationalError("connection to the database lost")

    monkeypatch.setattr(pipeline, "store_fast", broken)
    r = await client.post(
        "/v1/ingest",
        json={"device": "fridge01", "measurements": [{"type": "temperature", "value": 4}]},
        headers=world.dev_auth("fridge01"),
    )
    assert r.status == 503 and (await r.json())["error"]["code"] == "unavailable"
    clock.advance(seconds=10)
    await client.app[STATUS].tick()
    ing = client.app[STATUS].snapshot.figures["ingest"]
    assert (ing["requests_2m"], ing["errors_5xx_2m"]) == (1, 1)
    snap = await public(client)
    assert comp(snap, "ingest_http")["state"] == "degraded"  # not yet 5 minutes
