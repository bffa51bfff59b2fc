"""The reports API (issue 18): POST /v1/reports queues, one renderer among several
claims, GET follows it to ready, …/file renders the same bytes again; a crashed
renderer's claim is retried a bounded number of times; every bad request gets the
envelope; the status page's "Report rendering" reflects real renders; the monthly
schedule queues each site's month once after it closes in the site's time zone and
emails the PDF.

A tiny month (one channel, a reading an hour) keeps each render well under a second.
The module has its own database: the schedule looks at every site in it, and a past
month of readings in the shared one would be compacted by other tests."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import io
import os
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from aiohttp.test_utils import TestClient
from psycopg_pool import AsyncConnectionPool
from pypdf import PdfReader

from opensense.api.keys import REPORTS, STATUS
from opensense.app import create_app
from opensense.devices import store as service
from opensense.reports import build, schedule
from opensense.reports import store as rstore
from opensense.reports.runner import Renderer
from opensense.settings import Config
from opensense.storage import write

from .fixtures.clock import FakeClock
from .fixtures.server import World, make_world, test_config

pytestmark = pytest.mark.db

NOV = {"from": "2026-11-01", "to": "2026-11-30"}
NOW = datetime(2026, 12, 3, 9, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def rdsn(new_database: Any) -> str:
    return str(new_database())


def cfg_for(clock: FakeClock, **over: Any) -> Config:
    return test_config(clock, report_workers=0, alarms_enabled=False, **over)


async def _world(dsn: str, cfg: Config, tz: str = "Europe/Berlin") -> World:
    """A site with one temperature channel: November 2026, a reading an hour."""
    w = await make_world(dsn, cfg, ("fridge01",))
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        async with conn.transaction():
            await conn.execute(
                "UPDATE sites SET timezone = %s, created_at = '2026-10-15' WHERE id = %s",
                (tz, w.site),
            )
            cur = await conn.execute(
                "INSERT INTO channels (id, sensor_id, account_id, device_id, kind, label, unit,"
                " name) VALUES (%s, %s, %s, %s, 'temperature', 'a', '°C', 'Kühlzelle')"
                " RETURNING num",
                (f"chn_r{w.site[-8:]}", f"snr_r{w.site[-8:]}", w.account, w.device_ids["fridge01"]),
            )
            (num,) = await cur.fetchone()  # type: ignore[misc]
            start = datetime(2026, 10, 31, 23, tzinfo=UTC)
            rows = [(num, start + timedelta(hours=k), 3.0 + (k % 5) / 10) for k in range(720)]
            await write.insert_readings(conn, rows, now=NOW, compact_after_days=400)
    w.devices["num"] = str(num)
    return w


async def _app(aiohttp_client: Any, dsn: str, cfg: Config) -> TestClient:  # type: ignore[type-arg]
    client: TestClient = await aiohttp_client(create_app(cfg, dsn))  # type: ignore[type-arg]
    await client.app[STATUS].pause()
    return client


async def _post(client: TestClient, w: World, **body: Any) -> Any:  # type: ignore[type-arg]
    r = await client.post(
        "/v1/reports", json={"site_id": w.site, "period": NOV, **body}, headers=w.auth
    )
    return r.status, await r.json()


async def _get(client: TestClient, w: World, rid: str) -> dict[str, Any]:  # type: ignore[type-arg]
    r = await client.get(f"/v1/reports/{rid}", headers=w.auth)
    assert r.status == 200, await r.text()
    return dict(await r.json())


async def test_lifecycle_ready_file_identical_twice_webhook_and_a_changed_month(
    aiohttp_client: Any, rdsn: str
) -> None:
    clock = FakeClock(NOW)
    cfg = cfg_for(clock)
    w = await _world(rdsn, cfg)
    async with await psycopg.AsyncConnection.connect(rdsn, autocommit=True) as conn:
        await conn.execute(
            "INSERT INTO notify_targets (id, account_id, path, address, secret)"
            " VALUES (%s, %s, 'webhook', 'https://hooks.example.com/x', 'whsec_t')",
            (f"tgt_r{w.site[-8:]}", w.account),
        )
    client = await _app(aiohttp_client, rdsn, cfg)
    status, rep = await _post(client, w, language="de")
    assert status == 202, rep
    assert rep["status"] == "queued" and rep["progress"] == 0 and rep["sha256"] is None
    assert rep["period"] == NOV and rep["template"] == "haccp_monthly"
    renderer: Renderer = client.app[REPORTS]
    claimed = await renderer.claim()
    assert claimed is not None and claimed["id"] == rep["id"]
    now = await _get(client, w, rep["id"])
    assert now["status"] == "rendering" and now["attempts"] == 1
    # the file of a report that is not ready: 409 with the envelope
    r = await client.get(f"/v1/reports/{rep['id']}/file", headers=w.auth)
    assert r.status == 409 and (await r.json())["error"]["code"] == "conflict"
    clock.advance(seconds=3)
    assert await renderer.render(claimed) == "ready"
    done = await _get(client, w, rep["id"])
    assert done["status"] == "ready" and done["progress"] == 1 and done["error"] is None
    assert done["render_ms"] == 3000  # claim to ready, on the injected clock
    files = []
    for _ in range(2):
        r = await client.get(done["file"], headers=w.auth)
        assert r.status == 200 and r.content_type == "application/pdf"
        files.append(await r.read())
    assert files[0] == files[1]
    assert hashlib.sha256(files[0]).hexdigest() == done["sha256"] == r.headers["X-Content-SHA256"]
    assert len(files[0]) == done["size_bytes"]
    text = "\n".join(p.extract_text() for p in PdfReader(io.BytesIO(files[0])).pages)
    assert "Kühlzelle" in text and "720" in text  # the German render of the fixture month
    # report_ready went to the account's webhook through the alarms' outbox
    async with await psycopg.AsyncConnection.connect(rdsn, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT payload FROM outbox WHERE account_id = %s AND kind = 'report_ready'",
            (w.account,),
        )
        (payload,) = [row[0] for row in await cur.fetchall()]
        assert payload["data"]["report_id"] == rep["id"]
        assert payload["data"]["sha256"] == done["sha256"]
        # a late reading changes the month: the same PDF cannot be made again
        await write.insert_readings(
            conn,
            [(int(w.devices["num"]), datetime(2026, 11, 10, 12, 30, tzinfo=UTC), 9.5)],
            now=NOW,
            compact_after_days=400,
        )
    r = await client.get(done["file"], headers=w.auth)
    body = await r.json()
    assert r.status == 409 and body["error"]["code"] == "conflict", body
    assert "changed" in body["error"]["message"]
    # another account sees no such report
    other = await make_world(rdsn, cfg, ())
    r = await client.get(f"/v1/reports/{rep['id']}", headers=other.auth)
    assert r.status == 404 and (await r.json())["error"]["code"] == "report_not_found"


async def test_the_renderer_loop_takes_a_queued_report_to_ready(
    aiohttp_client: Any, rdsn: str
) -> None:
    """The serving process's own renderer (OPENSENSE_REPORT_WORKERS=1), woken by the POST."""
    clock = FakeClock(NOW)
    cfg = test_config(clock, report_workers=1, alarms_enabled=False)
    w = await _world(rdsn, cfg)
    client = await _app(aiohttp_client, rdsn, cfg)
    status, rep = await _post(client, w)
    assert status == 202
    for _ in range(200):
        rep = await _get(client, w, rep["id"])
        if rep["status"] in ("ready", "failed"):
            break
        await asyncio.sleep(0.05)
    assert rep["status"] == "ready", rep


