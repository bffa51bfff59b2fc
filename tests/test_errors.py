"""Every error the server produces leaves in the one envelope of docs/product.md#errors:
``{"error": {"code", "message", "request_id": "req_…"}}``, with a code from
`opensense.errors.CODES`, the HTTP status that code stands for, and no stack trace.
Another account's ids answer 404 and leak nothing."""

from __future__ import annotations

import base64
import gzip
import json
import re
from dataclasses import dataclass, field, replace
from typing import Any

import psycopg
import pytest
from aiohttp import web

from opensense.app import create_app
from opensense.errors import CODES
from opensense.web.routes import csrf_token

from .fixtures.server import World, make_world, test_config

pytestmark = pytest.mark.db

REQUEST_ID = re.compile(r"^req_[0-9a-z]{16}$")
STACK_TRACE = ("Traceback", 'File "', "psycopg", "RuntimeError", "kaboom")
# Codes declared for the HTTP layer that no request can currently provoke: aiohttp never
# raises 415 by itself, and nothing answers 503 yet (a database outage is a 500).
# length_required is the site gateway's local door's (tests/test_attack_gateway.py).
UNREACHABLE = {"unsupported_media_type", "unavailable", "length_required"}
OPERATOR = "operator-token-for-errors"  # the status feature's operator API
BIG = b'{"name": "' + b"x" * (65 * 1024) + b'"}'  # > 64 KiB
HUGE_INT = "1" + "0" * 400  # a JSON integer no float can hold


async def boom(request: web.Request) -> web.Response:
    raise RuntimeError("kaboom: the internals a client must never see")


@pytest.fixture
def config(clock: Any) -> Any:
    """The suite's config with room for a long table of requests (the CSV export
    limit stays at its default: the table provokes 429 with it)."""
    return test_config(
        clock, read_rate_per_min=100_000, ingest_rate_per_min=100_000, operator_token=OPERATOR
    )


@pytest.fixture
async def eclient(aiohttp_client: Any, dsn: str, config: Any) -> Any:
    """The real app plus one test-only route whose handler fails unexpectedly."""
    app = create_app(config, dsn)
    app.router.add_get("/boom", boom)
    return await aiohttp_client(app)


@dataclass
class Tenants:
    """Account A (the caller) and account B (whose ids A must not reach)."""

    a: World
    b: World
    a_chn: str
    a_whk: str
    b_chn: str
    b_snr: str
    b_dev: str
    b_token_id: str  # B's ua_live_ token
    revoked_ua: str
    revoked_whk: str
    rotated_ds: str  # A's fridge02 token before a rotation
    deleted_ds: str  # the token of a deleted device
    a_evt: str = ""  # a cleared alarm event of A (alarms)
    secrets: list[str] = field(default_factory=list)  # B's data that must never show
    resolved_incident: str = ""  # an incident the operator resolved
    b_uplink: int = 0  # an uplink in B's LoRaWAN tray


def reading(device: str = "fridge01", **entry: Any) -> dict[str, Any]:
    return {"device": device, "measurements": [{"type": "temperature", "value": 4.0, **entry}]}


async def ok(r: Any, status: int = 200) -> Any:
    assert r.status == status, await r.text()
    return await r.json() if r.content_type == "application/json" else await r.text()


@pytest.fixture
async def tenants(eclient: Any, dsn: str, config: Any) -> Tenants:
    c = eclient
    a = await make_world(dsn, config, ("fridge01", "fridge02"))
    b = await make_world(dsn, config, ("fridge01",))
    # B: a site, a device and a channel with recognisable data
    await ok(
        await c.patch(
            f"/v1/sites/{b.site}",
            json={"name": "Secret Bakery", "address": "1 Hidden Lane"},
            headers=b.auth,
        )
    )
    ans = await ok(await c.post("/v1/ingest", json=reading(), headers=b.dev_auth("fridge01")))
    b_chn = ans["channels"][0]["channel_id"]
    b_snr = (await ok(await c.get(f"/v1/channels/{b_chn}", headers=b.auth)))["sensor_id"]
    await ok(await c.patch(f"/v1/channels/{b_chn}", json={"name": "Walk-in B"}, headers=b.auth))
    b_token_id = (await ok(await c.get("/v1/tokens", headers=b.auth)))["data"][0]["id"]
    # A: a channel with data, an idempotency key in use, one CSV export spent
    h = {**a.dev_auth("fridge01"), "Idempotency-Key": "batch-1"}
    a_chn = (await ok(await c.post("/v1/ingest", json=reading(), headers=h)))["channels"][0][
        "channel_id"
    ]
    await ok(await c.get(f"/v1/channels/{a_chn}/measurements?format=csv", headers=a.auth))
    # tokens: a live whk_, revoked ua_live_ and whk_, a rotated and a deleted device's ds_live_
    a_whk = (await ok(await c.post("/v1/tokens", json={"kind": "whk"}, headers=a.auth), 201))[
        "token"
    ]
    revoked = []
    for kind in ("ua_live", "whk"):
        t = await ok(await c.post("/v1/tokens", json={"kind": kind}, headers=a.auth), 201)
        await ok(await c.delete(f"/v1/tokens/{t['id']}", headers=a.auth), 204)
        revoked.append(t["token"])
    await ok(await c.post(f"/v1/devices/{a.device_ids['fridge02']}/rotate-token", headers=a.auth))
    tmp = await ok(
        await c.post("/v1/devices", json={"site_id": a.site, "local_id": "tmp1"}, headers=a.auth),
        201,
    )
    await ok(await c.delete(f"/v1/devices/{tmp['id']}", headers=a.auth), 204)
    # B: an uplink from an unknown DevEUI in its LoRaWAN tray
    b_whk = (await ok(await c.post("/v1/tokens", json={"kind": "whk"}, headers=b.auth), 201))[
        "token"
    ]
    up = {
        "end_device_ids": {"dev_eui": "70B3D57ED00000BB"},
        "uplink_message": {"decoded_payload": {"temperature": 4.0}},
    }
    await ok(await c.post(f"/v1/ingest/lorawan?token={b_whk}", json=up), 202)
    b_uplink = (await ok(await c.get("/v1/lorawan/unassigned", headers=b.auth)))["data"][0]["id"]
    op = bearer(OPERATOR)
    inc = await ok(
        await c.post("/v1/incidents", json={"class": "P2", "title": "t", "body": "b"}, headers=op),
        201,
    )
    await ok(await c.post(f"/v1/incidents/{inc['id']}/resolve", json={"body": "ok"}, headers=op))
    a_evt = "evt_errorstable" + a.account[-8:]
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(
            "INSERT INTO events (id, account_id, channel_id, kind, state, started_at, cleared_at)"
            " VALUES (%s, %s, %s, 'range', 'cleared', now(), now())",
            (a_evt, a.account, a_chn),
        )
    return Tenants(
        a_evt=a_evt,
        a=a,
        b=b,
        a_chn=a_chn,
        a_whk=a_whk,
        b_chn=b_chn,
        b_snr=b_snr,
        b_dev=b.device_ids["fridge01"],
        b_token_id=b_token_id,
        revoked_ua=revoked[0],
        revoked_whk=revoked[1],
        rotated_ds=a.devices["fridge02"],
        deleted_ds=tmp["ingest_token"],
        secrets=[
            "Secret Bakery",
            "Hidden Lane",
            "Walk-in B",
            b.account,
            b.api_token,
            b.devices["fridge01"],
        ],
        resolved_incident=inc["id"],
        b_uplink=b_uplink,
    )


