"""A report the inspector can verify (issue 18 item 4): the sealed render, its hash in
the audit trail, the printed checkpoint, link and QR code, and the public
verification page. One tiny period (two days, a reading every 30 minutes) in a
database of its own, rendered sealed once for the whole module."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import re
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import psycopg
import pytest
from pypdf import PdfReader
from pypdf.generic import ContentStream
from reportlab.graphics.barcode import qrencoder

from opensense.app import create_app
from opensense.audit import store as audit_store
from opensense.audit import verify as audit_verify
from opensense.audit.note import Checkpoint, generate_key
from opensense.audit.publish import AuditPlaces, publish
from opensense.reports import verify_routes
from opensense.reports.load import load_month
from opensense.reports.seal_pdf import QR_LEVEL
from opensense.reports.verify import render_again, render_bytes, sealed_render
from opensense.settings import Config

from .fixtures.clock import FakeClock
from .fixtures.server import make_world, test_config
from .test_reports import _png

pytestmark = pytest.mark.db

BERLIN = ZoneInfo("Europe/Berlin")
ORIGIN = "test.invalid/audit"
PUBLIC = "https://reports.test.invalid"


def _config(tmp: Path, clock: FakeClock, **over: Any) -> Config:
    key = tmp / "audit" / "signing.key"
    if not key.exists():
        generate_key(key, ORIGIN)
    return test_config(clock, state_dir=tmp, audit_origin=ORIGIN, public_url=PUBLIC, **over)  # type: ignore[arg-type]


async def _setup(dsn: str, cfg: Config) -> dict[str, Any]:
    from opensense.storage import write

    w = await make_world(dsn, cfg, ("cold01",))
    today = cfg.clock().astimezone(BERLIN).date()
    first, last = today - timedelta(days=3), today - timedelta(days=2)
    start = datetime(first.year, first.month, first.day, tzinfo=BERLIN).timestamp()
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        async with conn.transaction():
            await conn.execute(
                "UPDATE sites SET address = 'Kühlhausweg 7' WHERE id = %s", (w.site,)
            )
            cur = await conn.execute(
                "INSERT INTO channels (id, sensor_id, account_id, device_id, kind, label, unit, name)"
                " VALUES (%s, %s, %s, %s, 'temperature', 'a', '°C', 'Kühlzelle') RETURNING num",
                (f"chn_v{w.site[-8:]}", f"snr_v{w.site[-8:]}", w.account, w.device_ids["cold01"]),
            )
            row = await cur.fetchone()
            assert row is not None
            rows = [
                (row[0], datetime.fromtimestamp(start + k * 1800, UTC), 3.25 + (k % 5) / 8)
                for k in range(96)
            ]
            await write.insert_readings(conn, rows, now=cfg.clock(), compact_after_days=400)
        pdf, seal = await sealed_render(
            conn,
            config=cfg,
            account_id=w.account,
            site_id=w.site,
            template="haccp_monthly",
            period_from=first,
            period_to=last,
            language="en",
            now=cfg.clock(),
            actor="test",
        )
    return {"world": w, "first": first, "last": last, "pdf": pdf, "seal": seal}


@pytest.fixture(scope="module")
def sealed(new_database: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    # a database of its own: readings of a past day in the shared one would be
    # compacted by other tests' compaction runs (test_storage counts what it moves)
    dsn = new_database()
    tmp = tmp_path_factory.mktemp("sealed")
    clock = FakeClock(datetime.now(UTC).replace(second=0, microsecond=0))
    cfg = _config(tmp, clock)
    out = asyncio.run(_setup(dsn, cfg))
    out.update(dsn=dsn, cfg=cfg, tmp=tmp, clock=clock)
    return out


def _flat(text: str) -> str:
    return " ".join(text.split())


async def test_the_same_seal_renders_the_same_bytes_again(sealed: dict[str, Any]) -> None:
    pdf, seal = sealed["pdf"], sealed["seal"]
    assert seal.sha256 == hashlib.sha256(pdf).hexdigest()
    async with await psycopg.AsyncConnection.connect(sealed["dsn"]) as conn:
        again, stored = await render_again(conn, seal.code)
        again2, _ = await render_again(conn, seal.code)
    assert again == pdf and again2 == pdf and stored.sha256 == seal.sha256
    assert stored.rendered_at == seal.rendered_at and stored.checkpoint == seal.checkpoint


async def test_the_pdf_prints_the_checkpoint_the_link_and_how_to_check(
    sealed: dict[str, Any],
) -> None:
    seal, w = sealed["seal"], sealed["world"]
    reader = PdfReader(io.BytesIO(sealed["pdf"]))
    pages = [_flat(p.extract_text()) for p in reader.pages]
    # the checkpoint is the account's, signed by the pinned key, and published
    places = AuditPlaces.from_config(sealed["cfg"])
    verifier = places.verifier()
    assert verifier is not None
    cp = Checkpoint.parse(verifier.open(seal.checkpoint))
    assert cp.origin == f"{ORIGIN}/{w.account}" and cp.size >= 4  # account, token, site, …
    published = (places.publish_dir / w.account / "checkpoints" / f"{cp.size:012d}").read_text()
    assert published == seal.checkpoint
    link = f"{PUBLIC}/verify/{seal.code}"
    assert seal.link == link and re.fullmatch(r"[a-z2-7]{16}", seal.code)
    for page in (pages[0], pages[-1]):  # the cover and the last page
        assert cp.origin in page and f"Tree size {cp.size}" in page, page
        assert seal.root_hash in page and link in page
        assert seal.when() in page
    assert all(f"verify: {link}" in p for p in pages) and not any("DRAFT" in p for p in pages)
    last = pages[-1]
    assert "How to check this report" in last and "sha256sum report.pdf" in last
    assert "What a match proves" in last and "What it does not prove" in last
    # the QR code on the last page is the link's: its modules, read from the PDF's
    # drawing operators, are the QR encoding of the link at the printed level
    assert _qr_modules(reader, -1) == _qr_of(link)
    assert _qr_modules(reader, 0) == _qr_of(link)
    path = sealed["tmp"] / "sealed_en.pdf"
    path.write_bytes(sealed["pdf"])
    _png(path, "sealed_en")  # the cover's verification block, the last page
    # in German, from the catalogue
    async with await psycopg.AsyncConnection.connect(sealed["dsn"]) as conn:
        inp = await load_month(conn, w.site, sealed["first"], sealed["last"])
    de = await asyncio.to_thread(render_bytes, "haccp_monthly", inp, "de", seal)
    last_de = _flat(PdfReader(io.BytesIO(de)).pages[-1].extract_text())
    assert "So prüfen Sie diesen Bericht" in last_de and "sha256sum bericht.pdf" in last_de
    assert "Was sie nicht beweist" in last_de and seal.root_hash in last_de


def _qr_of(value: str) -> set[tuple[int, int]]:
    qr = qrencoder.QRCode(None, getattr(qrencoder.QRErrorCorrectLevel, QR_LEVEL))
    qr.addData(value)
    qr.make()
    return {(r, c) for r, row in enumerate(qr.modules) for c, dark in enumerate(row) if dark}


def _qr_modules(reader: PdfReader, page: int) -> set[tuple[int, int]]:
    """The dark modules of the one QR code drawn on a page: its filled rectangles all
    one module high (a run of dark modules in a row is one rectangle)."""
    ops = ContentStream(reader.pages[page].get_contents(), reader).operations
    rects = [[float(v) for v in args] for args, op in ops if op == b"re"]
    box = Counter(round(h, 4) for _, _, _, h in rects).most_common(1)[0][0]
    mods = [r for r in rects if round(r[3], 4) == box]
    x0, ytop = min(r[0] for r in mods), max(r[1] for r in mods)
    out = set()
    for x, y, wdt, _ in mods:
        row, col = round((ytop - y) / box), round((x - x0) / box)
        out |= {(row, col + k) for k in range(round(wdt / box))}
    return out


async def test_the_hash_is_in_the_audit_trail_and_the_chain_still_verifies(
    sealed: dict[str, Any],
) -> None:
    seal, w = sealed["seal"], sealed["world"]
    places = AuditPlaces.from_config(sealed["cfg"])
    async with await psycopg.AsyncConnection.connect(sealed["dsn"], autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT actor, subject, data FROM audit_log WHERE account_id = %s"
            " AND action = 'report.rendered'",
            (w.account,),
        )
        [(actor, subject, data)] = await cur.fetchall()
        assert actor == "test" and subject == seal.code
        assert data == {
            "site": w.site,
            "template": "haccp_monthly",
            "period": {"from": sealed["first"].isoformat(), "to": sealed["last"].isoformat()},
            "language": "en",
            "rendered_at": seal.rendered_at.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "sha256": seal.sha256,
            "checkpoint": {"origin": seal.origin, "size": seal.tree_size, "root": seal.root_hash},
        }
        # the next checkpoint covers the report's row, and the whole trail verifies
        assert any(w.account in line for line in await publish(conn, places))
        rep = await audit_verify.verify(
            conn, audit_store.Directory(places.publish_dir), places.verifier(), w.account
        )
        assert rep.ok and rep.checkpoints >= 2, rep.problems


async def _client(aiohttp_client: Any, sealed: dict[str, Any], **over: Any) -> Any:
    # an https public URL without SMTP: the dashboard's sign-in would refuse to start
    cfg = _config(sealed["tmp"], sealed["clock"], login_link_in_log=True, **over)
    return await aiohttp_client(create_app(cfg, sealed["dsn"]))


def _ip(tag: str) -> dict[str, str]:
    """A client address of the test's own (the test client is a loopback peer, so the
    proxy's X-Forwarded-For counts): each test's rate-limit counter starts at zero."""
    n = int(hashlib.sha256(f"{tag}{os.getpid()}".encode()).hexdigest()[:6], 16)
    return {"X-Forwarded-For": f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"}


def _confirms(html: str, sealed: dict[str, Any]) -> None:
    seal, w = sealed["seal"], sealed["world"]
    assert "Verified: this report is genuine" in html
    dd = re.findall(r"<dd>(.*?)</dd>", html)
    assert dd == [
        "Shop",
        f"{sealed['first'].isoformat()} – {sealed['last'].isoformat()}",
        seal.when(),
    ]
    # and nothing else: no account, site id, address, reading, hash or checkpoint
    for secret in (w.account, w.site, "Kühlhausweg", "3.25", seal.sha256, seal.root_hash,
                   seal.origin, "haccp", "Kühlzelle", "cold01", "t@example.invalid"):  # fmt: skip
        assert secret not in html, secret


async def test_the_page_confirms_the_right_hash_and_nothing_else(
    aiohttp_client: Any, sealed: dict[str, Any]
) -> None:
    client = await _client(aiohttp_client, sealed, auth_rate_per_min=50)
    seal, ip = sealed["seal"], _ip("confirm")
    # the short link opens the form, bound to the report
    resp = await client.get(f"/verify/{seal.code}", headers=ip)
    html = await resp.text()
    assert resp.status == 200 and f'name="code" value="{seal.code}"' in html
    assert "default-src 'none'" in resp.headers["Content-Security-Policy"]
    assert resp.headers["X-Frame-Options"] == "DENY" and "<script" not in html
    # the hash typed (as sha256sum prints it), with the link's code
    form = {"code": seal.code, "sha256": f"{seal.sha256.upper()}  report.pdf"}
    resp = await client.post("/verify", data=form, headers=ip)
    assert resp.status == 200
    _confirms(await resp.text(), sealed)
    # the PDF uploaded, without a code (the form at /verify)
    mp = aiohttp.FormData()
    mp.add_field("file", sealed["pdf"], filename="r.pdf", content_type="application/pdf")
    resp = await client.post("/verify", data=mp, headers=ip)
    assert resp.status == 200
    _confirms(await resp.text(), sealed)
    # not a hash: the form again, saying so
    resp = await client.post("/verify", data={"sha256": "abc"}, headers=ip)
    assert resp.status == 422 and "64 characters" in await resp.text()


async def test_a_changed_reading_gives_a_hash_the_page_refuses(
    aiohttp_client: Any, sealed: dict[str, Any]
) -> None:
    seal = sealed["seal"]
    async with await psycopg.AsyncConnection.connect(sealed["dsn"]) as conn:
        inp = await load_month(conn, sealed["world"].site, sealed["first"], sealed["last"])
    ch = inp.channels[0]
    values = list(ch.values)
    values[40] += 0.1  # one reading, as a forger would change it
    forged_inp = replace(inp, channels=[replace(ch, values=values)])
    forged = await asyncio.to_thread(render_bytes, "haccp_monthly", forged_inp, "en", seal)
    assert forged != sealed["pdf"]
    client = await _client(aiohttp_client, sealed, auth_rate_per_min=50)
    ip = _ip("refuse")
    for form in (
        {"sha256": hashlib.sha256(forged).hexdigest()},
        {"sha256": hashlib.sha256(forged).hexdigest(), "code": seal.code},
    ):
        resp = await client.post("/verify", data=form, headers=ip)
        html = await resp.text()
        assert resp.status == 404 and "Not verified" in html
        assert "not a report this server sealed" in html and "Shop" not in html
    mp = aiohttp.FormData()
    mp.add_field("file", forged, filename="r.pdf", content_type="application/pdf")
    resp = await client.post("/verify", data=mp, headers=ip)
    assert resp.status == 404 and "not a report this server sealed" in await resp.text()


async def test_an_upload_too_big_is_refused_with_the_envelope(
    aiohttp_client: Any, sealed: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(verify_routes, "MAX_UPLOAD", 4096)
    client = await _client(aiohttp_client, sealed, auth_rate_per_min=50)
    mp = aiohttp.FormData()
    mp.add_field("file", sealed["pdf"], filename="r.pdf", content_type="application/pdf")
    resp = await client.post("/verify", data=mp, headers=_ip("big"))
    assert resp.status == 413
    body = await resp.json()
    assert body["error"]["code"] == "payload_too_large" and "MB" in body["error"]["message"]
    # a part whose header is not one (found by schemathesis): 400, not a server error
    raw = b'--b\r\nContent-Disposition: form-data; name="\xf2\x16"\r\n\r\nx\r\n--b--\r\n'
    headers = {"Content-Type": "multipart/form-data; boundary=b", **_ip("big")}
    resp = await client.post("/verify", data=raw, headers=headers)
    assert resp.status == 400 and (await resp.json())["error"]["code"] == "invalid_request"
    headers["Content-Type"] = "multipart/form-data"  # no boundary
    resp = await client.post("/verify", data=raw, headers=headers)
    assert resp.status == 400 and (await resp.json())["error"]["code"] == "invalid_request"


async def test_the_page_is_rate_limited_per_ip(aiohttp_client: Any, sealed: dict[str, Any]) -> None:
    client = await _client(aiohttp_client, sealed, auth_rate_per_min=3)
    ip = _ip("limit")
    for _ in range(3):
        assert (await client.get("/verify", headers=ip)).status == 200
    resp = await client.post("/verify", data={"sha256": sealed["seal"].sha256}, headers=ip)
    assert resp.status == 429 and int(resp.headers["Retry-After"]) >= 1
    assert (await resp.json())["error"]["code"] == "rate_limited"
    # another address is not limited by this one's requests
    assert (await client.get("/verify", headers=_ip("limit-other"))).status == 200


def test_the_cli_seals_by_default_and_renders_again_to_the_same_bytes(
    sealed: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from opensense import cli

    env = {
        "OPENSENSE_DATABASE_URL": sealed["dsn"],
        "OPENSENSE_STATE_DIR": str(sealed["tmp"]),
        "OPENSENSE_AUDIT_ORIGIN": ORIGIN,
        "OPENSENSE_PUBLIC_URL": PUBLIC,
    }
    # the last month that has ended in the site's zone, by the CLI's own (real) clock
    # (the month of the fixture's readings has not ended from the 4th of a month on)
    today = datetime.now(UTC).astimezone(BERLIN).date()
    month = (today.replace(day=1) - timedelta(days=1)).strftime("%Y-%m")
    site = sealed["world"].site
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        out = tmp_path / "r.pdf"
        assert (
            cli.main(["report", "render", "--site", site, "--month", month, "--out", str(out)]) == 0
        )
        printed = capsys.readouterr().out
        sha = hashlib.sha256(out.read_bytes()).hexdigest()
        m = re.search(rf"verify at {re.escape(PUBLIC)}/verify/([a-z2-7]{{16}})", printed)
        assert f"sha256 {sha}" in printed and m, printed
        again = tmp_path / "again.pdf"
        assert cli.main(["report", "render", "--again", m.group(1), "--out", str(again)]) == 0
        assert again.read_bytes() == out.read_bytes()
        assert "the same bytes as sealed" in capsys.readouterr().out
        draft = tmp_path / "draft.pdf"
        args = [
            "report",
            "render",
            "--draft",
            "--site",
            site,
            "--month",
            month,
            "--out",
            str(draft),
        ]
        assert cli.main(args) == 0
        pages = PdfReader(draft).pages
        assert all("DRAFT" in p.extract_text() for p in pages)
        assert "sha256sum" not in pages[-1].extract_text()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
