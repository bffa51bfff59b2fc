"""The dashboard's scenarios of issue 13 in headless Chromium (tests/fixtures/browser.py):
a reading through the real ingest turns a card to alarm on an open overview without a
reload (phone); the alarm acknowledged with a note from the channel page and the note
found in the audit trail; a device token rotated; a device added; a rule's time window
added and shown in words; a viewer invited, signed in through the mail and refused
the acknowledgement (no form, a forged POST 403). One signed-in owner context serves
the desktop flows, in file order. Screenshots: tests/.artifacts/browser/flow-*.png."""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest

from opensense.api.jsonutil import rfc3339
from opensense.devices import store
from opensense.web.live import HUB

from .fixtures.browser import FAILED, VIEWPORTS, LiveServer, shot
from .fixtures.clock import FakeClock
from .fixtures.notify import Mailbox
from .fixtures.tenants import Tenant, make_tenant
from .test_browser import mail_for, sign_in

pytestmark = pytest.mark.db

LIVE_S = 10  # the most a pushed reading may take to change an open overview's card
HOT, COLD = 12.5, 4.0  # °C: the chilled_storage preset's range alarms above 8


@pytest.fixture(scope="module")
def tenant(live_server: LiveServer, live_clock: FakeClock, dsn: str) -> Tenant:
    return live_server.run(make_tenant(dsn, "flw", live_clock()))


def post_json(url: str, body: Any, token: str) -> tuple[int, Any]:
    req = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=15) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@dataclass
class Probe:
    """A device of the tenant with its ingest token, and the channel its first reading
    made (the preset's range rule set to no grace: the alarm comes with the reading)."""

    device: str
    local_id: str
    token: str
    channel: str = ""
    hot_sent: bool = False


def ingest(server: LiveServer, probe: Probe, value: float, ts: Any) -> dict[str, Any]:
    body = {
        "device": probe.local_id,
        "measurements": [{"type": "temperature", "value": value, "ts": rfc3339(ts)}],
    }
    status, answer = post_json(f"{server.url}/v1/ingest", body, probe.token)
    assert status == 200, answer
    return answer


@pytest.fixture(scope="module")
def probe(live_server: LiveServer, live_clock: FakeClock, dsn: str, tenant: Tenant) -> Probe:
    local_id = f"probe-{tenant.tag}"

    async def make() -> Probe:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            dev, token = await store.create_device(
                conn,
                tenant.account,
                {"site_id": tenant.id("site"), "local_id": local_id, "name": f"Probe {tenant.tag}"},
                4,
                live_clock(),
            )
        return Probe(dev["id"], local_id, token)

    p = live_server.run(make())
    answer = ingest(live_server, p, COLD, live_clock() - timedelta(minutes=1))
    p.channel = answer["channels"][0]["channel_id"]

    async def no_grace() -> None:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            cur = await conn.execute(
                "UPDATE rules SET grace_min = 0 WHERE channel_id = %s AND kind = 'range'",
                (p.channel,),
            )
            assert cur.rowcount == 1  # the vertical's preset rule, made with the channel

    live_server.run(no_grace())
    return p


def make_alarm(server: LiveServer, clock: FakeClock, probe: Probe) -> None:
    """The hot reading, once per module."""
    if not probe.hot_sent:
        ingest(server, probe, HOT, clock() + timedelta(seconds=30))
        probe.hot_sent = True


def db_one(server: LiveServer, dsn: str, sql: str, args: tuple[Any, ...]) -> Any:
    async def q() -> Any:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            cur = await conn.execute(sql, args)
            return await cur.fetchone()

    return server.run(q())


def open_event(server: LiveServer, dsn: str, channel: str) -> str:
    """The id of the channel's open alarm, waiting for the rule engine."""
    deadline = time.monotonic() + LIVE_S
    while True:
        row = db_one(
            server, dsn, "SELECT id FROM events WHERE channel_id = %s AND cleared_at IS NULL",
            (channel,),
        )  # fmt: skip
        if row:
            return str(row[0])
        assert time.monotonic() < deadline, "no alarm event"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def owner(
    browser: Any, live_server: LiveServer, live_mail: Mailbox, tenant: Tenant
) -> Iterator[Any]:
    """The owner signed in once at the desktop's size: a page every desktop flow reuses."""
    ctx = browser.new_context(viewport=VIEWPORTS["desktop"], base_url=live_server.url)
    ctx.set_default_timeout(15_000)
    yield sign_in(ctx, live_mail, tenant.owner_email, "link")
    ctx.close()


