"""Issue 11, items 6-9: alarm dispatch attacked by a tenant, through the real server
(real PostgreSQL, aiosmtpd for mail, real local HTTP servers as webhook endpoints).

- 6: one bad row (a URL `http://a..b/`, a CR/LF in an address or a name, a payload
  the sender chokes on) stored before the checks existed must be settled alone:
  never roll back the batch, never re-send what went out, quarantined visibly;
  and such values are refused when saved.
- 7: SSRF: private, loopback, link-local and metadata targets are refused at save and
  at every send (default), the connection goes to the checked address only, no
  redirects, no remote answer text back to the tenant.
- 8: GET on the confirm/unsubscribe links changes nothing (mail scanners); POST and
  RFC 8058 one-click do it; the owner is told.
- 9: write rate limits, a recipient cap, and one account's failing recipients do not
  open the service-wide "dispatch failing" incident.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from aiosmtpd.controller import Controller

from opensense.alarms import dispatch
from opensense.api.keys import ALARMS_HTTP as HTTP
from opensense.api.keys import CONFIG, POOL, STATUS
from opensense.app import create_app
from opensense.ids import new_id

from .fixtures.notify import Mailbox
from .fixtures.processes import free_port
from .fixtures.server import make_world
from .test_alarms import alarm_config, evaluate, ingest, link_telegram, send

pytestmark = pytest.mark.db


@pytest.fixture
def dsn(new_database) -> str:
    """A database per test: the sender sends whatever is due in the whole database, and
    these tests leave rows due (retries, quarantined targets) that another test file's
    sender must not meet."""
    return new_database()


async def sql(dsn: str, query: str, *args: Any) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(query, args or None)
        return await cur.fetchall() if cur.description else []


async def insert_target(
    dsn: str, account: str, path: str, address: str, *, verified: bool = True, token: str = ""
) -> str:
    """A recipient stored directly: data saved before the checks at save existed."""
    tid = new_id("tgt")
    await sql(
        dsn,
        "INSERT INTO notify_targets (id, account_id, path, address, verified, secret, token)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s)",
        tid, account, path, address, verified, "whsec_x", token or None,
    )  # fmt: skip
    return tid


async def insert_row(dsn: str, account: str, target: str, payload: dict[str, Any], due) -> int:
    from psycopg.types.json import Jsonb

    rows = await sql(
        dsn,
        "INSERT INTO outbox (account_id, target_id, kind, dedupe_key, payload, due_at)"
        " VALUES (%s, %s, 'alarm_opened', %s, %s, %s) RETURNING id",
        account, target, "attack:" + secrets.token_hex(8), Jsonb(payload), due,
    )  # fmt: skip
    return int(rows[0][0])


def alarm(subject: str = "[ALARM] Shop temperature") -> dict[str, Any]:
    return {"kind": "alarm_opened", "subject": subject, "text": subject, "data": {"x": 1},
            "ackable": False}  # fmt: skip


@dataclass
class Endpoint:
    """A real local HTTP server a tenant's webhook may point at."""

    url: str = ""
    hits: dict[str, int] = field(default_factory=dict)


