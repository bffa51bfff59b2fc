"""The dashboard's devices and account pages (issue 13): each page for its role and
refused below it, token rotation shown once with the old token failing at once, the
paste text of each kind of new device, invitations through a real SMTP capture, role
changes in the audit trail, the export ZIP holding one account's data and none of
another's, and bad input answered with the API's words while nothing changes."""

from __future__ import annotations

import io
import json
import re
import secrets
import zipfile
from datetime import timedelta
from typing import Any

import psycopg
import pytest

from opensense.devices import store
from opensense.node.flash import config_problems
from opensense.storage import packing
from opensense.storage.write import to_us
from opensense.web import store as web_store
from opensense.web.account import LAST_OWNER, ROLE_INVALID
from opensense.web.routes import EMAIL_INVALID

from .fixtures.clock import FakeClock
from .test_dashboard import code_and_link, csrf_of, mail_to, web_client  # noqa: F401

ROLES = ("viewer", "operator", "manager", "owner")


def unique(tag: str) -> str:
    return f"{tag}-{secrets.token_hex(4)}"


async def make_tenant(dsn: str, clock: FakeClock, tag: str) -> dict[str, Any]:
    """An account with two sites, a device with a channel and a reading, and a user of
    each role (the owner is the account's login email)."""
    t: dict[str, Any] = {"users": {}}
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        async with conn.transaction():
            owner = f"{unique(tag + '-owner')}@example.com"
            acc = await store.create_account(conn, unique(tag), owner)
            s1 = await store.create_site(conn, acc, {"name": unique(tag + " Kitchen")})
            s2 = await store.create_site(conn, acc, {"name": unique(tag + " Cellar")})
            dev, tok = await store.create_device(
                conn,
                acc,
                {"site_id": s1["id"], "local_id": "fridge01", "name": unique(tag + " Fridge")},
                4,
                clock() - timedelta(hours=1),
            )
            cid, num = "chn_" + secrets.token_hex(8), None
            cur = await conn.execute(
                "INSERT INTO channels (id, sensor_id, account_id, device_id, kind, unit, name)"
                " VALUES (%s, %s, %s, %s, 'temperature', '°C', 'probe') RETURNING num",
                (cid, "snr_" + secrets.token_hex(8), acc, dev["id"]),
            )
            num = (await cur.fetchone())[0]
            for kind, label, unit, value in (
                ("signal", "wifi", "dBm", -61.0),
                ("health", "queue_depth", "1", 7.0),
                ("health", "uptime", "s", 93784.0),
            ):
                cur = await conn.execute(
                    "INSERT INTO channels (id, sensor_id, account_id, device_id, kind, label,"
                    " unit, name) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) RETURNING num",
                    (
                        "chn_" + secrets.token_hex(8),
                        "snr_" + secrets.token_hex(8),
                        acc,
                        dev["id"],
                        kind,
                        label,
                        unit,
                        f"{kind} {label}",
                    ),
                )
                aux = (await cur.fetchone())[0]
                await conn.execute(
                    "INSERT INTO measurements (channel_num, ts, value) VALUES (%s, %s, %s)",
                    (aux, clock() - timedelta(minutes=1), value),
                )
            await conn.execute(
                "INSERT INTO measurements (channel_num, ts, value) VALUES (%s, %s, 4.25)",
                (num, clock() - timedelta(minutes=2)),
            )
            # a packed day (storage/compaction.py): the export decodes it
            day = (clock() - timedelta(days=2)).replace(hour=0, minute=0)
            ts = [to_us(day + timedelta(hours=h)) for h in (1, 2)]
            await conn.execute(
                "INSERT INTO measurements_packed (channel_num, day, n, blob) VALUES (%s, %s, 2, %s)",
                (num, day.date(), packing.pack(ts, [3.5, 3.75])),
            )
            await conn.execute(
                "UPDATE devices SET fw_version = '1.4.2' WHERE id = %s", (dev["id"],)
            )
            t["users"]["owner"] = (await web_store.user_for_email(conn, owner), owner)
            for role in ROLES[:3]:
                email = f"{unique(tag + '-' + role)}@example.com"
                uid = "usr_" + secrets.token_hex(8)
                await conn.execute(
                    "INSERT INTO users (id, account_id, email, role) VALUES (%s, %s, %s, %s)",
                    (uid, acc, email, role),
                )
                t["users"][role] = (web_store.User(uid, acc, email, role), email)
    t.update(account=acc, site=s1, site2=s2, device=dev, token=tok, channel=cid, owner=owner)
    return t