@dataclass
class Case:
    name: str
    method: str
    path: str
    code: str | None = None  # the error code expected; the status follows from CODES
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None

    @classmethod
    def json(cls, name: str, method: str, path: str, code: str, body: Any, **kw: Any) -> Case:
        return cls(name, method, path, code, body=json.dumps(body).encode(), **kw)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def cursor(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def cases(t: Tenants) -> list[Case]:
    a, b = t.a, t.b
    A = a.auth
    dev = a.dev_auth("fridge01")
    ds = a.devices["fridge01"]
    a_dev = a.device_ids["fridge01"]
    out: list[Case] = []
    add = out.append

    # --- unknown paths and methods ------------------------------------------------
    # ("/" was unknown until the dashboard's overview took it: an unknown /auth/ page instead)
    for path in ("/auth/nope", "/nope", "/v1", "/v1/nope", "/v1/sites/", "/v1/devices/x/unknown"):
        add(Case(f"unknown {path}", "GET", path, "not_found", A))
    for method, path in (
        ("PUT", "/v1/sites"),
        ("DELETE", "/v1/account"),
        ("GET", "/v1/ingest"),
        ("PUT", "/v1/ingest/shelly"),
        ("GET", "/v1/ingest/lorawan"),
        ("POST", "/healthz"),
        ("DELETE", f"/v1/sites/{a.site}"),
        ("PUT", f"/v1/devices/{a_dev}"),
        ("GET", f"/v1/devices/{a_dev}/rotate-token"),
        ("DELETE", f"/v1/channels/{t.a_chn}"),
        ("POST", f"/v1/channels/{t.a_chn}/measurements"),
        ("PATCH", "/v1/tokens"),
        ("GET", f"/v1/tokens/{t.b_token_id}"),
        ("POST", "/v1/openapi.json"),
        ("POST", "/v1/lorawan/unassigned"),
        ("GET", "/v1/lorawan/unassigned/1/assign"),
        ("PUT", "/v1/ingest/lorawan/uplink"),
    ):
        add(Case(f"{method} {path}", method, path, "method_not_allowed", A))

    # --- bodies: bad JSON, too large, unreadable, untextual -----------------------
    posts: list[tuple[str, str, dict[str, str]]] = [
        ("POST", "/v1/ingest", dev),
        ("POST", f"/v1/ingest/lorawan?token={t.a_whk}", {}),
        ("POST", "/v1/sites", A),
        ("PATCH", f"/v1/sites/{a.site}", A),
        ("POST", "/v1/devices", A),
        ("PATCH", f"/v1/devices/{a_dev}", A),
        ("POST", f"/v1/devices/{a_dev}/move", A),
        ("PATCH", f"/v1/channels/{t.a_chn}", A),
        ("POST", "/v1/tokens", A),
        ("POST", f"/v1/ingest/lorawan/uplink?token={t.a_whk}", {}),
        ("POST", "/v1/lorawan/unassigned/1/assign", A),
    ]
    json_ct = {"Content-Type": "application/json"}
    for method, path, h in posts:
        hh = {**h, **json_ct}
        add(Case(f"{method} {path} not JSON", method, path, "bad_json", hh, b"{nope"))
        add(Case(f"{method} {path} NaN", method, path, "bad_json", hh, b'{"a": NaN}'))
        add(Case(f"{method} {path} not UTF-8", method, path, "bad_json", hh, b'{"a": "\xff"}'))
        add(Case(f"{method} {path} > 64 KiB", method, path, "payload_too_large", hh, BIG))
        add(
            Case(
                f"{method} {path} broken gzip",
                method,
                path,
                "invalid_request",
                {**hh, "Content-Encoding": "gzip", "Connection": "close"},
                b"not gzip at all",
            )
        )
        if not path.startswith("/v1/ingest"):
            add(Case(f"{method} {path} array", method, path, "invalid_request", hh, b"[1]"))
            add(Case(f"{method} {path} deep", method, path, "bad_json", hh, b"[" * 1000))
            deep = b"[" * 1000 + b"]" * 1000
            add(Case(f"{method} {path} deeper", method, path, "bad_json", hh, deep))
            nul = b'{"name": "a\\u0000b"}'
            add(Case(f"{method} {path} NUL", method, path, "bad_json", hh, nul))
            sur = b'{"name": "a\\ud800b"}'
            add(Case(f"{method} {path} lone surrogate", method, path, "bad_json", hh, sur))
    big = gzip.compress(BIG)  # small on the wire, > 64 KiB once inflated
    add(
        Case(
            "gzip bomb",
            "POST",
            "/v1/sites",
            "payload_too_large",
            {**A, "Content-Encoding": "gzip"},
            big,
        )
    )

    # --- tokens: missing, malformed, unknown, wrong kind, revoked, rotated ----------
    management = [
        ("GET", "/v1/account"),
        ("GET", "/v1/sites"),
        ("POST", "/v1/sites"),
        ("GET", f"/v1/sites/{a.site}"),
        ("PATCH", f"/v1/sites/{a.site}"),
        ("GET", f"/v1/sites/{a.site}/devices"),
        ("GET", "/v1/devices"),
        ("POST", "/v1/devices"),
        ("GET", f"/v1/devices/{a_dev}"),
        ("PATCH", f"/v1/devices/{a_dev}"),
        ("DELETE", f"/v1/devices/{a_dev}"),
        ("POST", f"/v1/devices/{a_dev}/rotate-token"),
        ("POST", f"/v1/devices/{a_dev}/move"),
        ("GET", f"/v1/devices/{a_dev}/placements"),
        ("GET", "/v1/channels"),
        ("GET", f"/v1/channels/{t.a_chn}"),
        ("PATCH", f"/v1/channels/{t.a_chn}"),
        ("GET", f"/v1/channels/{t.a_chn}/measurements"),
        ("GET", f"/v1/measurements?channel_id={t.a_chn}"),
        ("GET", "/v1/tokens"),
        ("POST", "/v1/tokens"),
        ("DELETE", f"/v1/tokens/{t.b_token_id}"),
    ]
    wrong = {
        "garbage": "nonsense",
        "unknown ua": "ua_live_" + "a" * 12 + "_" + "b" * 32,
        "device token": ds,
        "webhook token": t.a_whk,
        "revoked ua": t.revoked_ua,
    }
    for method, path in management:
        add(Case(f"{method} {path} no token", method, path, "auth_required", json_ct, b"{}"))
        add(
            Case(
                f"{method} {path} basic",
                method,
                path,
                "auth_required",
                {"Authorization": "Basic eDp5"},
            )
        )
        for why, tok in wrong.items():
            add(Case(f"{method} {path} {why}", method, path, "token_invalid", bearer(tok), b"{}"))
    ingest = json.dumps(reading()).encode()
    add(Case("ingest no token", "POST", "/v1/ingest", "auth_required", json_ct, ingest))
    for why, tok in {
        "garbage": "ds_live_x",
        "user token": a.api_token,
        "webhook token": t.a_whk,
        "rotated": t.rotated_ds,
        "deleted device": t.deleted_ds,
    }.items():
        add(Case(f"ingest {why}", "POST", "/v1/ingest", "token_invalid", bearer(tok), ingest))
    shelly = "/v1/ingest/shelly?device=fridge01&temp=4.5"
    add(Case("shelly no token", "GET", shelly, "auth_required"))
    for why, tok in {"garbage": "x", "user": a.api_token, "rotated": t.rotated_ds}.items():
        add(Case(f"shelly {why}", "GET", f"{shelly}&token={tok}", "token_invalid"))
    up = json.dumps({"end_device_ids": {"dev_eui": "70B3D57ED0000001"}}).encode()
    add(Case("lorawan no token", "POST", "/v1/ingest/lorawan", "auth_required", json_ct, up))
    for why, tok in {"device": ds, "user": a.api_token, "revoked": t.revoked_whk}.items():
        path = f"/v1/ingest/lorawan?token={tok}"
        add(Case(f"lorawan {why}", "POST", path, "token_invalid", json_ct, up))

    # --- another account's ids: 404, nothing changed, nothing leaked -----------------
    for method, path, body, code in (
        ("GET", f"/v1/sites/{b.site}", None, "site_not_found"),
        ("PATCH", f"/v1/sites/{b.site}", {"name": "pwned"}, "site_not_found"),
        ("GET", f"/v1/sites/{b.site}/devices", None, "site_not_found"),
        ("GET", f"/v1/sites/{b.site}/devices?at=2026-01-01T00:00:00Z", None, "site_not_found"),
        ("POST", "/v1/devices", {"site_id": b.site, "local_id": "sneaky"}, "site_not_found"),
        ("GET", f"/v1/devices/{t.b_dev}", None, "device_not_found"),
        ("PATCH", f"/v1/devices/{t.b_dev}", {"name": "pwned"}, "device_not_found"),
        ("DELETE", f"/v1/devices/{t.b_dev}", None, "device_not_found"),
        ("POST", f"/v1/devices/{t.b_dev}/rotate-token", None, "device_not_found"),
        ("POST", f"/v1/devices/{t.b_dev}/move", {"site_id": a.site}, "device_not_found"),
        ("POST", f"/v1/devices/{a_dev}/move", {"site_id": b.site}, "site_not_found"),
        ("GET", f"/v1/devices/{t.b_dev}/placements", None, "device_not_found"),
        ("GET", f"/v1/channels?device_id={t.b_dev}", None, "device_not_found"),
        ("GET", f"/v1/channels/{t.b_chn}", None, "channel_not_found"),
        ("GET", f"/v1/channels/{t.b_snr}", None, "sensor_not_found"),
        ("PATCH", f"/v1/channels/{t.b_chn}", {"name": "pwned"}, "channel_not_found"),
        ("PATCH", f"/v1/channels/{t.b_snr}", {"offset": 9}, "sensor_not_found"),
        ("GET", f"/v1/channels/{t.b_chn}/measurements", None, "channel_not_found"),
        ("GET", f"/v1/channels/{t.b_snr}/measurements", None, "sensor_not_found"),
        ("GET", f"/v1/measurements?channel_id={t.b_chn}", None, "channel_not_found"),
        (
            "GET",
            f"/v1/measurements?channel_id={t.a_chn}&channel_id={t.b_chn}",
            None,
            "channel_not_found",
        ),
        ("GET", f"/v1/measurements?channels={t.a_chn},{t.b_snr}", None, "sensor_not_found"),
        ("DELETE", f"/v1/tokens/{t.b_token_id}", None, "token_not_found"),
    ):
        raw = None if body is None else json.dumps(body).encode()
        add(Case(f"B's id: {method} {path}", method, path, code, {**A, **json_ct}, raw))
    add(
        Case.json(
            "B's device named in ingest",
            "POST",
            "/v1/ingest",
            "device_not_found",
            reading(t.b_dev),
            headers=dev,
        )
    )
    add(
        Case.json(
            "B's device in X-Device-Id",
            "POST",
            "/v1/ingest",
            "device_not_found",
            {"measurements": [{"type": "temperature", "value": 1}]},
            headers={**dev, "X-Device-Id": t.b_dev},
        )
    )
    path = f"/v1/ingest/shelly?token={ds}&device={t.b_dev}&temp=4.5"
    add(Case("B's device via shelly", "GET", path, "device_not_found"))
    for method, path, code in (
        ("GET", f"/v1/sites/{a.site}x", "site_not_found"),
        ("GET", "/v1/devices/nope", "device_not_found"),
        ("GET", "/v1/channels/chn_nope", "channel_not_found"),
        ("GET", "/v1/channels/snr_nope", "sensor_not_found"),
        ("DELETE", "/v1/tokens/tok_nope", "token_not_found"),
    ):
        add(Case(f"no such {path}", method, path, code, A))

    # --- reads: bad query parameters ------------------------------------------------
    for base in (
        f"/v1/channels/{t.a_chn}/measurements?",
        f"/v1/measurements?channel_id={t.a_chn}&",
    ):
        for q, code in (
            ("agg=2h", "invalid_request"),
            ("agg=", "invalid_request"),
            ("fn=median", "invalid_request"),
            ("limit=0", "invalid_request"),
            ("limit=5001", "invalid_request"),
            ("limit=ten", "invalid_request"),
            ("limit=99999999999999999999999999", "invalid_request"),
            ("from=2026-01-02T00:00:00Z&to=2026-01-01T00:00:00Z", "invalid_range"),
            ("from=2026-01-01T00:00:00Z&to=2026-01-01T00:00:00Z", "invalid_range"),
            ("from=2026-01-01T01:00:00%2B01:00&to=2026-01-01T00:00:00Z", "invalid_range"),
            ("from=yesterday", "invalid_request"),
            ("to=2026-01-01", "invalid_request"),
            ("to=2026-01-01T00:00:00", "invalid_request"),
            ("from=0001-01-01T00:00:00%2B01:00", "invalid_request"),
            ("cursor=garbage!", "invalid_request"),
            (f"cursor={cursor('v2:2026-01-01T00:00:00Z')}", "invalid_request"),
            (f"cursor={cursor('v1:not a time')}", "invalid_request"),
            ("format=xml", "invalid_request"),
        ):
            add(Case(f"read {base}{q}", "GET", base + q, code, A))
    m = "/v1/measurements"
    add(Case("multi read: no ids", "GET", m, "invalid_request", A))
    many = ",".join(f"chn_{i}" for i in range(33))
    add(Case("multi read: 33 ids", "GET", f"{m}?channels={many}", "invalid_request", A))
    add(
        Case("multi read: csv", "GET", f"{m}?channel_id={t.a_chn}&format=csv", "invalid_request", A)
    )
    add(
        Case(
            "site devices at=bad",
            "GET",
            f"/v1/sites/{a.site}/devices?at=noon",
            "invalid_request",
            A,
        )
    )
    add(
        Case(
            "second CSV export",
            "GET",
            f"/v1/channels/{t.a_chn}/measurements?format=csv",
            "rate_limited",
            A,
        )
    )

    # --- NUL characters in the URL (PostgreSQL text cannot hold them) -------------
    for path in (
        "/v1/devices/a%00b",
        "/v1/sites/site_%00",
        "/v1/channels/chn_%00",
        "/v1/channels/chn_%00/measurements",
        "/v1/channels?device_id=%00",
        "/v1/measurements?channel_id=%00",
        "/v1/sites?unused=%00",
        "/v1/nope%00",
    ):
        add(Case(f"NUL in {path}", "GET", path, "invalid_request", A))
    add(Case("NUL in a token id", "DELETE", "/v1/tokens/tok_%00", "invalid_request", A))
    add(
        Case(
            "NUL in shelly device",
            "GET",
            f"/v1/ingest/shelly?token={ds}&device=%00&temp=1",
            "invalid_request",
        )
    )

    # --- management validation: 400, 409, 422 ---------------------------------------
    for method, path, body, code in (
        ("POST", "/v1/sites", {}, "invalid_request"),
        ("POST", "/v1/sites", {"name": "x", "timezone": "Mars/Olympus"}, "invalid_request"),
        ("POST", "/v1/sites", {"name": "x", "timezone": "../../etc/passwd"}, "invalid_request"),
        ("POST", "/v1/sites", {"name": "x", "vertical": "bakery"}, "invalid_request"),
        ("PATCH", f"/v1/sites/{a.site}", {"opening_hours": []}, "invalid_request"),
        ("PATCH", f"/v1/sites/{a.site}", {"report_recipients": ["nobody"]}, "invalid_request"),
        ("POST", "/v1/devices", {"site_id": a.site}, "invalid_request"),
        ("POST", "/v1/devices", {"site_id": a.site, "local_id": "bad id!"}, "invalid_request"),
        (
            "POST",
            "/v1/devices",
            {"site_id": a.site, "local_id": "n1", "cadence_s": 0},
            "invalid_request",
        ),
        (
            "POST",
            "/v1/devices",
            {"site_id": a.site, "local_id": "n2", "dev_eui": "xyz"},
            "invalid_request",
        ),
        ("POST", "/v1/devices", {"site_id": a.site, "local_id": "fridge01"}, "conflict"),
        ("PATCH", f"/v1/devices/{a_dev}", {"cadence_s": True}, "invalid_request"),
        # below what a node's firmware takes (firmware/sense/policy.py cadence_ok)
        ("PATCH", f"/v1/devices/{a_dev}", {"cadence_s": 9}, "invalid_request"),
        ("PATCH", f"/v1/devices/{a_dev}", {"cadence_s": 86401}, "invalid_request"),
        ("PATCH", f"/v1/devices/{a_dev}", {"name": ""}, "invalid_request"),
        ("POST", f"/v1/devices/{a_dev}/move", {}, "invalid_request"),
        (
            "POST",
            f"/v1/devices/{a_dev}/move",
            {"site_id": a.site, "effective_at": 5},
            "invalid_request",
        ),
        (
            "POST",
            f"/v1/devices/{a_dev}/move",
            {"site_id": a.site, "effective_at": "2000-01-01T00:00:00Z"},
            "invalid_range",
        ),
        (
            "POST",
            f"/v1/devices/{a_dev}/move",
            {"site_id": a.site, "effective_at": "9999-12-31T23:59:59-01:00"},
            "invalid_request",
        ),
        ("PATCH", f"/v1/channels/{t.a_chn}", {"offset": 51}, "invalid_range"),
        ("PATCH", f"/v1/channels/{t.a_chn}", {"offset": "1"}, "invalid_request"),
        ("PATCH", f"/v1/channels/{t.a_chn}", {"ok_min": 8, "ok_max": 2}, "invalid_range"),
        ("PATCH", f"/v1/channels/{t.a_chn}", {"grace_min": -1}, "invalid_request"),
        ("POST", "/v1/tokens", {"kind": "ds_live"}, "invalid_request"),
        ("POST", "/v1/tokens", {"name": 5}, "invalid_request"),
    ):
        add(Case.json(f"{method} {path} {body}", method, path, code, body, headers=A))
    for key in ("offset", "ok_min"):
        raw = f'{{"{key}": {HUGE_INT}}}'.encode()
        add(
            Case(
                f"PATCH channel {key} huge",
                "PATCH",
                f"/v1/channels/{t.a_chn}",
                "invalid_request",
                A,
                raw,
            )
        )

    # --- ingest validation: 400, 403, 404, 409, 422 ----------------------------------
    for name, body, code in (
        ("array", [1], "invalid_measurement"),
        ("no measurements", {"device": "fridge01"}, "invalid_measurement"),
        ("value string", reading(value="4"), "invalid_measurement"),
        ("unknown kind", reading(type="radiation"), "unknown_kind"),
        (
            "impossible",
            {"device": "fridge01", "measurements": [{"type": "humidity", "value": 140}]},
            "out_of_range",
        ),
        ("future", reading(ts="2999-01-01T00:00:00Z"), "out_of_range"),
        ("ts beyond UTC", reading(ts="0001-01-01T00:00:00+01:00"), "invalid_measurement"),
        ("another device", reading("fridge02"), "forbidden"),
        ("unknown device", reading("fridge99"), "device_not_found"),
    ):
        add(Case.json(f"ingest {name}", "POST", "/v1/ingest", code, body, headers=dev))
    huge = json.dumps(reading()).replace("4.0", HUGE_INT).encode()
    add(Case("ingest huge integer", "POST", "/v1/ingest", "invalid_measurement", dev, huge))
    add(
        Case.json(
            "ingest idempotency key reused",
            "POST",
            "/v1/ingest",
            "idempotency_conflict",
            reading(value=9.0),
            headers={**dev, "Idempotency-Key": "batch-1"},
        )
    )
    add(
        Case.json(
            "ingest key too long",
            "POST",
            "/v1/ingest",
            "invalid_request",
            reading(),
            headers={**dev, "Idempotency-Key": "k" * 201},
        )
    )
    for q, code in (
        ("temp=banana", "invalid_measurement"),
        ("battery=80", "invalid_measurement"),
        ("temp=1&ts=123456789012", "out_of_range"),
        ("temp=1&ts=tomorrow", "invalid_measurement"),
        ("temp=1&ts=0001-01-01T00:00:00%2B01:00", "invalid_measurement"),
        ("hum=101", "out_of_range"),
        ("temp=1&device=fridge02", "forbidden"),
    ):
        add(Case(f"shelly {q}", "GET", f"/v1/ingest/shelly?token={ds}&{q}", code))
    lw = f"/v1/ingest/lorawan?token={t.a_whk}"
    for name, body, code in (
        ("array", [1], "invalid_measurement"),
        ("no dev_eui", {"uplink_message": {}}, "invalid_measurement"),
        (
            "no decoded",
            {"end_device_ids": {"dev_eui": "70B3D57ED0000009"}, "uplink_message": {}},
            "invalid_measurement",
        ),
        (
            "unknown kind",
            {
                "end_device_ids": {"dev_eui": "70B3D57ED0000009"},
                "uplink_message": {
                    "decoded_payload": {"measurements": [{"type": "x", "value": 1}]}
                },
            },
            "unknown_kind",
        ),
    ):
        add(Case.json(f"lorawan {name}", "POST", lw, code, body))
    flat = {"end_device_ids": {"dev_eui": "70B3D57ED0000009"}}
    for name, decoded, code in (
        ("unknown flat key", {"temperature": 1.0, "luminosity": 0.64}, "invalid_measurement"),
        ("typo", {"measurments": []}, "invalid_measurement"),
        ("flat 999", {"temperature": 999}, "out_of_range"),
        ("only signal", {}, "invalid_measurement"),
    ):
        body = {**flat, "uplink_message": {"decoded_payload": decoded}}
        add(Case.json(f"lorawan {name}", "POST", lw, code, body))
    add(
        Case.json(
            "chirpstack no devEui",
            "POST",
            lw + "&event=up",
            "invalid_measurement",
            {"deviceInfo": {}, "object": {"temperature": 1}},
        )
    )
    add(
        Case(
            "shelly battery_unit",
            "GET",
            f"/v1/ingest/shelly?token={ds}&temp=1&battery=3&battery_unit=mV",
            "invalid_measurement",
        )
    )
    # the tray: another account's uplink is not found, bad ids and bodies refused
    for method, path, body in (
        ("POST", f"/v1/lorawan/unassigned/{t.b_uplink}/assign", {"device_id": "fridge01"}),
        ("DELETE", f"/v1/lorawan/unassigned/{t.b_uplink}", None),
        ("DELETE", "/v1/lorawan/unassigned/nope", None),
        ("DELETE", "/v1/lorawan/unassigned/99999999999999999999999", None),
    ):
        add(Case.json(f"tray {method} {path}", method, path, "uplink_not_found", body, headers=A))
    for q in ("state=bogus", "limit=0", "limit=x"):
        add(Case(f"tray list {q}", "GET", f"/v1/lorawan/unassigned?{q}", "invalid_request", A))
    # reports: no such report (another account's: test_another_accounts_id_on_every_route)
    for path in ("/v1/reports/rpt_nope", "/v1/reports/rpt_nope/file"):
        add(Case(f"report {path}", "GET", path, "report_not_found", A))
    add(
        Case.json(
            "tray assign extra field",
            "POST",
            f"/v1/lorawan/unassigned/{t.b_uplink}/assign",
            "invalid_request",
            {"device_id": "fridge01", "replay": True},
            headers=A,
        )
    )
    add(Case("tray no token", "GET", "/v1/lorawan/unassigned", "auth_required"))
    rx = {"rx_metadata": [{"rssi": 1}], "decoded_payload": {}}
    raw = json.dumps({"end_device_ids": {"dev_eui": "70B3D57ED0000009"}, "uplink_message": rx})
    raw = raw.replace('"rssi": 1', f'"rssi": {HUGE_INT}')
    add(Case("lorawan huge rssi", "POST", lw, "invalid_measurement", {}, raw.encode()))

    # --- the operator's incident API (status feature) -------------------------------------
    op = {**bearer(OPERATOR), **json_ct}
    add(Case("no such incident", "GET", "/v1/incidents/inc_nope", "incident_not_found", op))
    done = f"/v1/incidents/{t.resolved_incident}"
    add(
        Case.json(
            "update a resolved incident",
            "POST",
            f"{done}/updates",
            "incident_resolved",
            {"body": "more"},
            headers=op,
        )
    )
    add(
        Case.json(
            "incident bad class",
            "POST",
            "/v1/incidents",
            "invalid_request",
            {"class": "P9", "title": "t", "body": "b"},
            headers=op,
        )
    )
    add(Case("incidents no token", "GET", "/v1/incidents", "auth_required"))
    add(Case("incidents wrong token", "GET", "/v1/incidents", "token_invalid", bearer("nope")))

    # --- an unexpected exception in a handler -----------------------------------------
    add(Case("handler raises", "GET", "/boom", "internal"))
    # --- alarms ----------------------------------------------------------------------
    for method, path, body, code in (
        ("GET", "/v1/events/evt_nope", None, "event_not_found"),
        ("POST", "/v1/events/evt_nope/ack", {"by": "x", "note": "y"}, "event_not_found"),
        ("POST", f"/v1/events/{t.a_evt}/clear", {"by": "x", "note": "y"}, "event_state"),
        ("PATCH", "/v1/rules/rul_nope", {"grace_min": 5}, "rule_not_found"),
        ("DELETE", "/v1/targets/tgt_nope", None, "target_not_found"),
        ("POST", f"/v1/channels/{t.a_chn}/rules", {"kind": "range", "params": {}}, "invalid_rule"),
        ("POST", f"/v1/channels/{t.a_chn}/rules", {"kind": "nope"}, "invalid_rule"),
        ("POST", f"/v1/events/{t.a_evt}/ack", {"by": "x"}, "invalid_request"),
        ("GET", f"/v1/sites/{b.site}/escalation", None, "site_not_found"),
    ):
        raw = None if body is None else json.dumps(body).encode()
        add(Case(f"alarms: {method} {path}", method, path, code, {**A, **json_ct}, raw))
    return out


def envelope_problems(
    case: Case, status: int, headers: Any, text: str, secrets: list[str]
) -> list[str]:
    """Everything wrong with one error answer; empty when it is right."""
    problems = []
    if status != CODES.get(case.code):
        problems.append(f"status {status}, expected {CODES.get(case.code)} for {case.code}")
    for marker in STACK_TRACE:
        if marker in text:
            problems.append(f"body shows {marker!r}")
    for s in secrets:
        if s in text:
            problems.append(f"body leaks {s[:20]!r}")
    try:
        body = json.loads(text)
    except ValueError:
        return [*problems, f"not JSON: {text[:200]!r}"]
    if headers.get("Content-Type", "").split(";")[0] != "application/json":
        problems.append(f"Content-Type {headers.get('Content-Type')}")
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict) or set(body) != {"error"}:
        return [*problems, f"not the envelope: {text[:200]}"]
    # a 429 also says when to come back in the envelope, as its Retry-After header does
    keys = {"code", "message", "request_id"} | ({"retry_after"} if status == 429 else set())
    if set(err) != keys:
        problems.append(f"envelope keys {sorted(err)}")
    elif status == 429 and str(err["retry_after"]) != headers.get("Retry-After"):
        problems.append(f"retry_after {err['retry_after']!r} != Retry-After")
    if err.get("code") != case.code:
        problems.append(f"code {err.get('code')!r}, expected {case.code!r}: {err.get('message')}")
    if err.get("code") not in CODES or CODES[err["code"]] != status:
        problems.append(f"code {err.get('code')!r} does not stand for status {status}")
    if not isinstance(err.get("message"), str) or len(err["message"]) < 10:
        problems.append(f"message {err.get('message')!r} says nothing")
    rid = err.get("request_id")
    if not isinstance(rid, str) or not REQUEST_ID.match(rid):
        problems.append(f"request_id {rid!r}")
    elif headers.get("X-Request-Id") != rid:
        problems.append(f"X-Request-Id {headers.get('X-Request-Id')!r} != {rid!r}")
    if status == 429 and not headers.get("Retry-After", "").isdigit():
        problems.append("429 without Retry-After")
    if status == 405 and "Allow" not in headers:
        problems.append("405 without Allow")
    return problems


