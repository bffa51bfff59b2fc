"""The dashboard (issue 13, part one): sign-in by mailed code and by link through a
real SMTP capture (aiosmtpd), the CSRF tokens, the rate limit on /auth, the security
headers, no enumeration, and one account's overview showing nothing of another's."""

from __future__ import annotations

import asyncio
import re
import secrets
from typing import Any

import psycopg
import pytest

from opensense.api.keys import CONFIG
from opensense.app import create_app
from opensense.web.ctx import web_ctx
from opensense.web.mail import link_in_log_refused

from .fixtures.clock import FakeClock
from .fixtures.server import test_config

CSRF_RE = re.compile(r'name="csrf" value="([^"]+)"')


def csrf_of(html: str) -> str:
    m = CSRF_RE.search(html)
    assert m, html
    return m.group(1)


async def make_account(dsn: str, email: str, site: str = "Bakery") -> dict[str, str]:
    """An account (its login email its owner) with a site, a device and one reading."""
    from opensense.devices import store

    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        async with conn.transaction():
            acc = await store.create_account(conn, site, email)
            s = await store.create_site(
                conn, acc, {"name": site, "vertical": "chilled_storage", "timezone": "UTC"}
            )
            from datetime import UTC, datetime

            dev, _ = await store.create_device(
                conn, acc, {"site_id": s["id"], "local_id": "fridge01"}, 4, datetime.now(UTC)
            )
        await conn.execute(
            "INSERT INTO channels (id, sensor_id, account_id, device_id, kind, unit, name)"
            " VALUES (%s, %s, %s, %s, 'temperature', '°C', %s)",
            (
                "chn_" + secrets.token_hex(8),
                "snr_" + secrets.token_hex(8),
                acc,
                dev["id"],
                f"{site} fridge",
            ),
        )
    return {"account": acc, "site": s["id"], "device": dev["id"]}


def unique_email(tag: str) -> str:
    return f"{tag}-{secrets.token_hex(4)}@example.com"


@pytest.fixture
async def web_client(aiohttp_client: Any, dsn: str, clock: FakeClock, smtp: Any) -> Any:
    cfg = test_config(
        clock,
        smtp_host="127.0.0.1",
        smtp_port=smtp.port,
        smtp_tls="none",
        auth_rate_per_min=10_000,
    )
    return await aiohttp_client(create_app(cfg, dsn))


async def mail_to(smtp: Any, email: str, n: int = 1) -> Any:
    for _ in range(200):
        got = smtp.to(email)
        if len(got) >= n:
            return got[n - 1]
        await asyncio.sleep(0.02)
    raise AssertionError(f"no mail number {n} to {email}")


def code_and_link(msg: Any) -> tuple[str, str]:
    text = msg.get_payload(decode=True).decode()
    code = re.search(r"^ {4}([A-Z0-9]{6})\s*$", text, re.M)
    link = re.search(r"(http\S+/auth/link\?t=\S+)", text)
    assert code and link, text
    return code.group(1), link.group(1)


async def ask(client: Any, email: str) -> tuple[int, str]:
    r = await client.get("/auth/login")
    assert r.status == 200
    r = await client.post("/auth/login", data={"csrf": csrf_of(await r.text()), "email": email})
    return r.status, await r.text()


async def sign_in_with_code(client: Any, smtp: Any, email: str, n: int = 1) -> str:
    status, html = await ask(client, email)
    assert status == 200, html
    code, _ = code_and_link(await mail_to(smtp, email, n))
    r = await client.post(
        "/auth/code",
        data={"csrf": csrf_of(html), "email": email, "code": code.lower()},
        allow_redirects=False,
    )
    assert r.status == 303 and r.headers["Location"] == "/", await r.text()
    return code


async def audit_actions(dsn: str, account: str) -> list[str]:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT action FROM audit_log WHERE account_id = %s ORDER BY seq", (account,)
        )
        return [r[0] for r in await cur.fetchall()]


