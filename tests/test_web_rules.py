"""The dashboard's configuration pages (issue 13): rules (a preset, the friendly
window form stored as an RRULE and shown in words, silences, recompute),
notifications (recipients, Telegram linking, escalation, the outbound log's
attempts) and the audit trail with its verification and latest signed checkpoint.
Roles, another account's ids, CSRF and bad input: the API's message next to the field,
and nothing changes."""

from __future__ import annotations

import html
import re
import secrets
from datetime import timedelta
from typing import Any

import psycopg
import pytest

from opensense.alarms.routes import rule_fields
from opensense.app import create_app
from opensense.audit import record
from opensense.audit import store as audit_store
from opensense.audit.merkle import root
from opensense.audit.note import Checkpoint, generate_key
from opensense.errors import ApiError
from opensense.web import store as web_store

from .fixtures.clock import FakeClock
from .fixtures.server import test_config
from .test_dashboard import csrf_of, make_account, unique_email

pytestmark = pytest.mark.db


@pytest.fixture
async def client(aiohttp_client: Any, dsn: str, clock: FakeClock, tmp_path: Any) -> Any:
    cfg = test_config(
        clock,
        auth_rate_per_min=10_000,
        alarm_write_rate_per_min=10_000,
        audit_signing_key=str(tmp_path / "signing.key"),
        audit_publish_dir=str(tmp_path / "published"),
    )
    return await aiohttp_client(create_app(cfg, dsn))


async def sql(dsn: str, query: str, *args: Any) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(query, args)
        return await cur.fetchall() if cur.description else []


async def user_of(dsn: str, account: str, role: str) -> str:
    """The account's owner (made with it), or a new user with `role`."""
    if role == "owner":
        return str((await sql(dsn, "SELECT id FROM users WHERE account_id = %s", account))[0][0])
    uid = "usr_" + secrets.token_hex(8)
    await sql(
        dsn,
        "INSERT INTO users (id, account_id, email, role) VALUES (%s, %s, %s, %s)",
        uid, account, unique_email(role), role,
    )  # fmt: skip
    return uid