async def send(client: Any, case: Case) -> tuple[int, Any, str]:
    r = await client.request(case.method, case.path, headers=case.headers, data=case.body)
    return r.status, r.headers, await r.text()


async def state_of_b(client: Any, t: Tenants) -> Any:
    b = t.b
    site = await ok(await client.get(f"/v1/sites/{b.site}", headers=b.auth))
    device = await ok(await client.get(f"/v1/devices/{t.b_dev}", headers=b.auth))
    places = await ok(await client.get(f"/v1/devices/{t.b_dev}/placements", headers=b.auth))
    channel = await ok(await client.get(f"/v1/channels/{t.b_chn}", headers=b.auth))
    tokens = await ok(await client.get("/v1/tokens", headers=b.auth))
    tray = await ok(await client.get("/v1/lorawan/unassigned", headers=b.auth))
    for volatile in (device, device["token"], *tokens["data"]):
        for key in ("last_seen_at", "online", "last_used_at"):
            volatile.pop(key, None)
    return site, device, places, channel, tokens, tray


async def test_every_error_is_the_envelope_with_its_status(eclient, tenants: Tenants, dsn):
    client, t = eclient, tenants
    before = await state_of_b(client, t)
    table = cases(t)
    # a dashboard form (a session, not a token): no such user of the account
    headers, body = await _page_request(client, dsn, t, "POST")
    table.append(
        Case("page: no such user", "POST", "/account/users/usr_nope/role", "user_not_found",
             headers, body)
    )  # fmt: skip
    failures = []
    for case in table:
        status, headers, text = await send(client, case)
        for p in envelope_problems(case, status, headers, text, t.secrets):
            failures.append(f"{case.name}: {p}")
    assert not failures, f"{len(failures)} of {len(table)} answers are wrong:\n" + "\n".join(
        failures
    )
    # every code the server declares was produced, bar the ones nothing can provoke
    assert {c.code for c in table} == set(CODES) - UNREACHABLE
    # account B is untouched, and its tokens still work
    assert await state_of_b(client, t) == before
    await ok(await client.post("/v1/ingest", json=reading(), headers=t.b.dev_auth("fridge01")))
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM devices WHERE account_id = %s AND local_id = 'sneaky'",
            (t.b.account,),
        )
        assert (await cur.fetchone()) == (0,)