async def test_sign_in_with_the_mailed_code(web_client, smtp, dsn):
    email = unique_email("owner")
    acc = await make_account(dsn, email)
    r = await web_client.get("/", allow_redirects=False)
    assert r.status == 303 and r.headers["Location"] == "/auth/login"
    await sign_in_with_code(web_client, smtp, email)
    cookie = [c for c in web_client.session.cookie_jar if c.key == "os_session"][0]
    assert cookie["httponly"] and cookie["samesite"] == "Lax"
    assert int(cookie["max-age"]) == 30 * 86400
    assert not cookie["secure"]  # served over plain http here
    r = await web_client.get("/")
    html = await r.text()
    assert r.status == 200 and "Bakery fridge" in html and email in html
    assert (await audit_actions(dsn, acc["account"]))[-2:] == ["auth.link_issued", "auth.login"]
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT u.role FROM users u WHERE u.account_id = %s AND u.email = %s",
            (acc["account"], email),
        )
        assert await cur.fetchone() == ("owner",)
        # only hashes are stored: no row holds the cookie's value
        cur = await conn.execute(
            "SELECT count(*) FROM sessions WHERE id_hash = %s", (cookie.value.encode(),)
        )
        assert await cur.fetchone() == (0,)


async def test_sign_in_through_the_link(web_client, smtp, dsn):
    email = unique_email("link")
    acc = await make_account(dsn, email)
    status, _ = await ask(web_client, email)
    assert status == 200
    _, link = code_and_link(await mail_to(smtp, email))
    path = link[link.index("/auth/link") :]
    r = await web_client.get(path)  # a page with a button: fetching it signs nobody in
    html = await r.text()
    assert r.status == 200 and 'action="/auth/link"' in html
    assert (await web_client.get("/", allow_redirects=False)).status == 303
    t = re.search(r'name="t" value="([^"]+)"', html)
    assert t
    r = await web_client.post(
        "/auth/link", data={"csrf": csrf_of(html), "t": t.group(1)}, allow_redirects=False
    )
    assert r.status == 303
    assert (await web_client.get("/", allow_redirects=False)).status == 200
    assert (await audit_actions(dsn, acc["account"]))[-1] == "auth.login"
    # the link works once
    r = await web_client.post(
        "/auth/link", data={"csrf": csrf_of(html), "t": t.group(1)}, allow_redirects=False
    )
    assert r.status == 422 and "does not work any more" in await r.text()


async def test_expired_reused_and_voided_codes_are_refused(web_client, smtp, dsn, clock):
    email = unique_email("expiry")
    await make_account(dsn, email)

    async def try_code(html: str, code: str) -> int:
        r = await web_client.post(
            "/auth/code",
            data={"csrf": csrf_of(html), "email": email, "code": code},
            allow_redirects=False,
        )
        return r.status

    # expired: 10 minutes and a second later
    _, html = await ask(web_client, email)
    code, _ = code_and_link(await mail_to(smtp, email, 1))
    clock.advance(minutes=10, seconds=1)
    assert await try_code(html, code) == 422
    # voided by a newer request
    _, html = await ask(web_client, email)
    old, _ = code_and_link(await mail_to(smtp, email, 2))
    _, html = await ask(web_client, email)
    new, _ = code_and_link(await mail_to(smtp, email, 3))
    if old != new:
        assert await try_code(html, old) == 422
    # the newest works, once
    assert await try_code(html, new) == 303
    assert await try_code(html, new) == 422
    # five wrong codes void the code
    _, html = await ask(web_client, email)
    code, _ = code_and_link(await mail_to(smtp, email, 4))
    for _ in range(5):
        assert await try_code(html, "WRONG1") == 422
    assert await try_code(html, code) == 422


async def test_missing_or_replayed_csrf_token_is_refused_and_changes_nothing(
    web_client, aiohttp_client, smtp, dsn, clock
):
    email = unique_email("csrf")
    acc = await make_account(dsn, email)
    # no token, or another browser's: no code issued, no mail
    r = await web_client.get("/auth/login")
    token = csrf_of(await r.text())
    r = await web_client.post("/auth/login", data={"email": email})
    assert r.status == 403 and (await r.json())["error"]["code"] == "forbidden"
    other = await aiohttp_client(web_client.server)  # a second browser on the same server
    await other.get("/auth/login")
    r = await other.post("/auth/login", data={"csrf": token, "email": email})
    assert r.status == 403
    await asyncio.sleep(0.2)
    assert smtp.to(email) == []
    assert "auth.link_issued" not in await audit_actions(dsn, acc["account"])
    # signed in: sign-out-everywhere with a token of before, of another session, or none
    await sign_in_with_code(web_client, smtp, email)
    html = await (await web_client.get("/")).text()
    mine = csrf_of(html)
    assert mine != token  # bound to the session now, not to the pre-session cookie
    for bad in ({}, {"csrf": token}, {"csrf": mine + "0"}):
        r = await web_client.post("/auth/logout-all", data=bad, allow_redirects=False)
        assert r.status == 403, bad
    assert (await web_client.get("/", allow_redirects=False)).status == 200
    assert (await audit_actions(dsn, acc["account"]))[-1] == "auth.login"
    # the right token signs out everywhere; kept afterwards, it is refused
    r = await web_client.post("/auth/logout-all", data={"csrf": mine}, allow_redirects=False)
    assert r.status == 303
    assert (await audit_actions(dsn, acc["account"]))[-1] == "auth.logout_all"
    assert (await web_client.get("/", allow_redirects=False)).status == 303