async def as_user(client: Any, dsn: str, tenant: dict[str, Any], role: str) -> None:
    """Sign `client` in as the tenant's user of `role` (a session made directly: the
    mailed sign-in itself is tested in test_dashboard.py and by the invitation below)."""
    user = tenant["users"][role][0]
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        sid = await web_store.create_session(conn, user.id, tenant["clock"]())
    client.session.cookie_jar.clear()
    client.session.cookie_jar.update_cookies({"os_session": sid}, client.make_url("/"))


@pytest.fixture
async def web(web_client: Any) -> Any:  # noqa: F811
    """The dashboard's test app (tests/test_dashboard.py: mail to the SMTP capture)."""
    return web_client


@pytest.fixture
async def two(dsn: str, clock: FakeClock) -> tuple[dict[str, Any], dict[str, Any]]:
    a = await make_tenant(dsn, clock, "a")
    b = await make_tenant(dsn, clock, "b")
    a["clock"] = b["clock"] = clock
    return a, b


async def page(client: Any, path: str) -> tuple[int, str]:
    r = await client.get(path, allow_redirects=False)
    return r.status, await r.text()


async def post(client: Any, path: str, data: dict[str, str], csrf_from: str = "/devices") -> Any:
    _, html = await page(client, csrf_from)
    return await client.post(path, data={"csrf": csrf_of(html), **data}, allow_redirects=False)


async def one(dsn: str, sql: str, *args: Any) -> Any:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(sql, args)
        row = await cur.fetchone()
        return None if row is None else (row[0] if len(row) == 1 else row)


async def test_each_page_for_its_role_and_refused_below(web, dsn, two):
    a, _ = two
    dev = a["device"]["id"]
    assert (await page(web, "/devices"))[0] == 303  # not signed in: to the sign-in page
    for role in ROLES:
        await as_user(web, dsn, a, role)
        status, html = await page(web, "/devices")
        assert status == 200 and a["device"]["name"] in html and f"/devices/{dev}" in html
        assert ('href="/devices/new"' in html) == (role in ("manager", "owner"))
        status, html = await page(web, f"/devices/{dev}")
        assert status == 200
        # health: RSSI, queue depth, uptime, firmware, last seen
        for shown in ("-61 dBm", "Queue depth</dt><dd>7 ", "1 d 2 h 3 min", "1.4.2"):
            assert shown in html, (role, shown)
        assert ("/identify" in html) == (role != "viewer")
        assert ("/rotate-token" in html) == (role in ("manager", "owner"))
        assert ("/move" in html) == (role in ("manager", "owner"))
        status, html = await page(web, "/account")
        assert status == 200 and a["owner"] in html
        assert ('action="/account/users"' in html) == (role == "owner")
        assert ("/account/export" in html) == (role == "owner")
        new = (await page(web, "/devices/new"))[0]
        assert new == (200 if role in ("manager", "owner") else 403), role
        r = await web.get("/account/export", allow_redirects=False)
        await r.read()
        assert r.status == (200 if role == "owner" else 403), role
        # a POST above the role is refused and changes nothing
        if role in ("viewer", "operator"):
            before = await one(dsn, "SELECT count(*) FROM tokens WHERE device_id = %s", dev)
            r = await post(web, f"/devices/{dev}/rotate-token", {})
            assert r.status == 403
            assert (await r.json())["error"]["code"] == "forbidden"
            after = await one(dsn, "SELECT count(*) FROM tokens WHERE device_id = %s", dev)
            assert before == after
        if role == "viewer":
            r = await post(web, f"/devices/{dev}/identify", {})
            assert r.status == 403


async def test_rotate_shows_the_token_once_and_the_old_one_stops_at_once(web, dsn, two, clock):
    a, _ = two
    dev = a["device"]["id"]

    async def ingest(token: str) -> int:
        body = {
            "device": "fridge01",
            "ts": clock().isoformat(),
            "measurements": [{"type": "temperature", "value": 4.0}],
        }
        r = await web.post("/v1/ingest", json=body, headers={"Authorization": f"Bearer {token}"})
        return r.status

    assert await ingest(a["token"]) == 200
    await as_user(web, dsn, a, "manager")
    r = await post(web, f"/devices/{dev}/rotate-token", {})
    html = await r.text()
    assert r.status == 200
    shown = re.findall(r"ds_live_[A-Za-z0-9_\-]+", html)
    assert len(set(shown)) == 1
    new = shown[0]
    assert await ingest(a["token"]) == 401  # the old one: refused on its very next request
    assert await ingest(new) == 200
    assert "ds_live_" not in (await page(web, f"/devices/{dev}"))[1]  # shown once
    actions = await one(
        dsn,
        "SELECT array_agg(action ORDER BY seq) FROM audit_log WHERE account_id = %s",
        a["account"],
    )
    assert "device.rotate_token" in actions


