"""The dashboard in headless Chromium (Playwright; tests/fixtures/browser.py) at a
phone's 360x740 and a desktop's 1280x800: sign-in through the mail a real SMTP server
received, sign out everywhere, and axe-core (axe-playwright-python) on the sign-in
pages, every page the navigation reaches and the pages those link to; none may scroll
sideways either. The pages come from the navigation as served (web/session.py NAV),
so a page added later is checked without an edit here.
Screenshots: tests/.artifacts/browser/."""

from __future__ import annotations

import re
import time
from datetime import timedelta
from html import unescape
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest
from aiohttp import web
from axe_playwright_python.sync_playwright import Axe

from opensense.storage import write
from opensense.web.session import NAV

from .fixtures.browser import LiveServer, shot
from .fixtures.clock import FakeClock
from .fixtures.notify import Mailbox
from .fixtures.tenants import Tenant, make_tenant, new_id

pytestmark = pytest.mark.db

VIEWPORTS = ("phone", "desktop")
# axe-core's impacts a page must not have (minor and moderate are reported, not failed)
BLOCKING = {"serious", "critical"}
MAX_PAGES = 40  # a crawl bound: the dashboard has a dozen kinds of page
LINK_RE = re.compile(r'<a\s[^>]*?href="([^"]*)"')


@pytest.fixture(scope="module")
def tenant(live_server: LiveServer, live_clock: FakeClock, dsn: str) -> Tenant:
    return live_server.run(make_tenant(dsn, "brw", live_clock()))


@pytest.fixture(scope="module")
def axe() -> Axe:
    return Axe()


def mail_for(box: Mailbox, email: str, n: int) -> tuple[str, str]:
    """The code and the link of the `n`th mail to `email`, read from the SMTP capture."""
    deadline = time.monotonic() + 15
    while len(box.to(email)) < n:
        assert time.monotonic() < deadline, f"no mail number {n} to {email}"
        time.sleep(0.02)
    text = box.to(email)[n - 1].get_payload(decode=True).decode()  # type: ignore[union-attr]
    code = re.search(r"^ {4}([A-Z0-9]{6})\s*$", text, re.M)
    link = re.search(r"(http\S+/auth/link\?t=\S+)", text)
    assert code and link, text
    return code.group(1), link.group(1)


def ask_for_mail(page: Any, email: str, keyboard: bool = False) -> None:
    page.goto("/auth/login")
    if keyboard:  # the keyboard alone: the skip link first, then on to the field
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.textContent") == "Skip to the page"
        for _ in range(10):
            if page.evaluate("document.activeElement.id") == "email":
                break
            page.keyboard.press("Tab")
        page.keyboard.type(email)
        page.keyboard.press("Enter")
    else:
        page.get_by_label("Email address").fill(email)
        page.get_by_role("button", name="Send me a code").click()
    page.get_by_role("heading", name="Enter your code").wait_for()


def sign_in(ctx: Any, box: Mailbox, email: str, via: str = "code", keyboard: bool = False) -> Any:
    """A page of `ctx` signed in as `email` through the mail, on the overview."""
    page = ctx.new_page()
    n = len(box.to(email)) + 1
    ask_for_mail(page, email, keyboard)
    code, link = mail_for(box, email, n)
    if via == "code":
        page.get_by_label("Code").fill(code)
        page.get_by_role("button", name="Sign in").click()
    else:
        page.goto(link)
        page.get_by_role("button", name="Sign in to OpenSense").click()
    page.get_by_role("heading", name="Overview").wait_for()
    assert urlsplit(page.url).path == "/"
    return page