async def test_sign_out_everywhere_ends_every_session(web_client, aiohttp_client, smtp, dsn):
    email = unique_email("everywhere")
    await make_account(dsn, email)
    await sign_in_with_code(web_client, smtp, email)
    phone = await aiohttp_client(web_client.server)
    await sign_in_with_code(phone, smtp, email, n=2)
    html = await (await phone.get("/")).text()
    r = await phone.post("/auth/logout-all", data={"csrf": csrf_of(html)}, allow_redirects=False)
    assert r.status == 303
    assert (await web_client.get("/", allow_redirects=False)).status == 303


async def test_a_session_ends_after_30_days_without_a_request(web_client, smtp, dsn, clock):
    email = unique_email("idle")
    await make_account(dsn, email)
    await sign_in_with_code(web_client, smtp, email)
    clock.advance(days=29)
    assert (await web_client.get("/", allow_redirects=False)).status == 200
    clock.advance(days=29)  # 29 days after the last request: still on
    assert (await web_client.get("/", allow_redirects=False)).status == 200
    clock.advance(days=30, seconds=1)
    assert (await web_client.get("/", allow_redirects=False)).status == 303


async def test_another_accounts_user_sees_none_of_its_sites(web_client, smtp, dsn):
    a_email, b_email = unique_email("a"), unique_email("b")
    await make_account(dsn, a_email, site="Butcher A")
    await make_account(dsn, b_email, site="Pharmacy B")
    await sign_in_with_code(web_client, smtp, b_email)
    html = await (await web_client.get("/")).text()
    assert "Pharmacy B fridge" in html
    assert "Butcher A" not in html and a_email not in html


async def test_same_answer_for_an_unknown_email(web_client, smtp, dsn):
    known, unknown = unique_email("known"), unique_email("nobody")
    await make_account(dsn, known)
    answers = []
    for email in (known, unknown):
        r = await web_client.post("/v1/auth/request", json={"email": email})
        answers.append((r.status, await r.json()))
        status, html = await ask(web_client, email)
        answers.append((status, html.replace(email, "EMAIL")))
    assert answers[0] == answers[2] and answers[1][0] == answers[3][0] == 200
    assert csrf_of(answers[1][1]) and answers[1][1] == answers[3][1]
    await mail_to(smtp, known, 2)
    assert smtp.to(unknown) == []
    r = await web_client.post("/v1/auth/request", json={"email": "not an email"})
    assert r.status == 400 and (await r.json())["error"]["code"] == "invalid_request"


async def test_auth_is_rate_limited_per_ip(aiohttp_client, dsn, clock):
    # a minute of its own: the counters are shared with the other tests' requests
    clock.advance(days=secrets.randbelow(3000) + 1)
    client = await aiohttp_client(create_app(test_config(clock), dsn))
    statuses = [(await client.get("/auth/login")).status for _ in range(10)]
    assert statuses == [200] * 10
    r = await client.post("/v1/auth/request", json={"email": "x@example.com"})
    assert r.status == 429
    body = await r.json()
    assert body["error"]["code"] == "rate_limited" and int(r.headers["Retry-After"]) >= 1
    # behind the proxy on this host, each client its own count
    r = await client.get("/auth/login", headers={"X-Forwarded-For": "203.0.113.7"})
    assert r.status == 200
    clock.advance(minutes=1)
    assert (await client.get("/auth/login")).status == 200


async def test_session_and_form_cookies_are_secure_over_tls(aiohttp_client, dsn, clock, smtp):
    cfg = test_config(
        clock,
        public_url="https://cold.example.com",
        smtp_host="127.0.0.1",
        smtp_port=smtp.port,
        smtp_tls="none",
        auth_rate_per_min=10_000,
    )
    client = await aiohttp_client(create_app(cfg, dsn))
    r = await client.get("/auth/login")
    cookie = r.cookies["os_pre"]
    assert cookie["secure"] and cookie["httponly"] and cookie["samesite"] == "Strict"