async def test_two_claimers_never_render_the_same_report(rdsn: str) -> None:
    clock = FakeClock(NOW)
    cfg = cfg_for(clock)
    w = await _world(rdsn, cfg)
    async with AsyncConnectionPool(rdsn, min_size=4, max_size=8, open=False) as pool:
        a, b = Renderer(pool, cfg), Renderer(pool, cfg)
        # drain what other tests left queued, so the claims below see only ours
        while await a.claim():
            pass
        async with pool.connection() as conn:
            ids = set()
            for lang in ("en", "de", "en"):
                ask = rstore.parse({"site_id": w.site, "period": NOV, "language": lang})
                row = await rstore.create(conn, w.account, ask, NOW, queue_max=10, actor="t")
                ids.add(row["id"])
        who = (a, b, a, b, a, b)
        got = await asyncio.gather(*(r.claim() for r in who))
        claimed = [(r, g) for r, g in zip(who, got, strict=True) if g is not None]
        assert sorted(g["id"] for _, g in claimed) == sorted(ids)  # each once, none twice
        assert {g["attempts"] for _, g in claimed} == {1}
        # a renderer cannot finish another's claim; each finishes its own
        r0, g0 = claimed[0]
        assert await (b if r0 is a else a).render(g0) == "lost"
        results = await asyncio.gather(*(r.render(g) for r, g in claimed))
        assert results == ["ready"] * 3