async def test_x_request_id_header_is_the_errors_request_id(eclient, tenants: Tenants):
    t = tenants
    seen = set()
    for method, path, headers in (
        ("GET", "/v1/nope", {}),
        ("PUT", "/v1/sites", t.a.auth),
        ("GET", "/v1/account", {}),
        ("GET", f"/v1/sites/{t.b.site}", t.a.auth),
        ("GET", "/boom", {}),
        ("GET", "/healthz", {}),
    ):
        r = await eclient.request(method, path, headers=headers)
        rid = r.headers["X-Request-Id"]
        assert REQUEST_ID.match(rid), rid
        if r.status >= 400:
            assert (await r.json())["error"]["request_id"] == rid
        seen.add(rid)
    assert len(seen) == 6  # one id per request


# --- edge cases fuzzing found (each answered 500 once; now a 4xx envelope) -----------

FUZZ_FOUND = [
    "ingest NUL in label",
    "ingest NUL in device",
    "ingest lone surrogate",
    "ingest deep nesting",
    "lorawan unassigned NUL",
    "read to=year 1",
    "read cursor at the end of time",
    "multi read without token",
]


def bug_case(t: Tenants, name: str) -> Case:
    """The request for one fuzzing find; code None: any 4xx envelope will do."""
    dev = t.a.dev_auth("fridge01")
    read = f"/v1/channels/{t.a_chn}/measurements"
    end = cursor("v1:9999-12-31T23:59:59.999999Z")
    uplink = {
        "end_device_ids": {"dev_eui": "70B3D57ED00000FF"},
        "uplink_message": {"decoded_payload": {"battery": 50}, "note": "a\u0000b"},
    }
    ingest = {
        "ingest NUL in label": json.dumps(reading(label="a\u0000b")),
        "ingest NUL in device": json.dumps(reading("a\u0000b")),
        "ingest lone surrogate": json.dumps(reading(label="a\ud800b")),
        "ingest deep nesting": "[" * 1000 + "]" * 1000,
    }
    lorawan = {"lorawan unassigned NUL": json.dumps(uplink)}
    if name in ingest:
        return Case(name, "POST", "/v1/ingest", None, dev, ingest[name].encode())
    if name in lorawan:
        path = f"/v1/ingest/lorawan?token={t.a_whk}"
        return Case(name, "POST", path, None, {}, lorawan[name].encode())
    return {
        "read to=year 1": Case(name, "GET", f"{read}?to=0001-01-01T00:00:00Z", None, t.a.auth),
        "read cursor at the end of time": Case(name, "GET", f"{read}?cursor={end}", None, t.a.auth),
        "multi read without token": Case(name, "GET", "/v1/measurements", "auth_required"),
    }[name]


