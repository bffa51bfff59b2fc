"""Every route of the dashboard (every GET and POST route whose handler lives under
`opensense.web`, read from the app's router, so a page added later is tested without
an edit here), in-process (aiohttp test client), two populated accounts in one
database (tests/fixtures/tenants.py), signed in as account A:

- no answer shows anything of account B (names, emails, ids), with A's ids in the
  path or B's;
- B's ids in the path are refused (404, or 403) and change nothing, in A or in B;
  B's ids in a form's fields change nothing of B's;
- every form (POST) with a missing CSRF token, or another browser's, is refused
  (403 `forbidden`) and changes nothing.

A path parameter is filled with an id of the right prefix, found from the
parameter's name (`{channel_id}`) or the path segment before it (`/channels/{id}`);
a route whose parameters cannot be filled fails the test with what to add."""

from __future__ import annotations

import asyncio
import io
import re
import zipfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from aiohttp import web
from psycopg import sql

from opensense.app import create_app
from opensense.web import store as web_store
from opensense.web.routes import PRE_COOKIE, SESSION_COOKIE, csrf_token

from .fixtures.clock import FakeClock
from .fixtures.database import admin_of
from .fixtures.server import test_config
from .fixtures.tenants import Tenant, make_tenant

pytestmark = pytest.mark.db

WEB = "opensense.web"
# A path parameter names an object by its id prefix (the database's CHECKs: chn_,
# dev_, site_, ...): by the parameter's name, else by the path segment before it.
FILL_BY_NAME = {
    "account_id": "acc",
    "site_id": "site",
    "device_id": "dev",
    "channel_id": "chn",
    "sensor_id": "snr",
    "rule_id": "rul",
    "event_id": "evt",
    "target_id": "tgt",
    "recipient_id": "tgt",
    "silence_id": "sil",
    "token_id": "tok",
    "user_id": "usr",
    "report_id": "rpt",
}
FILL_BY_SEGMENT = {
    "accounts": "acc",
    "sites": "site",
    "devices": "dev",
    "channels": "chn",
    "rules": "rul",
    "events": "evt",
    "alarms": "evt",
    "recipients": "tgt",
    "targets": "tgt",
    "silences": "sil",
    "tokens": "tok",
    "users": "usr",
    "reports": "rpt",
}
# A query string a page needs to answer 200 (a chart's range, say), by route path;
# {chn} and the like: the signed-in account's id of that prefix
QUERY_BY_PATH: dict[str, str] = {"/rules/new": "?channel_id={chn}&start=kind:range"}
# Form fields that name an object: a form posted with B's ids in them (and A's in the
# path) must change nothing of B's
FORM_FIELDS = {name: prefix for name, prefix in FILL_BY_NAME.items()} | {"id": "evt"}
# The API's routes (token auth, JSON bodies, no cookies) have no CSRF token to check
NOT_FORMS = ("/v1/",)
PARAM_RE = re.compile(r"\{([^}:]+)(?::[^}]*)?\}")
STREAM_READ_S = 0.3  # how long an event stream is listened to


@dataclass(frozen=True)
class WebRoute:
    method: str
    resource: web.AbstractResource
    path: str  # the route's path with its {parameters}

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


def web_routes(app: web.Application) -> list[WebRoute]:
    """Every GET and POST route of the dashboard (its handler's module under
    opensense.web), from the router."""
    out = []
    for route in app.router.routes():
        module = getattr(route.handler, "__module__", "") or ""
        if route.method not in ("GET", "POST") or not (
            module == WEB or module.startswith(WEB + ".")
        ):
            continue
        assert route.resource is not None
        out.append(WebRoute(route.method, route.resource, route.resource.canonical))
    return out