async def test_a_crashed_renderers_claim_is_retried_then_failed(rdsn: str) -> None:
    clock = FakeClock(NOW)
    cfg = cfg_for(clock, report_lease_s=30, report_max_attempts=2)
    w = await _world(rdsn, cfg)
    async with AsyncConnectionPool(rdsn, min_size=2, max_size=4, open=False) as pool:
        crashed, other = Renderer(pool, cfg), Renderer(pool, cfg)
        while await other.claim():
            pass
        async with pool.connection() as conn:
            ask = rstore.parse({"site_id": w.site, "period": NOV})
            row = await rstore.create(conn, w.account, ask, NOW, queue_max=10, actor="t")
        first = await crashed.claim()  # ... and the process dies here
        assert first is not None and first["id"] == row["id"]
        assert await other.claim() is None  # the lease still holds
        clock.advance(seconds=31)
        second = await other.claim()
        assert second is not None and second["id"] == row["id"] and second["attempts"] == 2
        # the first renderer wakes up late: its writes are refused, the second's count
        assert await crashed.render(first) == "lost"
        assert await other.render(second) == "ready"
        async with pool.connection() as conn:
            assert (await rstore.get(conn, w.account, row["id"]))["status"] == "ready"
            # a report that crashes every renderer: failed after max_attempts, with why
            row = await rstore.create(conn, w.account, ask, clock(), queue_max=10, actor="t")
        for _ in range(2):
            got = await crashed.claim()
            assert got is not None and got["id"] == row["id"]
            clock.advance(seconds=31)
        assert await other.claim() is None
        async with pool.connection() as conn:
            end = await rstore.get(conn, w.account, row["id"])
    assert end["status"] == "failed" and end["attempts"] == 2
    assert "stopped without finishing 2 times" in end["error"]