async def sign_in_as(client: Any, dsn: str, clock: FakeClock, user_id: str) -> None:
    """A session made as the sign-in makes one (tests/test_dashboard.py mails the code)."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        sid = await web_store.create_session(conn, user_id, clock())
    client.session.cookie_jar.clear()
    client.session.cookie_jar.update_cookies({"os_session": sid})


async def tenant(dsn: str, tag: str) -> dict[str, str]:
    acc = await make_account(dsn, unique_email(tag), site=f"Site {tag}")
    acc["channel"] = (
        await sql(dsn, "SELECT id FROM channels WHERE device_id = %s", acc["device"])
    )[0][0]
    return acc


async def page(client: Any, path: str) -> tuple[str, str]:
    r = await client.get(path)
    text = await r.text()
    assert r.status == 200, text
    return text, csrf_of(text)


def field_error(text: str, form: str, name: str) -> str:
    m = re.search(rf'<p id="{form}-{name}-error" class="error">([^<]*)</p>', text)
    assert m, f"no message next to {form}-{name}"
    return html.unescape(m.group(1))


def api_message(body: dict[str, Any], kind: str = "range") -> str:
    with pytest.raises(ApiError) as e:
        rule_fields(body, kind, partial=True)
    return e.value.message


async def audit_rows(dsn: str, account: str) -> list[tuple[str, str]]:
    rows = await sql(
        dsn, "SELECT action, actor FROM audit_log WHERE account_id = %s ORDER BY seq", account
    )
    return [(r[0], r[1]) for r in rows]


async def rule_row(dsn: str, rule_id: str) -> tuple[Any, ...]:
    return (
        await sql(
            dsn,
            "SELECT params, grace_min, windows, severity, enabled FROM rules WHERE id = %s",
            rule_id,
        )
    )[0]


async def new_rule(client: Any, acc: dict[str, str], csrf: str, **over: str) -> Any:
    data = {
        "csrf": csrf, "channel_id": acc["channel"], "kind": "range", "ok_min": "-24",
        "ok_max": "-18", "grace_min": "30", "severity": "alarm", "enabled": "on", **over,
    }  # fmt: skip
    return await client.post("/rules/new", data=data, allow_redirects=False)


async def test_rule_from_a_preset_a_window_in_words_a_silence_and_recompute(client, dsn, clock):
    acc = await tenant(dsn, "preset")
    owner = await user_of(dsn, acc["account"], "owner")
    await sign_in_as(client, dsn, clock, owner)
    text, csrf = await page(client, "/rules")
    assert "Add a rule" in text and "preset:frozen:temperature" in text
    text, csrf = await page(
        client, f"/rules/new?channel_id={acc['channel']}&start=preset:frozen:temperature"
    )
    assert 'value="-24.0"' in text and 'value="-18.0"' in text and 'value="30"' in text
    r = await new_rule(client, acc, csrf, ok_min="-24.0", ok_max="-18.0")
    assert r.status == 303, await r.text()
    rule_id = r.headers["Location"].removeprefix("/rules/")
    params, grace, windows, severity, enabled = await rule_row(dsn, rule_id)
    assert params == {"ok_min": -24.0, "ok_max": -18.0} and grace == 30 and enabled
    # edit: every field of the form
    r = await client.post(
        f"/rules/{rule_id}",
        data={"csrf": csrf, "ok_min": "-25", "ok_max": "-15.5", "grace_min": "45",
              "clear_min": "", "renotify_min": "60", "severity": "warning", "enabled": "on"},
        allow_redirects=False,
    )  # fmt: skip
    assert r.status == 303, await r.text()
    params, grace, windows, severity, enabled = await rule_row(dsn, rule_id)
    assert params == {"ok_min": -25, "ok_max": -15.5} and grace == 45 and severity == "warning"
    # "daily defrost 22:00 for 30 min": the RRULE the API stores, shown in words
    r = await client.post(
        f"/rules/{rule_id}/windows",
        data={"csrf": csrf, "start": "22:00", "duration_min": "30", "during": "pause"},
        allow_redirects=False,
    )
    assert r.status == 303, await r.text()
    r = await client.post(
        f"/rules/{rule_id}/windows",
        data=[("csrf", csrf), ("days", "WE"), ("days", "MO"), ("start", "06:30"),
              ("duration_min", "90"), ("during", "limits"), ("ok_max", "12")],
        allow_redirects=False,
    )  # fmt: skip
    assert r.status == 303, await r.text()
    windows = (await rule_row(dsn, rule_id))[2]
    assert windows == [
        {"rrule": "FREQ=DAILY;BYHOUR=22;BYMINUTE=0", "duration_min": 30, "params": None},
        {"rrule": "FREQ=WEEKLY;BYDAY=MO,WE;BYHOUR=6;BYMINUTE=30", "duration_min": 90,
         "params": {"ok_max": 12}},
    ]  # fmt: skip
    text, csrf = await page(client, f"/rules/{rule_id}")
    assert "Every day at 22:00 for 30 min: rule paused" in text
    assert "Every Mon, Wed at 06:30 for 1 h 30 min: limits ok_max 12" in text
    assert "FREQ=" not in text
    r = await client.post(
        f"/rules/{rule_id}/windows/delete", data={"csrf": csrf, "n": "1"}, allow_redirects=False
    )
    assert r.status == 303 and len((await rule_row(dsn, rule_id))[2]) == 1
    # a silence until a local time of the channel's site (UTC here)
    until = (clock() + timedelta(hours=3)).strftime("%Y-%m-%dT%H:%M")
    r = await client.post(
        "/rules/silences",
        data={"csrf": csrf, "scope": f"channel:{acc['channel']}", "to": until,
              "reason": "fridge emptied for cleaning"},
        allow_redirects=False,
    )  # fmt: skip
    assert r.status == 303, await r.text()
    got = await sql(
        dsn, "SELECT channel_id, ends_at, reason FROM silences WHERE account_id = %s",
        acc["account"],
    )  # fmt: skip
    assert got == [(acc["channel"], clock() + timedelta(hours=3), "fridge emptied for cleaning")]
    text, _ = await page(client, "/rules")
    assert "fridge emptied for cleaning" in text and "Every day at 22:00 for 30 min" in text
    r = await client.post(f"/rules/{rule_id}/recompute", data={"csrf": csrf})
    assert r.status == 200 and "Recompute queued" in await r.text()
    # every change audited as the API audits it, the signed-in user the actor
    rows = [(a, who) for a, who in await audit_rows(dsn, acc["account"]) if who == owner]
    assert [a for a, _ in rows] == [
        "rule.create", "rule.update", "rule.update", "rule.update", "rule.update",
        "silence.create", "channel.recompute",
    ]  # fmt: skip


async def test_bad_input_gets_the_apis_message_next_to_the_field_and_changes_nothing(
    client, dsn, clock
):
    acc = await tenant(dsn, "bad")
    await sign_in_as(client, dsn, clock, await user_of(dsn, acc["account"], "manager"))
    _, csrf = await page(client, "/rules")
    r = await new_rule(client, acc, csrf)
    rule_id = r.headers["Location"].removeprefix("/rules/")
    before = (await rule_row(dsn, rule_id), await audit_rows(dsn, acc["account"]))
    good = {"csrf": csrf, "ok_min": "-24", "ok_max": "-18", "grace_min": "30",
            "severity": "alarm", "enabled": "on"}  # fmt: skip
    cases = [  # (url, changed fields, form, field, the API's message)
        (f"/rules/{rule_id}", {"grace_min": ""}, "rule", "grace_min",
         api_message({"grace_min": None})),
        (f"/rules/{rule_id}", {"grace_min": "x" * 5000}, "rule", "grace_min",
         api_message({"grace_min": "x"})),
        (f"/rules/{rule_id}", {"ok_min": "cold"}, "rule", "ok_min",
         api_message({"params": {"ok_min": "cold"}})),
        (f"/rules/{rule_id}", {"ok_min": "", "ok_max": ""}, "rule", "ok_min",
         api_message({"params": {}})),
        (f"/rules/{rule_id}", {"severity": "panic"}, "rule", "severity",
         api_message({"severity": "panic"})),
        (f"/rules/{rule_id}/windows", {"start": "22:00", "duration_min": "99999"}, "win",
         "duration_min", api_message({"windows": [{"rrule": "FREQ=DAILY", "duration_min": 99999}]})),
        (f"/rules/{rule_id}/windows", {"start": "25:00", "duration_min": "30"}, "win", "start",
         "start must be a time of day such as 22:00"),
        ("/rules/silences", {"scope": "account", "to": "2099-01-01T00:00", "reason": "x" * 501},
         "sil", "reason", "reason must be text of 1..500 characters"),
        ("/rules/silences", {"scope": "account", "to": "2000-01-01T00:00", "reason": "r"},
         "sil", "to", "to must be after from"),
        ("/rules/silences", {"scope": "account", "to": "soon", "reason": "r"},
         "sil", "to", "to must be an RFC 3339 time"),
        ("/notifications/recipients", {"path": "email", "address": "", "name": "n"}, "rcp",
         "address", "address must be text of 1..500 characters"),
        ("/notifications/recipients", {"path": "email", "address": "a@b.example",
         "name": "n\r\nBcc: x"}, "rcp", "name",
         "name may not contain line breaks or control characters"),
    ]  # fmt: skip
    for url, changed, form, name, message in cases:
        r = await client.post(url, data={**good, **changed}, allow_redirects=False)
        text = await r.text()
        assert r.status == 422, (url, changed, text[:300])
        assert field_error(text, form, name) == message, (url, changed)
    # a preset without a rule for the channel's measurement: said next to the field
    r = await client.get(
        f"/rules/new?channel_id={acc['channel']}&start=preset:server_room:humidity"
    )
    assert r.status == 422
    assert field_error(await r.text(), "add", "start") == (
        "start: the preset 'server_room' has no rule for temperature channels"
    )
    # a missing or empty CSRF token, and a body that is not a form
    r = await client.post(f"/rules/{rule_id}", data={**good, "csrf": ""})
    assert r.status == 403 and (await r.json())["error"]["code"] == "forbidden"
    r = await client.post(f"/rules/{rule_id}", data={k: v for k, v in good.items() if k != "csrf"})
    assert r.status == 403
    r = await client.post(f"/rules/{rule_id}", json=good)
    assert r.status == 400
    assert (await rule_row(dsn, rule_id), await audit_rows(dsn, acc["account"])) == before
    assert await sql(dsn, "SELECT 1 FROM silences WHERE account_id = %s", acc["account"]) == []
    assert (
        await sql(dsn, "SELECT 1 FROM notify_targets WHERE account_id = %s", acc["account"]) == []
    )


async def test_viewer_sees_but_is_refused_and_another_accounts_ids_are_404(client, dsn, clock):
    a, b = await tenant(dsn, "rolesa"), await tenant(dsn, "rolesb")
    await sign_in_as(client, dsn, clock, await user_of(dsn, a["account"], "owner"))
    _, csrf = await page(client, "/rules")
    r = await new_rule(client, a, csrf)
    rule_id = r.headers["Location"].removeprefix("/rules/")
    target = await sql(
        dsn,
        "INSERT INTO notify_targets (id, account_id, path, address, roles, verified)"
        " VALUES (%s, %s, 'email', 'a@x.example', '[]', true) RETURNING id",
        "tgt_" + secrets.token_hex(8), a["account"],
    )  # fmt: skip
    before = (await rule_row(dsn, rule_id), await audit_rows(dsn, a["account"]))
    edit = {"ok_min": "-30", "ok_max": "-18", "grace_min": "5", "severity": "alarm"}

    await sign_in_as(client, dsn, clock, await user_of(dsn, a["account"], "viewer"))
    text, csrf = await page(client, f"/rules/{rule_id}")
    assert "<fieldset disabled>" in text and "Add the window" not in text
    text, _ = await page(client, "/rules")
    assert "Add a rule" not in text and rule_id in text
    for url in (f"/rules/{rule_id}", "/rules/silences", "/notifications/recipients",
                f"/notifications/recipients/{target[0][0]}/delete", "/notifications/telegram",
                f"/rules/{rule_id}/recompute", f"/notifications/escalation/{a['site']}"):  # fmt: skip
        r = await client.post(url, data={"csrf": csrf, **edit})
        assert r.status == 403, url
        assert "manager role" in (await r.json())["error"]["message"]

    await sign_in_as(client, dsn, clock, await user_of(dsn, b["account"], "owner"))
    _, csrf = await page(client, "/rules")
    for url in (f"/rules/{rule_id}", f"/rules/new?channel_id={a['channel']}&start=kind:range"):
        r = await client.get(url)
        assert r.status == 404, url
    for url, data in (
        (f"/rules/{rule_id}", edit),
        (f"/rules/{rule_id}/windows", {"start": "22:00", "duration_min": "30"}),
        (f"/rules/{rule_id}/recompute", {}),
        ("/rules/new", {**edit, "channel_id": a["channel"], "kind": "range"}),
        ("/rules/silences", {"scope": f"channel:{a['channel']}", "to": "2099-01-01T00:00",
                             "reason": "r"}),
        ("/rules/silences", {"scope": f"site:{a['site']}", "to": "2099-01-01T00:00",
                             "reason": "r"}),
        (f"/notifications/recipients/{target[0][0]}/delete", {}),
        (f"/notifications/escalation/{a['site']}", {"delay_min_0": "0", "to_0": "everyone"}),
    ):  # fmt: skip
        r = await client.post(url, data={"csrf": csrf, **data})
        assert r.status == 404, (url, await r.text())
    text, _ = await page(client, "/rules")
    assert rule_id not in text and "Site rolesa" not in text
    assert (await rule_row(dsn, rule_id), await audit_rows(dsn, a["account"])) == before
    assert await sql(dsn, "SELECT deleted_at FROM notify_targets WHERE id = %s", target[0][0]) == [
        (None,)
    ]
    assert await sql(dsn, "SELECT 1 FROM silences WHERE account_id = %s", a["account"]) == []


async def test_notifications_recipients_telegram_escalation_and_the_outbound_log(
    client, dsn, clock
):
    a, b = await tenant(dsn, "nota"), await tenant(dsn, "notb")
    manager = await user_of(dsn, a["account"], "manager")
    await sign_in_as(client, dsn, clock, manager)
    text, csrf = await page(client, "/notifications")
    assert "Nothing sent yet" in text
    r = await client.post(
        "/notifications/recipients",
        data=[("csrf", csrf), ("path", "email"), ("address", "night@cafe.example"),
              ("name", "Night manager"), ("site_id", a["site"]), ("roles", "manager")],
    )  # fmt: skip
    text = await r.text()
    assert r.status == 201 and "A confirmation email is on its way" in text, text
    got = await sql(
        dsn, "SELECT path, address, name, site_id, roles FROM notify_targets WHERE account_id = %s",
        a["account"],
    )  # fmt: skip
    assert got == [("email", "night@cafe.example", "Night manager", a["site"], ["manager"])]
    r = await client.post("/notifications/telegram", data={"csrf": csrf, "site_id": a["site"]})
    text = await r.text()
    code = re.search(r"<code>/start ([0-9A-F]{8})</code>", text)
    assert r.status == 201 and code, text
    assert await sql(
        dsn, "SELECT account_id, site_id FROM telegram_link_codes WHERE code = %s", code[1]
    ) == [(a["account"], a["site"])]
    r = await client.post(
        f"/notifications/escalation/{a['site']}",
        data={"csrf": csrf, "delay_min_0": "0", "to_0": "on_shift", "delay_min_1": "15",
              "to_1": "manager"},
        allow_redirects=False,
    )  # fmt: skip
    assert r.status == 303, await r.text()
    assert await sql(
        dsn, "SELECT steps FROM escalation_policies WHERE site_id = %s", a["site"]
    ) == [([{"delay_min": 0, "to": "on_shift"}, {"delay_min": 15, "to": "manager"}],)]
    # the outbound log: each attempt's status, this account's only, a page at a time
    at = clock()
    rows = [
        (
            a["account"],
            "webhook",
            "https://hook.example/a",
            "alarm",
            "retry",
            503,
            "HTTP 503",
            1,
            at - timedelta(minutes=2),
        ),
        (
            a["account"],
            "webhook",
            "https://hook.example/a",
            "alarm",
            "ok",
            200,
            None,
            2,
            at - timedelta(minutes=1),
        ),
        (b["account"], "email", "secret-b@other.example", "alarm", "ok", None, None, 1, at),
    ]
    rows += [(a["account"], "email", f"bulk{i}@cafe.example", "reminder", "ok", None, None, 1,
              at - timedelta(hours=1, minutes=i)) for i in range(55)]  # fmt: skip
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        async with conn.cursor() as cur:
            await cur.executemany(
                "INSERT INTO outbound_log (account_id, path, target, kind, status, code, error,"
                " attempt, at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                sorted(rows, key=lambda x: x[-1]),
            )
    text, _ = await page(client, "/notifications")
    assert "retry (503)" in text and "HTTP 503" in text and "ok (200)" in text
    assert "secret-b@other.example" not in text
    first = set(re.findall(r"bulk\d+@", text))
    older = re.search(r'href="/notifications\?before=(\d+)#log"', text)
    assert len(first) == 48 and older
    text, _ = await page(client, f"/notifications?before={older[1]}")
    assert set(re.findall(r"bulk\d+@", text)) | first == {f"bulk{i}@" for i in range(55)}
    assert "?before=" not in text  # the last page
    assert [x for x, who in await audit_rows(dsn, a["account"]) if who == manager] == [
        "target.create",
        "telegram.link_code",
        "escalation.update",
    ]


async def test_audit_page_shows_this_account_only_with_verification_and_checkpoint(
    client, dsn, clock, tmp_path
):
    a, b = await tenant(dsn, "auda"), await tenant(dsn, "audb")
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for acc, what in ((a, "only-in-a"), (b, "only-in-b")):
            async with conn.transaction():
                await record(conn, account_id=acc["account"], actor="cli:test",
                             action="site.update", subject=what, data={"note": what}, at=clock())  # fmt: skip
        # a signed checkpoint of account a's trail, as the checkpoint job publishes it
        leaves = [r.leaf() async for r in audit_store.rows(conn, a["account"])]
    signer = generate_key(tmp_path / "signing.key", "opensense.test")
    cp = Checkpoint(f"opensense.test/{a['account']}", len(leaves), root(leaves))
    audit_store.Directory(tmp_path / "published").write(
        a["account"], cp.size, signer.sign(cp.text()), b"".join(leaves), 0
    )
    await sign_in_as(client, dsn, clock, await user_of(dsn, a["account"], "viewer"))
    text, csrf = await page(client, "/audit")
    assert "only-in-a" in text and "only-in-b" not in text and b["account"] not in text
    assert "Scheduled verification:" in text
    assert f"opensense.test/{a['account']}" in text and f"{len(leaves)} rows" in text
    assert html.escape(Checkpoint.text(cp).split("\n")[2]) in text
    r = await client.post("/audit/verify", data={"csrf": csrf})
    text = await r.text()
    assert r.status == 200 and "the chain is intact" in text, text
    assert "1 signed checkpoint(s) match" in text
    r = await client.post("/audit/verify", data={})
    assert r.status == 403


async def test_a_rule_of_a_kind_this_server_does_not_know_is_refused_not_a_500(client, dsn, clock):
    """A rule row of an unknown kind (written by another version): its page says so in
    the envelope (found by the isolation sweep with a fixture's made-up kind)."""
    acc = await tenant(dsn, "oddkind")
    await sign_in_as(client, dsn, clock, await user_of(dsn, acc["account"], "owner"))
    await sql(
        dsn,
        "INSERT INTO rules (id, channel_id, kind, params, grace_min)"
        " VALUES ('rul_oddkind0000001', %s, 'threshold', '{}', 15)",
        acc["channel"],
    )
    r = await client.get("/rules/rul_oddkind0000001")
    body = await r.json()
    assert r.status == 422 and body["error"]["code"] == "invalid_rule", body
    assert "threshold" in body["error"]["message"]
