"""The dashboard's reports page (issue 18 item 1): an operator asks for a report of a
site's month, the app's renderer claims and renders it, and the page's download link
gives the PDF whose SHA-256 is the report's. A viewer sees the list but is refused the
form; a bad month, a month not over and an unknown template get their message next to
the field and store nothing; another account's report is 404.

The site is made now, so last month is an empty month: each render well under a
second. The renderer claims only this test's report (`only`): other apps on the same
database cannot take it, nor this one theirs."""

from __future__ import annotations

import hashlib
import html
import re
from typing import Any

import pytest

from opensense.api.keys import REPORTS
from opensense.app import create_app
from opensense.errors import ApiError
from opensense.reports import store as rstore
from opensense.reports.runner import Renderer
from opensense.web.reports import last_month

from .fixtures.clock import FakeClock
from .fixtures.server import test_config
from .test_dashboard import make_account, unique_email
from .test_web_rules import page, sign_in_as, sql, user_of

pytestmark = pytest.mark.db


@pytest.fixture
async def client(aiohttp_client: Any, dsn: str, clock: FakeClock) -> Any:
    cfg = test_config(clock, report_workers=0, alarms_enabled=False)
    return await aiohttp_client(create_app(cfg, dsn))


def field_error(text: str, name: str) -> str:
    m = re.search(rf'<p id="{name}-error" class="error">([^<]*)</p>', text)
    assert m, f"no message next to {name}"
    return html.unescape(m.group(1))


async def reports_of(dsn: str, account: str) -> list[tuple[Any, ...]]:
    return await sql(
        dsn,
        "SELECT id, site_id, template, period_from::text, period_to::text, language, status,"
        " created_by FROM reports WHERE account_id = %s ORDER BY created_at",
        account,
    )


async def test_operator_asks_renderer_renders_page_link_downloads(
    client: Any, dsn: str, clock: FakeClock
) -> None:
    acc = await make_account(dsn, unique_email("rep"), site="Reports kitchen")
    operator = await user_of(dsn, acc["account"], "operator")
    await sign_in_as(client, dsn, clock, operator)
    text, csrf = await page(client, "/reports")
    assert 'action="/reports"' in text and "No reports yet." in text
    month = last_month(clock().date())
    r = await client.post(
        "/reports",
        data={
            "csrf": csrf,
            "site_id": acc["site"],
            "template": "haccp_monthly",
            "month": month,
            "language": "de",
        },  # fmt: skip
        allow_redirects=False,
    )
    assert r.status == 303 and r.headers["Location"] == "/reports", await r.text()
    [row] = await reports_of(dsn, acc["account"])
    rid = row[0]
    assert row[1:] == (
        acc["site"], "haccp_monthly", f"{month}-01", row[4], "de", "queued", operator
    )  # fmt: skip
    assert row[4].startswith(month) and int(row[4][-2:]) >= 28  # the month's last day
    text, _ = await page(client, "/reports")
    assert rid in text and "Reports kitchen" in text and "queued" in text
    assert f"/reports/{rid}/file" not in text  # no link before it is ready
    renderer: Renderer = client.app[REPORTS]
    claimed = await renderer.claim(only=rid)
    assert claimed is not None
    r = await client.get(f"/reports/{rid}/file")
    assert r.status == 409 and (await r.json())["error"]["code"] == "conflict"
    assert await renderer.render(claimed) == "ready"
    text, _ = await page(client, "/reports")
    links = re.findall(r'href="(/reports/rpt_[0-9a-z]+/file)"', text)
    assert links == [f"/reports/{rid}/file"]
    (sha,) = (await sql(dsn, "SELECT sha256 FROM reports WHERE id = %s", rid))[0]
    assert sha in text
    r = await client.get(links[0])
    assert r.status == 200 and r.content_type == "application/pdf"
    pdf = await r.read()
    assert hashlib.sha256(pdf).hexdigest() == sha == r.headers["X-Content-SHA256"]
    assert pdf.startswith(b"%PDF")


async def test_viewer_refused_bad_input_by_the_field_and_another_accounts_report_404(
    client: Any, dsn: str, clock: FakeClock
) -> None:
    a = await make_account(dsn, unique_email("repa"), site="Site A")
    b = await make_account(dsn, unique_email("repb"), site="Site B")
    b_rpt = "rpt_" + b["account"][-16:]
    await sql(
        dsn,
        "INSERT INTO reports (id, account_id, site_id, template, period_from, period_to,"
        " status, sha256) VALUES (%s, %s, %s, 'haccp_monthly', '2026-01-01', '2026-01-31',"
        " 'ready', repeat('0', 64))",
        b_rpt, b["account"], b["site"],
    )  # fmt: skip
    month = last_month(clock().date())
    ask = {"site_id": a["site"], "template": "haccp_monthly", "month": month, "language": "en"}

    # a viewer sees the page, without the form, and is refused the POST
    await sign_in_as(client, dsn, clock, await user_of(dsn, a["account"], "viewer"))
    text, csrf = await page(client, "/reports")
    assert 'action="/reports"' not in text and "This account's reports" in text
    r = await client.post("/reports", data={"csrf": csrf, **ask}, allow_redirects=False)
    assert r.status == 403 and (await r.json())["error"]["code"] == "forbidden"
    assert await reports_of(dsn, a["account"]) == []

    # an operator: each bad field gets its message next to it, nothing is stored
    await sign_in_as(client, dsn, clock, await user_of(dsn, a["account"], "operator"))
    _, csrf = await page(client, "/reports")
    this_month = clock().date().strftime("%Y-%m")
    with pytest.raises(ApiError) as bad_template:
        rstore.parse({"site_id": a["site"], "template": "nope", "period": {"from": "x"}})
    for field, value, status, message in (
        ("month", "2026-13", 400, "month must be YYYY-MM, got '2026-13'"),
        ("month", "", 400, "month must be YYYY-MM, got ''"),
        ("month", this_month, 422, "the period must have ended: its last day"),
        ("template", "nope", 400, bad_template.value.message),
        ("site_id", b["site"], 404, f"no site {b['site']!r} in this account"),
    ):
        r = await client.post("/reports", data={"csrf": csrf, **ask, field: value})
        text = await r.text()
        assert r.status == status, (field, value, text[:300])
        assert field_error(text, field).startswith(message), (field, value)
        assert 'aria-invalid="true"' in text
    assert await reports_of(dsn, a["account"]) == []

    # another account's report: not listed, its file 404 in the envelope
    text, _ = await page(client, "/reports")
    assert b_rpt not in text and "Site B" not in text
    r = await client.get(f"/reports/{b_rpt}/file")
    assert r.status == 404 and (await r.json())["error"]["code"] == "report_not_found"
    r = await client.get("/reports/rpt_nope/file")
    assert r.status == 404