async def test_add_device_ends_with_what_to_paste_for_each_kind(web, dsn, two):
    a, _ = two
    await as_user(web, dsn, a, "manager")
    site = a["site"]["id"]

    async def add(kind: str, local_id: str, **more: str) -> str:
        data = {"site_id": site, "name": f"New {kind}", "local_id": local_id, "kind": kind}
        r = await post(web, "/devices/new", {**data, **more}, csrf_from="/devices/new")
        html = await r.text()
        assert r.status == 201, html
        return html

    import html as htmllib

    # the node: a config that `opensense node check` finds nothing wrong with
    out = htmllib.unescape(await add("node", "node07"))
    m = re.search(r'<pre class="paste" id="paste-config">(.*?)</pre>', out, re.S)
    assert m, out
    config = json.loads(m.group(1))
    assert config["account"] == a["account"] and config["local_id"] == "node07"
    assert config["device_id"].startswith("dev_") and config["token"].startswith("ds_live_")
    assert config_problems(config) == []
    assert "opensense node flash node.json --ca ca.der" in out
    # Shelly: the action URL works as it stands (substituted as the device would)
    out = htmllib.unescape(await add("shelly", "shelly07"))
    m = re.search(r'id="paste-url">(http\S+?)</pre>', out)
    assert m, out
    url = m.group(1)
    path = (
        url[url.index("/v1/ingest/shelly") :].replace("${ev.tC}", "4.5").replace("${ev.rh}", "60")
    )
    r = await web.get(path)
    assert r.status == 200, await r.text()
    # LoRaWAN: the webhook URL; a manager gets no whk_ token (an owner's), an owner one
    out = htmllib.unescape(await add("lorawan", "ttn07", dev_eui="70b3d57ed0000001"))
    assert "/v1/ingest/lorawan" in out and "an owner makes on the Account page" in out
    assert not re.search(r"whk_\w", out)
    assert "70B3D57ED0000001" in out
    await as_user(web, dsn, a, "owner")
    out = htmllib.unescape(await add("lorawan", "ttn08"))
    m = re.search(r'id="paste-header">Bearer (whk_\w+)</pre>', out)
    assert m, out
    r = await web.post("/v1/ingest/lorawan", json={}, headers={"Authorization": f"Bearer {m[1]}"})
    assert r.status != 401, await r.text()  # the token is taken (the empty body is not)
    n = await one(
        dsn,
        "SELECT count(*) FROM devices WHERE account_id = %s AND local_id IN"
        " ('node07', 'shelly07', 'ttn07', 'ttn08')",
        a["account"],
    )
    assert n == 4


async def test_invited_viewer_signs_in_and_may_only_look(web, dsn, two, smtp):
    a, _ = two
    await as_user(web, dsn, a, "owner")
    email = f"{unique('invitee')}@example.com"
    r = await post(web, "/account/users", {"email": email.upper(), "role": "viewer"}, "/account")
    assert r.status == 200 and f"{email} is invited as viewer" in await r.text()
    code, _ = code_and_link(await mail_to(smtp, email))
    uid = await one(dsn, "SELECT id FROM users WHERE email = %s", email)
    # the invitee signs in with the mailed code, in a browser of its own
    web.session.cookie_jar.clear()
    r = await web.get("/auth/login")
    r = await web.post("/auth/login", data={"csrf": csrf_of(await r.text()), "email": email})
    html = await r.text()
    # asking again voided the invitation's code: the newest mail has the code to use
    code, _ = code_and_link(await mail_to(smtp, email, 2))
    r = await web.post(
        "/auth/code",
        data={"csrf": csrf_of(html), "email": email, "code": code},
        allow_redirects=False,
    )
    assert r.status == 303
    status, html = await page(web, "/account")
    assert status == 200 and f"{email} (viewer)" in html
    assert 'action="/account/users"' not in html and "/account/tokens" not in html
    status, html = await page(web, f"/devices/{a['device']['id']}")
    assert status == 200 and "/identify" not in html and "/rotate-token" not in html
    r = await post(web, f"/devices/{a['device']['id']}/identify", {})
    assert r.status == 403  # a viewer takes no action
    r = await post(web, "/account/users", {"email": "x@example.com", "role": "owner"}, "/account")
    assert r.status == 403
    # the owner makes the viewer an operator: in the trail with from and to
    await as_user(web, dsn, a, "owner")
    r = await post(web, f"/account/users/{uid}/role", {"role": "operator"}, "/account")
    assert r.status == 200
    rows = await one(
        dsn,
        "SELECT array_agg(jsonb_build_array(action, actor, subject, data) ORDER BY seq)"
        " FROM audit_log WHERE account_id = %s AND action LIKE 'user.%%'",
        a["account"],
    )
    owner_id = a["users"]["owner"][0].id
    assert rows == [
        ["user.invite", owner_id, uid, {"email": email, "role": "viewer"}],
        ["user.role", owner_id, uid, {"email": email, "from": "viewer", "to": "operator"}],
    ]