@pytest.fixture(autouse=True)
def shot_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    """The module's shared owner page, saved when a flow fails (the harness saves the
    function-scoped contexts' pages itself)."""
    yield
    if request.node.stash.get(FAILED, False) and "owner" in request.fixturenames:
        name = re.sub(r"[^A-Za-z0-9]+", "-", request.node.name).strip("-")
        shot(request.getfixturevalue("owner"), f"failed-{name}-desktop-owner")


def test_flow_alarm_arrives_live_on_the_phone(
    phone, live_server, live_mail, live_clock, tenant, probe
):
    page = sign_in(phone, live_mail, tenant.owner_email, "code")
    card = page.locator(f'li[data-channel="{probe.channel}"]')
    assert card.get_attribute("class") in ("state-ok", "state-none")  # judged or not yet
    assert not card.locator('[data-f="open"]').is_visible()
    page.evaluate("window.__notReloaded = true")  # gone if the page were loaded again
    hub = live_server.app[HUB]
    deadline = time.monotonic() + LIVE_S
    while tenant.account not in hub.streams:  # the page's event stream is open
        assert time.monotonic() < deadline, "the overview opened no event stream"
        time.sleep(0.02)
    started = time.monotonic()
    make_alarm(live_server, live_clock, probe)
    page.locator(f'li[data-channel="{probe.channel}"].state-alarm').wait_for(timeout=LIVE_S * 1000)
    took = time.monotonic() - started
    assert took < LIVE_S
    assert page.evaluate("window.__notReloaded === true"), "the overview was reloaded"
    assert card.locator('[data-f="status"]').inner_text() == "alarm"
    assert card.locator('[data-f="open"]').inner_text() == "1 open alarm"
    assert card.locator('[data-f="value"]').inner_text() == f"{HOT:.1f} °C"
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    shot(page, "flow-alarm-live-phone")


def test_flow_acknowledge_with_a_note_then_find_it_in_the_audit(
    owner, live_server, live_clock, dsn, tenant, probe
):
    make_alarm(live_server, live_clock, probe)
    event = open_event(live_server, dsn, probe.channel)
    page = owner
    page.goto(f"/channels/{probe.channel}")
    form = page.locator(f'form[action="/channels/{probe.channel}/events/{event}/ack"]')
    note, cause = f"Door ajar {tenant.tag}", "Delivery left the door open"
    action, product = "Door closed, seal checked", "Core temperature 6.1 °C: kept"
    form.get_by_label("Note (required)").fill(note)
    form.get_by_label("Cause").fill(cause)
    form.get_by_label("Action on the equipment").fill(action)
    form.get_by_label("Action on the product").fill(product)
    form.get_by_role("button", name="Acknowledge").click()
    page.wait_for_url(re.compile(r"#events$"))
    shown = page.locator(f"#evt-{event}")
    assert shown.locator(".badge").inner_text() == "acknowledged"
    text = shown.locator(".note").first.inner_text()
    for part in (f"by {tenant.owner_email}: {note}", cause, action, product):
        assert part in text, text
    assert page.locator(f'form[action="/channels/{probe.channel}/events/{event}/ack"]').count() == 0
    shot(page, "flow-ack-note-desktop")
    page.goto("/audit")
    row = page.locator("table.trail tbody tr", has_text=note)
    assert row.count() == 1
    cells = row.locator("td").all_inner_texts()
    assert cells[2] == tenant.owner_email and cells[4] == event, cells
    # the row is longer than the list shows: the whole of it is one click away
    assert product not in cells[5]
    row.locator("summary").click()
    full = row.locator("details code").last
    assert full.is_visible()
    for part in (note, cause, action, product):
        assert json.dumps(part, ensure_ascii=False) in full.inner_text()
    shot(page, "flow-ack-audit-desktop")


def test_flow_rotate_a_device_token(owner, live_server, live_clock, tenant):
    page = owner
    dev = tenant.id("dev")
    page.goto(f"/devices/{dev}")
    assert page.locator("#token-value").count() == 0
    page.get_by_role("button", name="Rotate token").click()
    page.get_by_role("heading", name="New ingest token (shown once)").wait_for()
    token = page.locator("#token-value").inner_text().strip()
    assert token.startswith("ds_live_"), token
    shot(page, "flow-rotate-token-desktop")
    # the new token is the device's: it ingests (the device's local id in the body)
    local_id = f"node-{tenant.tag}"
    body = {
        "device": local_id,
        "measurements": [{"type": "humidity", "value": 50, "ts": rfc3339(live_clock())}],
    }
    status, answer = post_json(f"{live_server.url}/v1/ingest", body, token)
    assert status == 200, answer
    # shown once: the device page again has no token
    page.goto(f"/devices/{dev}")
    assert page.locator("#token-value").count() == 0
    assert token not in page.content()