def prefix_for(route: WebRoute, param: str) -> str:
    if param in FILL_BY_NAME:
        return FILL_BY_NAME[param]
    parts = route.path.split("/")
    i = parts.index("{" + param + "}") if "{" + param + "}" in parts else -1
    if i > 0 and parts[i - 1] in FILL_BY_SEGMENT:
        return FILL_BY_SEGMENT[parts[i - 1]]
    pytest.fail(
        f"{route}: cannot fill the path parameter {{{param}}}: add the id prefix of the"
        " object it names to FILL_BY_NAME (by parameter name) or FILL_BY_SEGMENT (by the"
        " path segment before it) in tests/test_web_isolation.py"
    )


def url_of(route: WebRoute, owner: Tenant) -> str:
    """The route's URL with its parameters filled with `owner`'s ids."""
    query = QUERY_BY_PATH.get(route.path, "").format_map({k: v[0] for k, v in owner.ids.items()})
    params = PARAM_RE.findall(route.path)
    if not params:
        return route.path + query
    values = {}
    for p in params:
        prefix = prefix_for(route, p)
        if prefix not in owner.ids:
            pytest.fail(
                f"{route}: {{{p}}} names a {prefix}_ object, and the test accounts have none:"
                " add one to make_tenant in tests/fixtures/tenants.py"
            )
        values[p] = owner.id(prefix)
    return str(route.resource.url_for(**values)) + query


def form_ids(owner: Tenant) -> dict[str, str]:
    return {f: owner.id(p) for f, p in FORM_FIELDS.items() if p in owner.ids}


class Rows:
    """Digests, table by table, of every row that belongs to some accounts: the rows
    with one of their ids in a text column naming an object (account_id, channel_id,
    ..., or the row's own id). A session's `last_seen_at` moves on every request: left
    out. One connection (the server's superuser: every table) for the whole test."""

    def __init__(self, conn: psycopg.AsyncConnection[Any], columns: dict[str, list[str]]):
        self.conn = conn
        self.columns = columns

    @classmethod
    async def open(cls, dsn: str) -> Rows:
        conn = await psycopg.AsyncConnection.connect(admin_of(dsn), autocommit=True)
        cur = await conn.execute(
            "SELECT c.table_name, c.column_name FROM information_schema.columns c"
            " JOIN pg_class k ON k.relname = c.table_name AND NOT k.relispartition"
            " JOIN pg_namespace n ON n.oid = k.relnamespace AND n.nspname = c.table_schema"
            " WHERE c.table_schema = 'public' AND c.data_type = 'text'"
            " AND (c.column_name = 'id' OR c.column_name LIKE '%\\_id')"
            " AND k.relkind IN ('r', 'p') ORDER BY 1, 2"
        )
        columns: dict[str, list[str]] = {}
        for table, column in await cur.fetchall():
            columns.setdefault(table, []).append(column)
        return cls(conn, columns)

    async def of(self, tenants: list[Tenant], skip: tuple[str, ...] = ()) -> dict[str, str]:
        ids = [i for t in tenants for ids in t.ids.values() for i in ids]
        parts = [
            sql.SQL(
                "SELECT {name}::text, md5(coalesce(string_agg(x, '|' ORDER BY x), ''))"
                " FROM (SELECT (to_jsonb(t) - 'last_seen_at')::text AS x FROM {table} t"
                " WHERE {where}) s"
            ).format(
                name=sql.Literal(table),
                table=sql.Identifier(table),
                where=sql.SQL(" OR ").join(
                    sql.SQL("{} = ANY(%(ids)s)").format(sql.Identifier(c)) for c in cols
                ),
            )
            for table, cols in self.columns.items()
            if table not in skip
        ]
        cur = await self.conn.execute(sql.SQL(" UNION ALL ").join(parts), {"ids": ids})
        return dict(await cur.fetchall())  # type: ignore[arg-type]