async def test_an_account_keeps_one_owner_and_removal_ends_sessions(web, dsn, two):
    a, _ = two
    owner = a["users"]["owner"][0]
    await as_user(web, dsn, a, "owner")
    for path, data in (
        (f"/account/users/{owner.id}/role", {"role": "manager"}),
        (f"/account/users/{owner.id}/remove", {}),
    ):
        r = await post(web, path, data, "/account")
        assert r.status == 409 and LAST_OWNER in await r.text()
    assert await one(dsn, "SELECT role FROM users WHERE id = %s", owner.id) == "owner"
    viewer = a["users"]["viewer"][0]
    await as_user(web, dsn, a, "viewer")
    viewer_cookie = web.session.cookie_jar.filter_cookies(web.make_url("/"))["os_session"].value
    await as_user(web, dsn, a, "owner")
    r = await post(web, f"/account/users/{viewer.id}/remove", {}, "/account")
    assert r.status == 200
    assert await one(dsn, "SELECT count(*) FROM users WHERE id = %s", viewer.id) == 0
    web.session.cookie_jar.update_cookies({"os_session": viewer_cookie}, web.make_url("/"))
    assert (await page(web, "/account"))[0] == 303  # its session ended with it
    assert "user.remove" in await one(
        dsn, "SELECT array_agg(action) FROM audit_log WHERE account_id = %s", a["account"]
    )


async def test_export_holds_the_account_and_nothing_of_another(web, dsn, two):
    a, b = two
    await as_user(web, dsn, a, "owner")
    r = await post(web, "/account/tokens", {"kind": "ua_live", "name": "export-check"}, "/account")
    html = await r.text()
    assert r.status == 200 and len(re.findall(r"ua_live_\w+", html)) == 1  # shown once
    r = await web.get("/account/export")
    assert r.status == 200 and r.headers["Content-Type"] == "application/zip"
    data = await r.read()
    zf = zipfile.ZipFile(io.BytesIO(data))
    names = set(zf.namelist())
    for part in (
        "sites",
        "devices",
        "channels",
        "readings",
        "events",
        "rules",
        "recipients",
        "audit_trail",
    ):
        assert {f"{part}.csv", f"{part}.json"} <= names
    everything = b"".join(zf.read(n) for n in names).decode()
    for mine in (a["account"], a["site"]["name"], a["device"]["id"], a["owner"], a["channel"]):
        assert mine in everything
    for theirs in (b["account"], b["site"]["name"], b["device"]["id"], b["owner"], b["channel"]):
        assert theirs not in everything
    readings = json.loads(zf.read("readings.json"))
    mine = sorted(x["value"] for x in readings if x["channel_id"] == a["channel"])
    assert mine == [3.5, 3.75, 4.25]  # two from a packed day, one raw
    assert "ua_live_" not in everything and "$2b$" not in everything  # no secret
    audit = json.loads(zf.read("audit_trail.json"))
    assert audit[-1]["action"] == "account.export" and len(audit[0]["hash"]) == 64
    csv_sites = zf.read("sites.csv").decode().splitlines()
    assert csv_sites[0].startswith("id,") and len(csv_sites) == 3