@pytest.mark.parametrize("name", FUZZ_FOUND)
async def test_edge_cases_found_by_fuzzing(eclient, tenants: Tenants, name: str):
    case = bug_case(tenants, name)
    status, headers, text = await send(eclient, case)
    assert 400 <= status < 500, text
    if case.code is None:  # any client-error code will do, as long as it is the envelope
        case = replace(case, code=json.loads(text)["error"]["code"])
    assert not envelope_problems(case, status, headers, text, tenants.secrets)


async def test_database_unreachable_is_503_unavailable(client, world):
    """With the database gone, the answer says so (503, retry later), not a bare 500."""
    from opensense.api.keys import POOL

    await client.app[POOL].close()
    r = await client.get("/v1/sites", headers=world.auth)
    assert r.status == 503
    assert r.headers["Retry-After"] == "5"
    err = (await r.json())["error"]
    assert err["code"] == "unavailable" and err["request_id"] == r.headers["X-Request-Id"]


# --- another account's id on every route that takes one ---------------------------------

# path parameter -> what it names (the `<what>_not_found` code); a new kind of id fails
# the test below until it is added here with one of account B's ids
ID_KINDS = {
    "site_id": "site",
    "device_id": "device",
    "channel_id": "channel",  # a channel or its sensor (snr_) id
    "token_id": "token",
    "event_id": "event",
    "rule_id": "rule",
    "target_id": "target",
    "uplink_id": "uplink",  # a row of the LoRaWAN tray
    "report_id": "report",
    "user_id": "user",  # a dashboard user (account page)
}