def test_flow_add_a_node(owner, live_server, live_clock, tenant):
    page = owner
    page.goto("/devices/new")
    name, local_id = f"Walk-in {tenant.tag}", f"walkin-{tenant.tag}"
    page.get_by_label("Name").fill(name)
    page.get_by_label("Local id").fill(local_id)
    page.get_by_label("OpenSense node").check()
    page.get_by_role("button", name="Add the device").click()
    page.get_by_role("heading", name=f"{name} is added").wait_for()
    config = json.loads(page.locator("#paste-config").inner_text())
    assert config["local_id"] == local_id and config["account"] == tenant.account
    assert "opensense node flash node.json" in page.locator("#paste-commands").inner_text()
    shot(page, "flow-add-device-desktop")
    # the pasted token is the new device's own
    body = {
        "device": local_id,
        "measurements": [{"type": "temperature", "value": 3.5, "ts": rfc3339(live_clock())}],
    }
    status, answer = post_json(f"{live_server.url}/v1/ingest", body, config["token"])
    assert status == 200, answer
    page.get_by_role("link", name="Go to the device").click()
    page.get_by_role("heading", name=name).wait_for()
    assert urlsplit(page.url).path == f"/devices/{config['device_id']}"


def test_flow_add_a_time_window_to_a_rule(owner, tenant):
    page = owner
    page.goto(f"/rules/{tenant.id('rul')}")
    assert page.get_by_text("No windows.").is_visible()
    page.get_by_label("Starts at").fill("22:00")
    page.get_by_label("For (minutes)").fill("30")
    page.get_by_label("Pause the rule").check()
    page.get_by_role("button", name="Add the window").click()
    words = "Every day at 22:00 for 30 min: rule paused"
    page.locator("ul.windows li", has_text=words).wait_for()
    assert page.locator("ul.windows li").count() == 1
    shot(page, "flow-rule-window-desktop")
    # stored as the RRULE the engine reads
    page.goto(f"/rules/{tenant.id('rul')}")
    assert page.locator("ul.windows li", has_text=words).count() == 1


def test_flow_invited_viewer_cannot_acknowledge(
    owner, browser, live_server, live_mail, live_clock, dsn, tenant, probe
):
    page = owner
    invitee = f"guest-{tenant.tag}@example.com"
    page.goto("/account")
    page.get_by_label("Email address").fill(invitee)
    page.get_by_label("Role", exact=True).select_option("viewer")
    page.get_by_role("button", name="Invite").click()
    page.get_by_text(f"{invitee} is invited as viewer").wait_for()
    shot(page, "flow-invite-desktop")

    ctx = browser.new_context(viewport=VIEWPORTS["desktop"], base_url=live_server.url)
    try:
        # the invitation mail itself: its link signs the viewer in
        _, link = mail_for(live_mail, invitee, 1)
        viewer = ctx.new_page()
        viewer.goto(link)
        viewer.get_by_role("button", name="Sign in to OpenSense").click()
        viewer.get_by_role("heading", name="Overview").wait_for()
        assert viewer.get_by_text(f"{invitee} (viewer)").is_visible()
        make_alarm(live_server, live_clock, probe)
        event = open_event(live_server, dsn, probe.channel)
        viewer.goto(f"/channels/{probe.channel}")
        viewer.locator(f"#evt-{event}").wait_for()
        assert viewer.locator("form[action*='/events/']").count() == 0
        assert viewer.get_by_role("button", name="Acknowledge").count() == 0
        assert viewer.get_by_role("button", name="Clear").count() == 0
        shot(viewer, "flow-viewer-no-ack-desktop")
        # a forged POST with the viewer's own session and CSRF token is refused
        csrf = viewer.locator("input[name=csrf]").first.get_attribute("value")
        before = db_one(
            live_server, dsn, "SELECT state, acknowledged_at, cleared_at FROM events WHERE id = %s",
            (event,),
        )  # fmt: skip
        for what in ("ack", "clear"):
            answer = ctx.request.post(
                f"/channels/{probe.channel}/events/{event}/{what}",
                form={"csrf": csrf, "note": "forged", "cause": "forged"},
                max_redirects=0,
            )
            assert answer.status == 403, (what, answer.status, answer.text()[:300])
        after = db_one(
            live_server, dsn, "SELECT state, acknowledged_at, cleared_at FROM events WHERE id = %s",
            (event,),
        )  # fmt: skip
        assert after == before
    finally:
        ctx.close()