async def test_bad_input_is_named_in_the_apis_words_and_changes_nothing(web, dsn, two):
    a, b = two
    dev = a["device"]["id"]
    await as_user(web, dsn, a, "owner")

    async def devices() -> int:
        return await one(dsn, "SELECT count(*) FROM devices WHERE account_id = %s", a["account"])

    n, users = await devices(), await one(dsn, "SELECT count(*) FROM users")
    site = a["site"]["id"]
    good = {"site_id": site, "name": "Bar fridge", "local_id": "bar01", "kind": "node"}
    for field, value, status, message in (
        ("name", "", 400, "name must be a non-empty string of at most 200 characters"),
        ("name", "x" * 201, 400, "name must be a non-empty string of at most 200 characters"),
        ("local_id", "", 400, "local_id must be 1-64 characters"),
        ("local_id", "fridge01", 409, "a device with local_id 'fridge01' already exists"),
        ("kind", "toaster", 400, "kind must be one of node, shelly, shelly_gen3, lorawan"),
        ("dev_eui", "12", 400, "dev_eui must be 16 hexadecimal digits"),
        ("site_id", b["site"]["id"], 404, f"no site {b['site']['id']!r} in this account"),
    ):
        r = await post(web, "/devices/new", {**good, field: value}, "/devices/new")
        html = await r.text()
        assert r.status == status, (field, html)
        m = re.search(rf'<p id="{field}-error" class="error">([^<]*)</p>', html)
        assert m and message in m.group(1).replace("&#39;", "'"), (field, html)
    r = await web.post("/devices/new", data=good, allow_redirects=False)  # no CSRF token
    assert r.status == 403
    r = await web.post("/devices/new", data={**good, "csrf": "0" * 64}, allow_redirects=False)
    assert r.status == 403
    assert await devices() == n
    # another account's ids: 404, nothing moves, rotates or changes
    r = await post(web, f"/devices/{dev}/move", {"site_id": b["site2"]["id"]})
    assert r.status == 404 and "no site" in await r.text()
    assert await one(dsn, "SELECT site_id FROM devices WHERE id = %s", dev) == site
    theirs = b["device"]["id"]
    assert (await page(web, f"/devices/{theirs}"))[0] == 404
    for path in (f"/devices/{theirs}/rotate-token", f"/devices/{theirs}/move"):
        r = await post(web, path, {"site_id": a["site2"]["id"]})
        assert r.status == 404
    assert await one(dsn, "SELECT site_id FROM devices WHERE id = %s", theirs) == b["site"]["id"]
    b_owner = b["users"]["owner"][0].id
    r = await post(web, f"/account/users/{b_owner}/role", {"role": "viewer"}, "/account")
    assert r.status == 404
    r = await post(web, f"/account/users/{b_owner}/remove", {}, "/account")
    assert r.status == 404
    assert await one(dsn, "SELECT role FROM users WHERE id = %s", b_owner) == "owner"
    # invitations and tokens: the same words as the API's
    for data, field, message in (
        ({"email": "not-an-email", "role": "viewer"}, "email", EMAIL_INVALID),
        ({"email": "a" * 250 + "@x.com", "role": "viewer"}, "email", EMAIL_INVALID),
        ({"email": "new@example.com", "role": "boss"}, "role", ROLE_INVALID),
        ({"email": a["owner"], "role": "viewer"}, "email", "is a user of this account already"),
    ):
        r = await post(web, "/account/users", data, "/account")
        html = await r.text()
        m = re.search(rf'<p id="{field}-error" class="error">([^<]*)</p>', html)
        assert r.status in (400, 409) and m and message in m.group(1), html
    assert await one(dsn, "SELECT count(*) FROM users") == users
    for data, field, message in (
        ({"kind": "ds_live", "name": "x"}, "kind", "kind must be ua_live or whk"),
        ({"kind": "whk", "name": "n" * 201}, "name", "name must be a string of at most 200"),
    ):
        r = await post(web, "/account/tokens", data, "/account")
        html = await r.text()
        m = re.search(rf'<p id="{field}-error" class="error">([^<]*)</p>', html)
        assert r.status == 400 and m and message in m.group(1), html
    b_token = await one(dsn, "SELECT id FROM tokens WHERE account_id = %s", b["account"])
    r = await post(web, f"/account/tokens/{b_token}/revoke", {}, "/account")
    assert r.status == 404
    assert await one(dsn, "SELECT revoked_at FROM tokens WHERE id = %s", b_token) is None
    assert await one(dsn, "SELECT count(*) FROM users") == users