@pytest.fixture
async def endpoint() -> AsyncIterator[Endpoint]:
    ep = Endpoint()

    async def handle(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        ep.hits[name] = ep.hits.get(name, 0) + 1
        if name == "redirect":  # to an "internal" page the tenant should never reach
            raise web.HTTPFound(ep.url + "/internal")
        if name == "internal":
            return web.Response(text="SECRET-INTERNAL-DATA ami-id i-0123")
        if name == "error":
            return web.Response(status=500, text="SECRET-INTERNAL-DATA stack trace")
        if name == "down":
            return web.Response(status=503, text="busy")
        return web.Response(status=204)

    app = web.Application()
    app.router.add_route("*", "/{name}", handle)
    server = TestServer(app, host="127.0.0.1", port=free_port())
    await server.start_server()
    ep.url = str(server.make_url("")).rstrip("/")
    yield ep
    await server.close()


async def start(aiohttp_client, dsn, clock, smtp, telegram, **over):
    cfg = alarm_config(clock, smtp, telegram, **over)
    app = create_app(cfg, dsn)
    client = await aiohttp_client(app)
    world = await make_world(dsn, cfg, ("fridge01",))
    return client, world, app


async def pass_(app) -> None:
    """One sender pass as the loop runs it: an escaping exception is what the loop
    would log before trying again a second later."""
    try:
        await dispatch.dispatch_due(app[POOL], app[CONFIG], app[HTTP])
    except Exception:  # noqa: BLE001 - the unfixed code raises here; the test counts sends
        pass


async def log_of(client, world) -> list[dict[str, Any]]:
    r = await client.get("/v1/outbound-log", headers=world.auth)
    return (await r.json())["data"]


# --- 6: one bad row never holds the others --------------------------------------------


async def test_bad_rows_already_stored_are_settled_alone_and_nothing_is_sent_twice(
    aiohttp_client, dsn, clock, smtp, telegram
):
    client, world, app = await start(aiohttp_client, dsn, clock, smtp, telegram)
    other = await make_world(dsn, app[CONFIG], ("fridge01",))
    good = await insert_target(dsn, other.account, "email", "good@example.test")
    bad_url = await insert_target(dsn, world.account, "webhook", "http://a..b/")
    bad_mail = await insert_target(
        dsn, world.account, "email", "x@example.test\r\nBcc: spy@evil.test"
    )
    crlf_subject = await insert_target(dsn, world.account, "email", "cook@example.test")
    now = clock()
    # the bad rows are due first: the claimed batch is ordered by due time
    await insert_row(dsn, world.account, bad_url, alarm(), now - timedelta(seconds=3))
    await insert_row(dsn, world.account, bad_mail, alarm(), now - timedelta(seconds=2))
    await insert_row(
        dsn, world.account, crlf_subject, alarm("[ALARM] Shop\r\nBcc: spy@evil.test"),
        now - timedelta(seconds=1),
    )  # fmt: skip
    await insert_row(dsn, other.account, good, alarm(), now)
    for _ in range(4):  # four passes, a second apart, as the sender loop runs
        await pass_(app)
        clock.advance(seconds=1)
    # the other account's alarm went out once, not once a second
    assert len(smtp.to("good@example.test")) == 1
    # a subject stored with a CR/LF still goes out, as one header line, to its recipient only
    (cook,) = smtp.to("cook@example.test")
    assert cook["Subject"] == "[ALARM] Shop  Bcc: spy@evil.test" and cook["Bcc"] is None
    assert smtp.to("spy@evil.test") == []
    # the unsendable rows are quarantined, visibly to their tenant
    log = {e["target"]: e for e in await log_of(client, world)}
    assert log["http://a..b/"]["status"] == "quarantined"
    assert "valid host name" in log["http://a..b/"]["error"]
    assert log["x@example.test\r\nBcc: spy@evil.test"]["status"] == "quarantined"
    statuses = await sql(
        dsn, "SELECT target_id, status FROM outbox WHERE account_id = %s", world.account
    )
    assert dict(statuses) == {bad_url: "failed", bad_mail: "failed", crlf_subject: "sent"}


async def test_a_row_the_sender_chokes_on_is_quarantined_after_retries(
    aiohttp_client, dsn, clock, smtp, telegram
):
    client, world, app = await start(aiohttp_client, dsn, clock, smtp, telegram)
    tid = await insert_target(dsn, world.account, "email", "q@example.test")
    rid = await insert_row(dsn, world.account, tid, {"kind": "alarm_opened"}, clock())  # no text
    for _ in range(3):
        await pass_(app)
        clock.advance(minutes=10)
    ((status, attempts),) = await sql(dsn, "SELECT status, attempts FROM outbox WHERE id = %s", rid)
    assert (status, attempts) == ("failed", dispatch.INTERNAL_MAX)
    log = await log_of(client, world)
    assert log[0]["status"] == "quarantined" and "gave up after 3 attempts" in log[0]["error"]
    assert [e["status"] for e in log[1:]] == ["rejected", "rejected"]  # retried first


async def test_bad_addresses_urls_and_names_are_refused_when_saved(
    aiohttp_client, dsn, clock, smtp, telegram
):
    client, world, app = await start(aiohttp_client, dsn, clock, smtp, telegram)
    h = world.auth
    for body in (
        {"path": "webhook", "address": "http://a..b/"},
        {"path": "webhook", "address": "http:///hook"},
        {"path": "webhook", "address": "http://exa mple.test/"},
        {"path": "webhook", "address": "https://example.test/\r\nX: y"},
        {"path": "email", "address": "a@example.test\r\nBcc: spy@evil.test"},
        {"path": "email", "address": "Name <a@example.test>"},
        {"path": "email", "address": "a@exa..mple.test"},
        {"path": "email", "address": "a@example.test", "name": "Chef\r\nBcc: x"},
    ):
        r = await client.post("/v1/targets", json=body, headers=h)
        assert r.status == 400, (body, await r.text())
        assert (await r.json())["error"]["code"] == "invalid_request"
    r = await client.post(
        "/v1/sites", json={"name": "Shop\r\nBcc: spy@evil.test", "timezone": "UTC"}, headers=h
    )
    assert r.status == 400, await r.text()
    r = await client.patch(f"/v1/sites/{world.site}", json={"name": "A\nB"}, headers=h)
    assert r.status == 400
    r = await client.patch(
        f"/v1/sites/{world.site}", json={"address": "Main St 1\nBerlin"}, headers=h
    )
    assert r.status == 200  # a postal address may wrap: it is never in a mail header
    assert await sql(dsn, "SELECT 1 FROM notify_targets WHERE account_id = %s", world.account) == []


# --- 7: SSRF ---------------------------------------------------------------------------


async def test_private_targets_are_refused_at_save_and_at_send_by_default(
    aiohttp_client, dsn, clock, smtp, telegram, endpoint
):
    # the server's default: OPENSENSE_WEBHOOK_ALLOW_PRIVATE off
    client, world, app = await start(
        aiohttp_client, dsn, clock, smtp, telegram, webhook_allow_private=False
    )
    assert app[CONFIG].webhook_allow_private is False
    for url in (
        endpoint.url + "/hook",
        "http://localhost:9/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.1.2.3/",
        "http://192.168.0.1/",
        "http://[::1]/",
        "http://[::ffff:127.0.0.1]/",
        "http://[fd00:ec2::254]/",
        "http://0.0.0.0:8080/",
    ):
        r = await client.post("/v1/targets", json={"path": "webhook", "address": url},
                              headers=world.auth)  # fmt: skip
        assert r.status == 400, (url, await r.text())
        assert "address refused" in (await r.json())["error"]["message"]
    # a target stored before the check (or a name that resolved elsewhere then):
    # refused again at the send, nothing reaches the local server
    tid = await insert_target(dsn, world.account, "webhook", endpoint.url + "/hook")
    await insert_row(dsn, world.account, tid, alarm(), clock())
    await send(app, client)
    r = await client.post("/v1/notifications/test", json={"by": "x"}, headers=world.auth)
    (res,) = (await r.json())["results"]
    assert res["status"] == "failed" and "refused" in res["error"]
    assert endpoint.hits == {}
    log = await log_of(client, world)
    assert [e["status"] for e in log] == ["quarantined", "quarantined"]


async def test_no_redirects_and_no_remote_answer_reaches_the_tenant(
    aiohttp_client, dsn, clock, smtp, telegram, endpoint
):
    client, world, app = await start(aiohttp_client, dsn, clock, smtp, telegram)
    for name in ("redirect", "error"):
        r = await client.post(
            "/v1/targets", json={"path": "webhook", "address": f"{endpoint.url}/{name}"},
            headers=world.auth,
        )  # fmt: skip
        assert r.status == 201
    r = await client.post("/v1/notifications/test", json={"by": "x"}, headers=world.auth)
    text = await r.text() + str(await log_of(client, world))
    assert endpoint.hits == {"redirect": 1, "error": 1}  # /internal never fetched
    assert "SECRET-INTERNAL-DATA" not in text and "ami-id" not in text
    results = {(x["code"], x["error"]) for x in (await r.json())["results"]}
    assert results == {(302, "HTTP 302: redirects are not followed"), (500, "HTTP 500")}


async def test_the_connection_goes_to_the_checked_address_only(
    aiohttp_client, dsn, clock, smtp, telegram, endpoint, monkeypatch
):
    """DNS rebinding: a name that answers one address to the check and another to the
    connect. Only one lookup is made per send; the connection uses its answer (a
    second lookup here would answer 127.0.0.2, where nothing listens)."""
    client, world, app = await start(aiohttp_client, dsn, clock, smtp, telegram)
    loop = asyncio.get_running_loop()
    real = loop.getaddrinfo
    answers: list[str] = []

    async def rebinding(host, port, *args, **kw):
        if host != "rebind.test":
            return await real(host, port, *args, **kw)
        ip = "127.0.0.1" if not answers else "127.0.0.2"
        answers.append(ip)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))]

    monkeypatch.setattr(loop, "getaddrinfo", rebinding)
    port = int(endpoint.url.rsplit(":", 1)[1])
    tid = await insert_target(dsn, world.account, "webhook", f"http://rebind.test:{port}/hook")
    await insert_row(dsn, world.account, tid, alarm(), clock())
    answers.clear()
    await send(app, client)
    assert answers == ["127.0.0.1"] and endpoint.hits == {"hook": 1}