@pytest.mark.parametrize("viewport", VIEWPORTS)
def test_sign_in_through_the_mail(request, viewport, live_mail, tenant):
    ctx = request.getfixturevalue(viewport)
    page = ctx.new_page()
    page.goto("/")
    assert urlsplit(page.url).path == "/auth/login"  # no session: sent to sign in
    shot(page, f"login-{viewport}")
    # the phone types the code, the desktop follows the link, asked for by keyboard
    via = "code" if viewport == "phone" else "link"
    page = sign_in(ctx, live_mail, tenant.owner_email, via, keyboard=viewport == "desktop")
    assert page.get_by_text(f"Chiller {tenant.tag}").is_visible()
    assert page.get_by_text(f"{tenant.owner_email} (owner)").is_visible()
    shot(page, f"overview-{viewport}")
    # nothing scrolls sideways at this width
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")


def test_sign_out_everywhere(phone, desktop, live_mail, tenant):
    on_phone = sign_in(phone, live_mail, tenant.viewer_email, "code")
    on_desktop = sign_in(desktop, live_mail, tenant.viewer_email, "link")
    on_phone.get_by_role("button", name="Sign out everywhere").click()
    on_phone.get_by_role("heading", name="Sign in").wait_for()
    on_desktop.reload()
    assert urlsplit(on_desktop.url).path == "/auth/login"
    assert not desktop.request.get("/", max_redirects=0).ok  # 303 to the sign-in page


def blocking(axe: Axe, page: Any) -> list[str]:
    """axe-core's serious and critical violations on `page`, one line each."""
    found = axe.run(page).response["violations"]
    return [
        f"{urlsplit(page.url).path}: {v['id']} ({v['impact']}): {v['help']}"
        f" at {[n['target'] for n in v['nodes']][:3]}"
        for v in found
        if v["impact"] in BLOCKING
    ]


def nav_paths(app: web.Application) -> list[str]:
    """The navigation's pages this app serves (as web/session.py `nav` shows them)."""
    served = {r.canonical for r in app.router.resources() if isinstance(r, web.PlainResource)}
    return [href for href, _ in NAV if href in served]


def crawl(page: Any, start: list[str]) -> list[str]:
    """Every same-site HTML page reachable from `start` through links, in visit order:
    the navigation's pages and what they link to (a channel, a device...), bounded. A
    path is visited once, with the first query string found for it (a chart's other
    ranges render the same page)."""
    pages: list[str] = []
    seen: set[str] = set()
    queue = list(start)
    while queue:
        path = queue.pop(0)
        if urlsplit(path).path in seen:
            continue
        seen.add(urlsplit(path).path)
        assert len(seen) <= MAX_PAGES, f"more than {MAX_PAGES} pages: raise MAX_PAGES"
        answer = page.context.request.get(path)  # the browser's cookies, no rendering
        if not answer.headers.get("content-type", "").startswith("text/html"):
            continue  # a download (an export, a CSV)
        pages.append(path)
        for href in LINK_RE.findall(answer.text()):
            target = urlsplit(unescape(href))
            if not target.netloc and target.path.startswith("/") and target.path not in seen:
                if not target.path.startswith(("/static/", "/auth/")):
                    queue.append(target.path + (f"?{target.query}" if target.query else ""))
    return pages


def test_the_accessibility_check_finds_what_it_is_for(desktop, axe):
    page = desktop.new_page()
    page.set_content(
        '<!doctype html><html lang="en"><head><title>t</title></head><body><main>'
        '<img src="/x.png"><button></button><p class="c">faint</p></main></body></html>'
    )
    page.add_style_tag(content=".c { color: #eee; background: #fff; }")
    found = " ".join(blocking(axe, page))
    assert "image-alt" in found and "button-name" in found and "color-contrast" in found