def _routes_with_ids(app: web.Application) -> list[tuple[str, str, list[str]]]:
    """(method, path, id placeholders) of every route whose path takes an id, read from
    the router itself, so a route added tomorrow is tried too."""
    out = []
    for route in app.router.routes():
        if route.method == "HEAD" or route.resource is None:
            continue
        info = route.resource.get_info()
        path = info.get("formatter") or info.get("path") or ""
        # an id is a placeholder named `<what>_id`; others (a webhook's path suffix) are not
        names = [n for n in re.findall(r"\{(\w+)(?::[^}]*)?\}", path) if n.endswith("_id")]
        if names:
            out.append((route.method, path, names))
    return sorted(out)


def _operation(method: str, path: str) -> dict[str, Any]:
    from opensense.openapi import document

    return dict(document()["paths"].get(path, {}).get(method.lower(), {}))


def _security(method: str, path: str) -> set[str]:
    return {k for s in _operation(method, path).get("security", []) for k in s}


def _valid_body(method: str, path: str) -> bytes | None:
    """A body the operation's documented schema accepts (its example, or the required
    fields filled in), so the id is what the request is refused for, not the body."""
    from opensense.openapi import document

    if method in ("GET", "DELETE"):
        return None
    content = _operation(method, path).get("requestBody", {}).get("content", {})
    media = content.get("application/json", {})
    if "example" in media:
        return json.dumps(media["example"]).encode()
    for ex in media.get("examples", {}).values():
        if "value" in ex:
            return json.dumps(ex["value"]).encode()
    components = document().get("components", {}).get("schemas", {})

    def fill(schema: dict[str, Any]) -> Any:
        if "$ref" in schema:
            return fill(components[schema["$ref"].rsplit("/", 1)[1]])
        if "example" in schema:
            return schema["example"]
        if "enum" in schema:
            return schema["enum"][0]
        kind = schema.get("type")
        kind = next((k for k in kind if k != "null"), None) if isinstance(kind, list) else kind
        if kind == "object" or "properties" in schema:
            props = schema.get("properties", {})
            return {k: fill(props.get(k, {})) for k in schema.get("required", [])}
        if kind in ("integer", "number"):
            return schema.get("minimum", 0)
        if kind == "string":
            return "x" * max(1, schema.get("minLength", 1))
        if kind == "array":
            return []
        if kind == "boolean":
            return False
        return {}

    return json.dumps(fill(media.get("schema", {}))).encode()