async def test_bad_requests_get_the_envelope(aiohttp_client: Any, rdsn: str) -> None:
    clock = FakeClock(NOW)
    cfg = cfg_for(clock, report_queue_max=2)
    w = await _world(rdsn, cfg)
    other = await make_world(rdsn, cfg, ())
    client = await _app(aiohttp_client, rdsn, cfg)
    cases: list[tuple[dict[str, Any], int, str, str]] = [
        ({"template": "haccp_weekly"}, 400, "invalid_request", "template must be one of"),
        ({"language": "fr"}, 400, "invalid_request", "language must be one of"),
        ({"period": {"from": "2026-11-01"}}, 400, "invalid_request", "period must be"),
        ({"period": {"from": "2026-11-31", "to": "2026-12-01"}}, 400, "invalid_request", "date"),
        ({"period": {"from": "2026-11-30", "to": "2026-11-01"}}, 422, "invalid_range", "after"),
        ({"period": {"from": "2025-10-01", "to": "2026-11-01"}}, 422, "invalid_range", "13"),
        ({"period": {"from": "2026-12-01", "to": "2026-12-31"}}, 422, "invalid_range", "ended"),
        # today in Berlin is not over yet
        ({"period": {"from": "2026-11-01", "to": "2026-12-03"}}, 422, "invalid_range", "ended"),
        ({"site_id": other.site}, 404, "site_not_found", "no site"),
        ({"site_id": ["x"]}, 400, "invalid_request", "site_id"),
        ({"extra": 1}, 400, "invalid_request", "unknown field"),
    ]
    for over, status, code, words in cases:
        got, body = await _post(client, w, **over)
        assert (got, body["error"]["code"]) == (status, code), (over, body)
        assert words in body["error"]["message"], (over, body)
    # 13 months exactly is allowed; the account's queue of 2 is then full
    for period in (NOV, {"from": "2025-11-01", "to": "2026-11-30"}):
        got, body = await _post(client, w, period=period)
        assert got == 202, body
    got, body = await _post(client, w)
    assert (got, body["error"]["code"]) == (429, "rate_limited"), body
    # the schedule's recipients are checked where they are set
    for bad in (
        ["qa@example.com", "x\r\nBcc: y@example.com"],
        [f"q{i}@example.com" for i in range(21)],
    ):
        r = await client.patch(
            f"/v1/sites/{w.site}", json={"report_recipients": bad}, headers=w.auth
        )
        assert r.status == 400 and "report_recipients" in (await r.json())["error"]["message"]
    r = await client.post("/v1/reports", data=b"[1]", headers=w.auth)
    assert r.status == 400 and (await r.json())["error"]["code"] == "invalid_request"
    r = await client.post("/v1/reports", json={"site_id": w.site, "period": NOV})
    assert r.status == 401 and "error" in await r.json()
    async with await psycopg.AsyncConnection.connect(rdsn, autocommit=True) as conn:
        await conn.execute(  # leave nothing queued for the other tests' renderers
            "UPDATE reports SET status = 'failed', error = 'test' WHERE account_id = %s"
            " AND status = 'queued'",
            (w.account,),
        )


def _boom(_d: Any, _lang: str) -> bytes:
    raise RuntimeError("the drawing failed")