# --- 8: links in mail --------------------------------------------------------------------


async def test_mail_scanners_fetching_links_neither_confirm_nor_unsubscribe(
    aiohttp_client, dsn, clock, smtp, telegram
):
    client, world, app = await start(aiohttp_client, dsn, clock, smtp, telegram)
    r = await client.post(
        "/v1/targets", json={"path": "email", "address": "new@example.test"}, headers=world.auth
    )
    tid = (await r.json())["id"]
    await send(app, client)
    (mail,) = smtp.to("new@example.test")
    token = re.search(r"token=([\w-]+)", mail.get_payload(decode=True).decode()).group(1)
    for _ in range(3):  # the scanner, the preview, the person's first click
        r = await client.get("/v1/targets/verify", params={"token": token})
        assert r.status == 200 and r.content_type == "text/html"
        assert 'method="post"' in await r.text()
    assert await sql(dsn, "SELECT verified FROM notify_targets WHERE id = %s", tid) == [(False,)]
    r = await client.post("/v1/targets/verify", params={"token": token})
    assert r.status == 200
    assert await sql(dsn, "SELECT verified FROM notify_targets WHERE id = %s", tid) == [(True,)]

    await ingest(client, world, clock, [9.0] * 20)
    await evaluate(app)
    await send(app, client)
    alarm_mail = smtp.to("new@example.test")[-1]
    assert alarm_mail["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    url = alarm_mail["List-Unsubscribe"].strip("<>")
    path = url[url.index("/v1/") :]
    r = await client.get(path)
    assert r.status == 200 and "<button" in await r.text()
    assert await sql(dsn, "SELECT deleted_at FROM notify_targets WHERE id = %s", tid) == [(None,)]
    # RFC 8058: the mail client POSTs the one-click body to the List-Unsubscribe URL
    r = await client.post(
        path, data="List-Unsubscribe=One-Click",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )  # fmt: skip
    assert r.status == 200
    (deleted,) = await sql(dsn, "SELECT deleted_at FROM notify_targets WHERE id = %s", tid)
    assert deleted[0] is not None
    # the account's owner hears of it, by email to the account's address
    await send(app, client)
    (notice,) = smtp.to("t@example.invalid")
    assert notice["Subject"] == "[OpenSense] An alarm recipient left"
    assert "new@example.test unsubscribed" in notice.get_payload(decode=True).decode()
    log = await log_of(client, world)
    assert log[0]["kind"] == "recipient_left" and log[0]["status"] == "ok"
    r = await client.post(path)  # once only
    assert r.status == 404 and (await r.json())["error"]["code"] == "target_not_found"


async def test_the_pages_escape_what_they_show(aiohttp_client, dsn, clock, smtp, telegram):
    client, world, app = await start(aiohttp_client, dsn, clock, smtp, telegram)
    token = "t" * 32
    await insert_target(
        dsn, world.account, "email", '<script>alert(1)</script>"@x.test', token=token
    )
    r = await client.get("/v1/unsubscribe", params={"token": token})
    page = await r.text()
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "default-src 'none'" in r.headers["Content-Security-Policy"]


# --- 9: rate limits, caps, and one account's failures ------------------------------------


async def test_alarm_writes_are_rate_limited_per_account_and_recipients_capped(
    aiohttp_client, dsn, clock, smtp, telegram
):
    client, world, app = await start(
        aiohttp_client, dsn, clock, smtp, telegram,
        alarm_write_rate_per_min=4, test_alarm_per_hour=2, recompute_per_hour=1, targets_max=3,
    )  # fmt: skip
    other = await make_world(dsn, app[CONFIG], ("fridge01",))
    h = world.auth
    codes = []
    for i in range(5):
        r = await client.post(
            "/v1/targets", json={"path": "email", "address": f"r{i}@example.test"}, headers=h
        )
        codes.append(r.status)
        last = r
    assert codes == [201, 201, 201, 409, 429]  # the cap at 3, then the write limit
    err = (await last.json())["error"]
    assert err["code"] == "rate_limited" and err["retry_after"] == int(last.headers["Retry-After"])
    # another account is not affected
    r = await client.post(
        "/v1/targets", json={"path": "email", "address": "o@example.test"}, headers=other.auth
    )
    assert r.status == 201
    clock.advance(minutes=1)
    assert [
        (await client.post("/v1/notifications/test", json={}, headers=h)).status for _ in range(3)
    ] == [200, 200, 429]
    cid = await ingest(client, world, clock, [4.0])
    assert [
        (await client.post(f"/v1/channels/{cid}/recompute", headers=h)).status for _ in range(2)
    ] == [202, 429]
    ch = await (await client.get(f"/v1/channels/{cid}", headers=h)).json()
    rule = ch["rules"][0]["id"]
    statuses = [
        (await client.patch(f"/v1/rules/{rule}", json={"grace_min": 5}, headers=h)).status
        for _ in range(5)
    ]
    assert statuses == [200, 200, 200, 200, 429]
    # a Telegram chat linking itself is a recipient too: not past the cap
    clock.advance(minutes=1)
    await link_telegram(client, world, 4242)
    assert telegram.sent()[-1]["text"].startswith("This OpenSense account has 3 recipients")
    n = await sql(
        dsn, "SELECT count(*) FROM notify_targets WHERE account_id = %s AND deleted_at IS NULL",
        world.account,
    )  # fmt: skip
    assert n == [(3,)]


class RefusingMailbox(Mailbox):
    """A relay that cannot reach one recipient domain right now (451 at RCPT)."""

    async def handle_RCPT(self, server, session, envelope, address, options):  # noqa: N802
        if address.endswith("@failing.test"):
            return "451 4.4.0 failing.test: temporary lookup failure"
        envelope.rcpt_tos.append(address)
        return "250 OK"


@pytest.fixture
def refusing_smtp() -> Any:
    box = RefusingMailbox()
    ctl = Controller(box, hostname="127.0.0.1", port=free_port())
    ctl.start()
    box.port = ctl.port  # type: ignore[attr-defined]
    yield box
    ctl.stop()


async def test_one_accounts_failing_recipients_do_not_open_the_service_incident(
    aiohttp_client, dsn, clock, refusing_smtp, telegram, endpoint
):
    # path health is service-wide: this test's database is its own (fixture `dsn`)
    client, world, app = await start(aiohttp_client, dsn, clock, refusing_smtp, telegram)
    await app[STATUS].pause()
    r = await client.post("/v1/targets", json={"path": "webhook", "address": endpoint.url + "/down"},
                          headers=world.auth)  # fmt: skip
    assert r.status == 201
    r = await client.post(
        "/v1/targets", json={"path": "email", "address": "cook@failing.test"}, headers=world.auth
    )
    await sql(
        dsn, "UPDATE notify_targets SET verified = true WHERE id = %s", (await r.json())["id"]
    )
    await ingest(client, world, clock, [9.0] * 20)
    await evaluate(app)
    for _ in range(9):  # nine minutes of the endpoint answering 503, the domain failing
        await send(app, client)
        clock.advance(minutes=1)
    log = await log_of(client, world)
    assert {(e["path"], e["status"]) for e in log} == {("webhook", "rejected"),
                                                      ("email", "rejected")}  # fmt: skip
    # a temporary refusal of the recipient is retried, not dropped
    pending = await sql(
        dsn, "SELECT count(*) FROM outbox WHERE status = 'pending' AND kind = 'alarm_opened'"
    )
    assert pending == [(2,)]
    assert await dispatch.check_paths(app[POOL], clock(), 3) == []
    await app[STATUS].tick()
    assert await sql(dsn, "SELECT condition FROM incidents") == []
    snap = await (await client.get("/status.json")).json()
    states = {c["id"]: c["state"] for c in snap["components"]}
    assert states["dispatch_webhook"] != "outage" and states["dispatch_email"] != "outage"

    # the same failures across three accounts point at our side: the incident opens
    worlds = [await make_world(dsn, app[CONFIG], ("fridge01",)) for _ in range(2)]
    now = clock()
    for w in worlds:
        for m in (7, 5, 3, 1):
            await sql(
                dsn,
                "INSERT INTO outbound_log (account_id, path, target, kind, status, at)"
                " VALUES (%s, 'webhook', 'https://x.example/', 'alarm_opened', 'rejected', %s)",
                w.account, now - timedelta(minutes=m),
            )  # fmt: skip
    await send(app, client)
    clock.advance(seconds=10)
    await app[STATUS].tick()
    assert await sql(dsn, "SELECT condition FROM incidents") == [("dispatch_failing:webhook",)]