async def _b_ids(client: Any, t: Tenants, dsn: str) -> dict[str, list[str]]:
    """One id of account B for every kind of id (channels: the channel and its sensor)."""
    b = t.b
    rule = await ok(
        await client.post(
            f"/v1/channels/{t.b_chn}/rules",
            json={"kind": "range", "params": {"ok_min": 0, "ok_max": 8}, "grace_min": 5},
            headers=b.auth,
        ),
        201,
    )
    target = await ok(
        await client.post(
            "/v1/targets", json={"path": "email", "address": "b@example.com"}, headers=b.auth
        ),
        201,
    )
    b_evt = "evt_errorsb" + b.account[-8:]
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(
            "INSERT INTO events (id, account_id, channel_id, kind, state, started_at)"
            " VALUES (%s, %s, %s, 'range', 'alarm', now())",
            (b_evt, b.account, t.b_chn),
        )
        cur = await conn.execute(
            "INSERT INTO unassigned_uplinks (account_id, dev_eui, received_at, payload)"
            " VALUES (%s, '70b3d57ed0000b0b', now(), '{}') RETURNING id",
            (b.account,),
        )
        row = await cur.fetchone()
        assert row is not None
        b_uplink = str(row[0])
        b_rpt = "rpt_errorsb" + b.account[-8:]
        await conn.execute(
            "INSERT INTO reports (id, account_id, site_id, template, period_from, period_to,"
            " status, sha256) VALUES (%s, %s, %s, 'haccp_monthly', '2026-01-01', '2026-01-31',"
            " 'ready', repeat('0', 64))",
            (b_rpt, b.account, b.site),
        )
    return {
        "site": [b.site],
        "device": [t.b_dev],
        "channel": [t.b_chn, t.b_snr],
        "token": [t.b_token_id],
        "event": [b_evt],
        "rule": [rule["id"]],
        "user": [await _b_user(dsn, t)],
        "target": [target["id"]],
        "uplink": [b_uplink],
        "report": [b_rpt],
    }