@pytest.mark.parametrize("viewport", VIEWPORTS)
def test_every_page_is_accessible_and_fits_the_screen(
    request, viewport, live_server, live_mail, tenant, axe
):
    ctx = request.getfixturevalue(viewport)
    email = tenant.owner_email
    problems: list[str] = []
    page = ctx.new_page()

    def check(name: str) -> None:
        problems.extend(blocking(axe, page))
        # phone first: the page itself never scrolls sideways (a wide table may, inside)
        if not page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"):
            problems.append(f"{urlsplit(page.url).path}: wider than the {viewport}'s screen")
        shot(page, f"{name}-{viewport}")

    # the sign-in pages: the form, the code entry, a wrong code, a link, a dead link
    page.goto("/auth/login")
    check("a11y-login")
    n = len(live_mail.to(email)) + 1
    ask_for_mail(page, email)
    check("a11y-code")
    code, link = mail_for(live_mail, email, n)
    page.get_by_label("Code").fill("WRONG2")
    page.get_by_role("button", name="Sign in").click()
    page.locator("#code-error").wait_for()
    check("a11y-code-wrong")
    page.goto("/auth/link?t=no-such-link")
    check("a11y-link-dead")
    page.goto(link)
    check("a11y-link")
    page.get_by_role("button", name="Sign in to OpenSense").click()
    page.get_by_role("heading", name="Overview").wait_for()
    # the navigation shows exactly the pages of NAV the app serves
    expected = nav_paths(live_server.app)
    shown = page.locator("nav[aria-label=Main] a").evaluate_all(
        "links => links.map(a => a.getAttribute('href'))"
    )
    assert shown == expected
    for path in crawl(page, expected):
        page.goto(path)
        assert urlsplit(page.url).path == urlsplit(path).path, f"{path} sent the browser away"
        name = "a11y-" + (re.sub(r"[^a-z0-9]+", "-", path.lower()).strip("-") or "overview")
        check(name)
    assert not problems, "axe-core found:\n" + "\n".join(problems)


async def _one_reading_channel(dsn: str, tenant: Tenant, now: Any) -> str:
    """A channel of the tenant's device with one reading three hours ago and a range
    rule made an hour after it: the chart has one bucket, older than the rule."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        chn = new_id("chn")
        cur = await conn.execute(
            "INSERT INTO channels (id, sensor_id, account_id, device_id, kind, label, unit,"
            " name) VALUES (%s, %s, %s, %s, 'temperature', 'new', '°C', %s) RETURNING num",
            (chn, new_id("snr"), tenant.account, tenant.id("dev"), f"New probe {tenant.tag}"),
        )
        row = await cur.fetchone()
        assert row is not None
        async with conn.transaction():
            rows = [(row[0], now - timedelta(hours=3), 5.0)]
            await write.insert_readings(conn, rows, now=now, compact_after_days=3)
        await conn.execute(
            "INSERT INTO rules (id, channel_id, kind, params, created_at)"
            " VALUES (%s, %s, 'range', '{\"ok_min\": 2, \"ok_max\": 8}', %s)",
            (new_id("rul"), chn, now - timedelta(hours=2)),
        )
    return chn


LIMIT_PIXELS_JS = """canvas => {
  // the limits' dashed red (#b3261e), drawn opaque; the alarm bands are the same red at
  // 15 % opacity and are left out by the alpha test
  const d = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  let n = 0;
  for (let i = 0; i < d.length; i += 4)
    if (d[i + 3] > 160 && Math.abs(d[i] - 179) < 40 && d[i + 1] < 90 && d[i + 2] < 90) n++;
  return n;
}"""


def test_a_chart_of_one_bucket_draws_its_limits(
    desktop, live_server, live_mail, live_clock, tenant, dsn
):
    # The limits are drawn from the rule's making to the range's end, whatever the
    # buckets: they were sampled at the buckets' times only, so a chart whose buckets
    # all came before the rule (here its only one) drew none.
    chn = live_server.run(_one_reading_channel(dsn, tenant, live_clock()))
    page = sign_in(desktop, live_mail, tenant.owner_email)
    page.goto(f"/channels/{chn}?range=24h")
    canvas = page.locator("#chart canvas")
    canvas.wait_for()
    shot(page, "chart-one-bucket")
    width = canvas.evaluate("c => c.width")
    # two limits over the last 2 of 24 hours, dashed (6 on, 4 off): ~2 × 0.6 × 1/12 of
    # the plot's width painted; none before
    painted = canvas.evaluate(LIMIT_PIXELS_JS)
    assert width * 0.05 < painted < width * 0.2