async def body_of(resp: Any) -> str:
    """What an answer shows: its text, an event stream's first moments, a ZIP's files."""
    ctype = resp.headers.get("Content-Type", "")
    if ctype.startswith("text/event-stream"):
        chunks = []
        try:
            async with asyncio.timeout(STREAM_READ_S):
                async for chunk in resp.content.iter_any():
                    chunks.append(chunk)
        except TimeoutError:
            pass
        resp.close()
        return b"".join(chunks).decode(errors="replace")
    raw = await resp.read()
    if ctype.startswith("application/zip"):
        with zipfile.ZipFile(io.BytesIO(raw)) as z:
            return "\n".join(z.read(n).decode(errors="replace") for n in z.namelist())
    return raw.decode(errors="replace") + " " + resp.headers.get("Location", "")


def leaks(text: str, other: Tenant, sent: str = "") -> list[str]:
    """`other`'s names and ids in `text`, but for the ids the request itself carried."""
    return [s for s in other.secrets_shown() if s in text and s not in sent]


@dataclass
class Setup:
    client: Any
    a: Tenant
    b: Tenant
    dsn: str
    clock: FakeClock
    routes: list[WebRoute]
    rows: Rows

    async def session(self, t: Tenant, owner: bool = True) -> str:
        """A new session of `t`'s owner (or viewer), as a sign-in would make."""
        user = t.ids["usr"][0 if owner else 1]
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            return await web_store.create_session(conn, user, self.clock())

    async def signed_in_as_a(self) -> str:
        """A fresh session of A's owner in the client's cookies (a POST may have ended
        the last one: sign-out is a route too); its CSRF token."""
        sid = await self.session(self.a)
        jar = self.client.session.cookie_jar
        jar.clear()  # else the server's refreshed cookie of the last session goes too
        jar.update_cookies({SESSION_COOKIE: sid, PRE_COOKIE: sid}, self.client.make_url("/"))
        return csrf_token(sid)

    async def request(self, route: WebRoute, url: str, form: dict[str, str] | None) -> Any:
        if route.method == "GET":
            return await self.client.get(url, allow_redirects=False)
        return await self.client.post(url, data=form or {}, allow_redirects=False)


@pytest.fixture
async def setup(aiohttp_client: Any, dsn: str, clock: FakeClock) -> AsyncIterator[Setup]:
    a = await make_tenant(dsn, "a", clock())
    b = await make_tenant(dsn, "b", clock())
    app = create_app(test_config(clock, auth_rate_per_min=10_000), dsn)
    client = await aiohttp_client(app)
    routes = web_routes(app)
    # the dashboard's own pages are found: this list is not empty by accident
    assert {"GET /", "GET /auth/login", "POST /auth/logout-all"} <= {str(r) for r in routes}
    rows = await Rows.open(dsn)
    s = Setup(client, a, b, dsn, clock, routes, rows)
    await s.session(b)  # B is signed in somewhere: its sessions must outlive A's requests
    yield s
    await rows.conn.close()


def forms(routes: list[WebRoute]) -> Iterator[WebRoute]:
    return (r for r in routes if r.method == "POST" and not r.path.startswith(NOT_FORMS))