async def _b_rows(dsn: str, t: Tenants) -> list[Any]:
    """Everything of account B a request could change, as rows."""
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        out = []
        for q in (  # whole rows: B makes no request in between, so nothing may move
            "SELECT x.id, to_jsonb(x)::text FROM sites x WHERE x.account_id = %s",
            "SELECT x.id, to_jsonb(x)::text FROM devices x WHERE x.account_id = %s",
            "SELECT x.id, to_jsonb(x)::text FROM channels x WHERE x.account_id = %s",
            "SELECT x.id, to_jsonb(x)::text FROM events x WHERE x.account_id = %s",
            "SELECT x.id, to_jsonb(x)::text FROM rules x"
            " JOIN channels c ON c.id = x.channel_id WHERE c.account_id = %s",
            "SELECT x.id, to_jsonb(x)::text FROM notify_targets x WHERE x.account_id = %s",
            "SELECT x.id, to_jsonb(x)::text FROM tokens x WHERE x.account_id = %s",
            "SELECT x.id, to_jsonb(x)::text FROM unassigned_uplinks x WHERE x.account_id = %s",
            "SELECT x.id, to_jsonb(x)::text FROM reports x WHERE x.account_id = %s",
        ):
            cur = await conn.execute(q + " ORDER BY 1", (t.b.account,))
            out.append(await cur.fetchall())
        return out


async def _page_request(
    client: Any, dsn: str, t: Tenants, method: str
) -> tuple[dict[str, str], bytes | None]:
    """Headers and body of a dashboard request by account A's owner (web/session.py)."""
    from urllib.parse import urlencode

    from opensense.api.keys import CONFIG
    from opensense.web import store as web_store

    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT id FROM users WHERE account_id = %s AND role = 'owner' LIMIT 1", (t.a.account,)
        )
        row = await cur.fetchone()
        assert row is not None
        sid = await web_store.create_session(conn, row[0], client.app[CONFIG].clock())
    headers = {"Cookie": f"os_session={sid}"}
    if method == "GET":
        return headers, None
    form = {"csrf": csrf_token(sid), "note": "a note"}
    headers["Content-Type"] = "application/x-www-form-urlencoded"
    return headers, urlencode(form).encode()


async def _b_user(dsn: str, t: Tenants) -> str:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute("SELECT id FROM users WHERE account_id = %s", (t.b.account,))
        row = await cur.fetchone()
        assert row is not None
        return str(row[0])


async def test_another_accounts_id_on_every_route_is_not_found(eclient, tenants: Tenants, dsn):
    """Account A's token with one of account B's ids, on every route of the router that
    takes an id: 404 `<kind>_not_found` in the envelope, nothing of B shown or changed.
    Skipped by rule only: routes whose path takes no id, and the operator's routes
    (incidents are the server's, no account's)."""
    client, t = eclient, tenants
    ids = await _b_ids(client, t, dsn)
    before = await _b_rows(dsn, t)
    routes = _routes_with_ids(client.app)
    tried, failures = 0, []
    for method, path, names in routes:
        security = _security(method, path)
        if security == {"operatorToken"}:
            continue
        page = not path.startswith("/v1/") and not security  # the dashboard's: a session
        assert "userToken" in security or page, (
            f"{method} {path} takes an id but not a user's token ({security}): decide how "
            "another account's id is refused there and add it to this test"
        )
        unknown = [n for n in names if n not in ID_KINDS]
        assert not unknown, f"{method} {path}: add account B's {unknown} to ID_KINDS/_b_ids"
        for name in names:
            for value in ids[ID_KINDS[name]]:
                # the other placeholders get account B's ids too; on a page, whose
                # checks go from the channel to its event, the channel is A's own
                url = path
                for other in names:
                    fill = value if other == name else ids[ID_KINDS[other]][0]
                    if page and other != name and other == "channel_id":
                        fill = t.a_chn
                    url = re.sub(r"\{" + other + r"(?::[^}]*)?\}", fill, url)
                kind = ID_KINDS[name]
                if value.startswith("snr_"):
                    kind = "sensor"
                headers, body = (
                    {**t.a.auth, "Content-Type": "application/json"},
                    _valid_body(method, path),
                )
                if page:  # A's owner signed in; a form with this session's CSRF token
                    headers, body = await _page_request(client, dsn, t, method)
                case = Case(f"B's {name} on {method} {path}", method, url, f"{kind}_not_found",
                            headers, body)  # fmt: skip
                status, headers, text = await send(client, case)
                tried += 1
                for p in envelope_problems(case, status, headers, text, t.secrets):
                    failures.append(f"{case.name} ({url}): {p}")
    assert not failures, "\n".join(failures)
    # every route with an id of the router was tried, and B is as it was
    assert tried >= len(routes) - 5, (tried, len(routes))
    assert await _b_rows(dsn, t) == before