async def test_security_headers_on_every_page(web_client, smtp, dsn):
    email = unique_email("headers")
    await make_account(dsn, email)
    await sign_in_with_code(web_client, smtp, email)
    for path in ("/", "/auth/login", "/auth/link?t=nothing", "/static/dashboard.css"):
        r = await web_client.get(path)
        assert r.status == 200, path
        csp = r.headers["Content-Security-Policy"]
        assert "frame-ancestors 'none'" in csp and "'unsafe-inline'" not in csp, path
        assert "script-src 'self'" in csp and "default-src 'none'" in csp
        assert r.headers["X-Frame-Options"] == "DENY"
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        assert r.headers["Referrer-Policy"] == "no-referrer"
        if path != "/static/dashboard.css":
            html = await r.text()
            # scripts only as files of this server (CSP script-src 'self'), never inline
            scripts = re.findall(r"<script([^>]*)>(.*?)</script>", html, re.S)
            assert all(' src="/static/' in a and not body.strip() for a, body in scripts)
            assert " style=" not in html and "<style" not in html
            assert 'name="viewport"' in html
    # a refusal in the envelope carries them too
    r = await web_client.post("/auth/logout", data={})
    assert r.status == 403 and r.headers["X-Frame-Options"] == "DENY"
    # the API's own routes are not the pages': their headers are the API's
    r = await web_client.get("/healthz")
    assert "Content-Security-Policy" not in r.headers


def test_production_without_smtp_refuses_to_start_unless_told(clock):
    prod = test_config(clock, public_url="https://cold.example.com")
    assert link_in_log_refused(prod) is not None
    assert "OPENSENSE_LOGIN_LINK_IN_LOG" in (link_in_log_refused(prod) or "")
    assert (
        link_in_log_refused(
            test_config(clock, public_url="https://cold.example.com", login_link_in_log=True)
        )
        is None
    )
    assert (
        link_in_log_refused(test_config(clock, public_url="https://x.example", smtp_host="mx"))
        is None
    )
    assert link_in_log_refused(test_config(clock)) is None  # the demo: http://127.0.0.1


async def test_production_without_smtp_does_not_start(dsn, clock):
    # the dashboard's context, as the app's startup runs it
    app = create_app(test_config(clock, public_url="https://cold.example.com"), dsn)
    with pytest.raises(RuntimeError, match="OPENSENSE_SMTP_HOST"):
        await web_ctx(app).__anext__()


async def test_without_smtp_the_link_is_in_the_log_marked(aiohttp_client, dsn, clock, caplog):
    email = unique_email("demo")
    await make_account(dsn, email)
    client = await aiohttp_client(create_app(test_config(clock, auth_rate_per_min=10_000), dsn))
    caplog.set_level("WARNING", logger="opensense.web.mail")
    r = await client.post("/v1/auth/request", json={"email": email})
    assert r.status == 200

    def lines() -> list[str]:
        return [x.getMessage() for x in caplog.records if x.name == "opensense.web.mail"]

    for _ in range(100):
        if lines():
            break
        await asyncio.sleep(0.02)
    line = lines()[0]
    assert line.startswith("*** SIGN-IN LINK")
    assert email in line and "/auth/link?t=" in line


async def test_a_form_in_another_encoding_is_refused_in_the_envelope(web_client):
    for ctype in ("multipart/form-data", "application/json"):  # the former: no boundary
        r = await web_client.post(
            "/auth/login", data=b"csrf=&email=a%40b.com", headers={"Content-Type": ctype}
        )
        assert r.status == 400, ctype
        assert (await r.json())["error"]["code"] == "invalid_request"


async def test_housekeeping_sweeps_idle_sessions_and_expired_codes(web_client, smtp, dsn, clock):
    from opensense.jobs import JOBS

    email = unique_email("sweep")
    acc = await make_account(dsn, email)
    await sign_in_with_code(web_client, smtp, email)
    await ask(web_client, email)  # a pending code, too
    job = next(j for j in JOBS if j.name == "housekeeping")

    async def left() -> tuple[Any, ...]:
        async with await psycopg.AsyncConnection.connect(dsn) as conn:
            cur = await conn.execute(
                "SELECT (SELECT count(*) FROM sessions s JOIN users u ON u.id = s.user_id"
                "  WHERE u.account_id = %s),"
                " (SELECT count(*) FROM login_codes WHERE email = %s)",
                (acc["account"], email),
            )
            row = await cur.fetchone()
            assert row is not None
            return tuple(row)

    async def run() -> None:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            await job.run(conn, web_client.app[CONFIG], clock())

    await run()
    assert await left() == (1, 1)
    clock.advance(minutes=11)
    await run()
    assert await left() == (1, 0)
    clock.advance(days=30)
    await run()
    assert await left() == (0, 0)