async def test_status_component_reflects_renders_and_failures(
    aiohttp_client: Any, rdsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a month later than the other tests: the component counts the last 24 hours'
    # renders of every account, and theirs are out of that window
    clock = FakeClock(NOW + timedelta(days=31))
    cfg = cfg_for(clock, status_interval_s=10)
    w = await _world(rdsn, cfg)
    client = await _app(aiohttp_client, rdsn, cfg)
    mon = client.app[STATUS]

    async def component() -> dict[str, Any]:
        clock.advance(seconds=10)
        await mon.tick()
        r = await client.get("/status.json")
        return next(c for c in (await r.json())["components"] if c["id"] == "reports")

    assert (await component())["state"] == "unknown"
    status, rep = await _post(client, w)
    renderer: Renderer = client.app[REPORTS]
    claimed = await renderer.claim()
    assert claimed is not None
    clock.advance(seconds=2)
    assert await renderer.render(claimed) == "ready"
    c = await component()
    assert c["state"] == "operational", c
    assert c["detail"] == "1 report(s) rendered in 24 h, median 2.0 s, slowest 2.0 s", c
    # two renders that fail (a template that raises) outnumber the one that worked
    t = build.TEMPLATES["haccp_monthly"]
    monkeypatch.setitem(build.TEMPLATES, "haccp_monthly", dataclasses.replace(t, render=_boom))
    for _ in range(2):
        status, rep = await _post(client, w)
        assert status == 202
        assert await renderer.run_once() == "failed"
    failed = await _get(client, w, rep["id"])
    assert failed["status"] == "failed" and "RuntimeError" in failed["error"], failed
    c = await component()
    assert c["state"] == "degraded" and c["detail"] == "2 of 3 reports in 24 h failed", c


async def test_monthly_schedule_fires_once_after_the_month_closes_and_emails_the_pdf(
    rdsn: str, smtp: Any
) -> None:
    clock = FakeClock(datetime(2026, 11, 30, 22, 59, tzinfo=UTC))  # Berlin: 23:59
    cfg = cfg_for(clock, smtp_host="127.0.0.1", smtp_port=smtp.port, smtp_tls="none")
    berlin = await _world(rdsn, cfg)
    async with await psycopg.AsyncConnection.connect(rdsn, autocommit=True) as conn:
        utc = await service.create_site(
            conn, berlin.account, {"name": "London", "vertical": "chilled_storage"}
        )
        await conn.execute(
            "UPDATE sites SET created_at = '2026-10-15', report_recipients = %s WHERE id = %s",
            (psycopg.types.json.Jsonb(["qa@example.com", "chef@example.com"]), berlin.site),
        )
        await conn.execute("UPDATE sites SET created_at = '2026-10-15' WHERE id = %s", (utc["id"],))

        async def months(site: str) -> list[tuple[date, date]]:
            cur = await conn.execute(
                "SELECT period_from, period_to FROM reports WHERE site_id = %s"
                " AND origin = 'schedule' ORDER BY period_from",
                (site,),
            )
            return [tuple(r) for r in await cur.fetchall()]  # type: ignore[misc]

        oct_ = (date(2026, 10, 1), date(2026, 10, 31))
        nov = (date(2026, 11, 1), date(2026, 11, 30))
        await schedule.run(conn, cfg, clock())
        assert await months(berlin.site) == [oct_]  # November has not closed in Berlin
        clock.now = datetime(2026, 11, 30, 23, 0, tzinfo=UTC)  # Berlin: 1 December 00:00
        await schedule.run(conn, cfg, clock())
        await schedule.run(conn, cfg, clock())  # a second run queues nothing more
        assert await months(berlin.site) == [oct_, nov]
        assert await months(utc["id"]) == [oct_]  # London's November is an hour longer
        clock.now = datetime(2026, 12, 1, 0, 0, tzinfo=UTC)
        await schedule.run(conn, cfg, clock())
        assert await months(utc["id"]) == [oct_, nov]

        cur = await conn.execute(
            "SELECT id FROM reports WHERE site_id = %s AND origin = 'schedule'", (berlin.site,)
        )
        async with AsyncConnectionPool(rdsn, min_size=1, max_size=4, open=False) as pool:
            renderer = Renderer(pool, cfg)  # any server's renderer; this one takes Berlin's
            for (rid,) in await cur.fetchall():
                claimed = await renderer.claim(only=rid)
                assert claimed is not None and await renderer.render(claimed) == "ready"
        cur = await conn.execute(
            "SELECT status, sha256 FROM reports WHERE site_id = %s AND period_from = %s",
            (berlin.site, nov[0]),
        )
        status, sha = await cur.fetchone()  # type: ignore[misc]
        assert status == "ready"
        line = await schedule.run(conn, cfg, clock())
        assert "4 sent" in line, line  # October's and November's, to both recipients
        assert "0 monthly report(s) queued" in line
    novs = [m for m in smtp.messages if "2026-11-01" in str(m["Subject"])]
    assert sorted(m["X-Rcpt"] for m in novs) == ["chef@example.com", "qa@example.com"]
    for m in novs:
        (att,) = [p for p in m.walk() if p.get_content_type() == "application/pdf"]
        pdf = att.get_payload(decode=True)
        assert hashlib.sha256(pdf).hexdigest() == sha
        assert sha in m.get_payload()[0].get_payload(decode=True).decode()


def _cli(dsn: str, *args: str) -> int:
    from opensense import cli

    os.environ["OPENSENSE_DATABASE_URL"] = dsn
    try:
        return cli.main(["report", "render", *args])
    finally:
        del os.environ["OPENSENSE_DATABASE_URL"]


async def test_cli_queues_renders_and_checks_like_the_api_and_local_renders_alike(
    rdsn: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # a state directory without an audit signing key: the queued report is a DRAFT
    # (sealing: tests/test_report_verify.py)
    monkeypatch.setenv("OPENSENSE_STATE_DIR", str(tmp_path / "state"))
    clock = FakeClock(NOW)
    w = await _world(rdsn, cfg_for(clock))
    args = ("--site", w.site, "--month", "2026-11")
    queued, local = tmp_path / "q.pdf", tmp_path / "l.pdf"
    assert await asyncio.to_thread(_cli, rdsn, *args, "--out", str(queued)) == 0
    line = capsys.readouterr().out
    async with await psycopg.AsyncConnection.connect(rdsn, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT id, status, origin, sha256, progress FROM reports WHERE site_id = %s",
            (w.site,),
        )
        (rid, status, origin, sha, progress), *more = await cur.fetchall()
    assert not more and (status, origin, progress) == ("ready", "cli", 1.0)
    assert hashlib.sha256(queued.read_bytes()).hexdigest() == sha and sha in line and rid in line
    assert await asyncio.to_thread(_cli, rdsn, *args, "--out", str(local), "--draft") == 0
    assert local.read_bytes() == queued.read_bytes()
    assert "not sealed" in line and "DRAFT" in capsys.readouterr().out
    # sealing in the command needs the key; nothing is rendered without it
    assert await asyncio.to_thread(_cli, rdsn, *args, "--out", str(local), "--local") == 1
    assert "no audit signing key" in capsys.readouterr().err
    # the queued path refuses what the API refuses (a month not over yet); --draft does not
    assert await asyncio.to_thread(_cli, rdsn, "--site", w.site, "--month", "2099-01",
                                   "--out", str(local)) == 1  # fmt: skip
    assert "invalid_range" in capsys.readouterr().err


async def test_the_renderer_seals_when_the_server_has_its_signing_key(
    aiohttp_client: Any, rdsn: str, tmp_path: Path
) -> None:
    """With the audit signing key the API's report is sealed (reports/verify.py): its
    hash is in report_seals and the audit trail, the PDF prints the verification
    link, and the file route renders it again under that seal to the same bytes."""
    from opensense.audit.note import generate_key

    generate_key(tmp_path / "audit" / "signing.key", "opensense.test/reports")
    clock = FakeClock(NOW)
    cfg = cfg_for(clock, state_dir=tmp_path, audit_origin="opensense.test/reports")
    w = await _world(rdsn, cfg)
    # a node's own health figure on the site: not part of a compliance report
    async with await psycopg.AsyncConnection.connect(rdsn, autocommit=True) as conn:
        await conn.execute(
            "INSERT INTO channels (id, sensor_id, account_id, device_id, kind, label, unit, name)"
            " VALUES ('chn_sealhealth0001', 'snr_sealhealth0001', %s, %s, 'health',"
            " 'uptime', 's', 'health uptime')",
            (w.account, w.device_ids["fridge01"]),
        )
    client = await _app(aiohttp_client, rdsn, cfg)
    status, rep = await _post(client, w)
    assert status == 202, rep
    renderer: Renderer = client.app[REPORTS]
    claimed = await renderer.claim(only=rep["id"])  # not the schedule's, if it ran
    assert claimed is not None and await renderer.render(claimed) == "ready"
    done = await _get(client, w, rep["id"])
    assert done["status"] == "ready", done
    r = await client.get(done["file"], headers=w.auth)
    pdf = await r.read()
    assert r.status == 200 and hashlib.sha256(pdf).hexdigest() == done["sha256"]
    async with await psycopg.AsyncConnection.connect(rdsn, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT code, link FROM report_seals WHERE sha256 = %s", (done["sha256"],)
        )
        (code, link), *more = await cur.fetchall()
        cur = await conn.execute(
            "SELECT count(*) FROM audit_log WHERE action = 'report.rendered' AND subject = %s",
            (code,),
        )
        assert not more and (await cur.fetchone()) == (1,)
    text = " ".join(p.extract_text() for p in PdfReader(io.BytesIO(pdf)).pages)
    assert link in text and "DRAFT" not in text
    assert "Kühlzelle" in text and "health uptime" not in text