async def test_no_route_shows_or_changes_anything_of_another_account(setup: Setup) -> None:
    s = setup
    failures: list[str] = []
    sent = " ".join(form_ids(s.b).values())  # a form's fields carry B's ids
    before = await s.rows.of([s.b])

    def changed_b(route: WebRoute, after: dict[str, str]) -> None:
        nonlocal before
        if after != before:
            changed = sorted(k for k in after if after[k] != before.get(k))
            failures.append(f"{route} changed B's rows in {changed}")
            before = after

    # B's ids in the path, first (A's own objects all there): refused, nothing of B's
    # shows (but the ids the request sent), nothing of A's or B's changes
    for route in s.routes:
        if not PARAM_RE.search(route.path):
            continue
        csrf = await s.signed_in_as_a()
        around = await s.rows.of([s.a], skip=("sessions",))
        url = url_of(route, s.b)
        resp = await s.request(route, url, {"csrf": csrf, **form_ids(s.b)})
        text = await body_of(resp)
        if resp.status not in (403, 404):
            failures.append(f"{route} with B's ids: {resp.status}, not 404 or 403")
        if found := leaks(text, s.b, url + " " + sent):
            failures.append(f"{route} with B's ids shows B's {found}")
        if await s.rows.of([s.a], skip=("sessions",)) != around:
            failures.append(f"{route} with B's ids changed something of A's")
        changed_b(route, await s.rows.of([s.b]))
    # A's own ids in the path, the pages before the forms (a form may delete what a
    # page shows): A's page is shown (a redirect to the sign-in page would test
    # nothing), nothing of B's shows or changes
    for route in sorted(s.routes, key=lambda r: r.method != "GET"):
        csrf = await s.signed_in_as_a()
        resp = await s.request(route, url_of(route, s.a), {"csrf": csrf, **form_ids(s.b)})
        text = await body_of(resp)
        if resp.status >= 500 or (route.method == "GET" and resp.status != 200):
            failures.append(
                f"{route} with A's ids: {resp.status} {text[:200]} (a page that needs a"
                " query string to answer 200: add it to QUERY_BY_PATH)"
            )
        if found := leaks(text, s.b, sent):
            failures.append(f"{route} with A's ids shows B's {found}")
        changed_b(route, await s.rows.of([s.b]))
    assert not failures, "\n".join(failures)


async def test_every_form_refuses_a_missing_or_foreign_csrf_token(setup: Setup) -> None:
    s = setup
    failures: list[str] = []
    other_session = csrf_token(await s.session(s.a))  # A signed in in another browser
    ended = await s.session(s.a)
    async with await psycopg.AsyncConnection.connect(s.dsn, autocommit=True) as conn:
        await web_store.end_session(conn, ended)
    foreign = {
        "no token": None,
        "an empty token": "",
        "another browser's session token": other_session,
        "a token of B's": csrf_token(await s.session(s.b)),
        "the token of a session that has ended": csrf_token(ended),
        "another browser's pre-session token": csrf_token("another-browser-pre-cookie"),
    }
    checked = 0
    mine = await s.signed_in_as_a()
    before = await s.rows.of([s.a, s.b], skip=("sessions",))
    for route in forms(s.routes):
        for what, token in foreign.items():
            assert token != mine
            form = form_ids(s.a) | ({} if token is None else {"csrf": token})
            resp = await s.request(route, url_of(route, s.a), form)
            body = await resp.text()
            code = (await resp.json())["error"]["code"] if resp.status == 403 else None
            if resp.status != 403 or code != "forbidden":
                failures.append(f"{route} with {what}: {resp.status} {body[:200]}")
            checked += 1
        # the refused forms changed nothing, and signed nobody out
        after = await s.rows.of([s.a, s.b], skip=("sessions",))
        if after != before:
            changed = sorted(k for k in after if after[k] != before.get(k))
            failures.append(f"{route} with a bad token changed rows in {changed}")
            before = after
        if (await s.client.get("/", allow_redirects=False)).status != 200:
            failures.append(f"{route} with a bad token ended the session")
            mine = await s.signed_in_as_a()
    assert checked >= 4 * len(foreign), "fewer forms than the sign-in's own four"
    assert not failures, "\n".join(failures)


def test_a_route_without_a_filler_fails_loudly() -> None:
    app = web.Application()

    async def handler(request: web.Request) -> web.Response:
        return web.Response()

    resource = app.router.add_resource("/gadgets/{gadget}")
    resource.add_route("GET", handler)
    route = WebRoute("GET", resource, resource.canonical)
    with pytest.raises(pytest.fail.Exception, match="FILL_BY_NAME"):
        url_of(route, Tenant("t", "acc_x", "o@x", "v@x", {"chn": ["chn_x"]}))
    resource = app.router.add_resource("/channels/{id}/chart")
    route = WebRoute("GET", resource, resource.canonical)
    assert url_of(route, Tenant("t", "acc_x", "o@x", "v@x", {"chn": ["chn_x"]})) == (
        "/channels/chn_x/chart"
    )
