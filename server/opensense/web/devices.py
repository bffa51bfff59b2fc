"""Devices: the account's sites and their devices, one device's health with token
rotation, moving and identify, and adding a device, ending with what to paste into
it (docs/dashboard.md, "Devices").

Every change goes through the API's own operations (devices/store.py) in one
transaction: a refusal is the API's message next to the field and changes nothing."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from aiohttp import web
from psycopg import AsyncConnection

from ..api.keys import CONFIG, MQTT, POOL
from ..devices import store as devices
from ..devices.routes import send_identify
from ..errors import ApiError
from ..settings import Config
from .forms import errors_of, posted, text
from .session import render, require, signed_in
from .store import User

routes = web.RouteTableDef()


@dataclass(frozen=True)
class DeviceKind:
    """What "Add a device" offers: the model it stores, and what the result says to
    paste where (`paste_for`)."""

    label: str
    model: str
    door: str  # node, shelly or lorawan: which paste text


# the kinds "Add a device" offers, as data (docs/dashboard.md, "Add a device")
DEVICE_KINDS = {
    "node": DeviceKind("OpenSense node (ESP32, `opensense node flash`)", "diy_esp32", "node"),
    "shelly": DeviceKind("Shelly H&T (Gen1, Gen2 Plus)", "shelly_ht", "shelly"),
    "shelly_gen3": DeviceKind("Shelly H&T Gen3 (battery in volts)", "shelly_ht_gen3", "shelly"),
    "lorawan": DeviceKind("LoRaWAN sensor via The Things Stack (TTN)", "lorawan", "lorawan"),
}
ADD_FIELDS = ("site_id", "name", "local_id", "kind", "dev_eui")
KIND_INVALID = f"kind must be one of {', '.join(DEVICE_KINDS)}"

# The health figures the device page shows: (label, channel kind, channel label or
# None for any, the key in the node's retained info as a fallback).
HEALTH = (
    ("Signal (RSSI)", "signal", None, None),
    ("Battery", "battery", None, None),
    ("Queue depth", "health", "queue_depth", "queue_depth"),
    ("Uptime", "health", "uptime", "uptime"),
)

LATEST_SQL = """
SELECT c.id, c.kind, c.label, c.unit, c.name, m.value, m.ts
  FROM channels c
  LEFT JOIN LATERAL (
      SELECT x.value, x.ts FROM measurements x WHERE x.channel_num = c.num
       ORDER BY x.ts DESC LIMIT 1
  ) m ON true
 WHERE c.account_id = %s AND c.device_id = %s
 ORDER BY c.kind, c.label, c.id
"""


def fmt_value(value: float | None, unit: str) -> str:
    if value is None:
        return "–"
    if unit == "s":
        s = int(value)
        return f"{s // 86400} d {s % 86400 // 3600} h {s % 3600 // 60} min"
    if unit == "1":  # a count
        return f"{value:g}"
    return f"{value:g} {unit}".strip()


def fmt_ts(ts: datetime | None) -> str:
    return "never" if ts is None else ts.strftime("%Y-%m-%d %H:%M:%S UTC")


async def health(
    conn: AsyncConnection[Any], user: User, dev: dict[str, Any], info: dict[str, Any]
) -> tuple[list[dict[str, str]], list[dict[str, Any]]]:
    """(health figures, the device's other channels with their last value)."""
    cur = await conn.execute(LATEST_SQL, (user.account_id, dev["id"]))
    chans = await cur.fetchall()
    figures = []
    for label, kind, chan_label, info_key in HEALTH:
        hit = next(
            (c for c in chans if c[1] == kind and (chan_label is None or c[2] == chan_label)),
            None,
        )
        if hit is not None and hit[5] is not None:
            figures.append(
                {"label": label, "value": fmt_value(hit[5], hit[3]), "at": fmt_ts(hit[6])}
            )
        elif info_key and isinstance(info.get(info_key), int | float):
            unit = "s" if info_key == "uptime" else ""
            figures.append(
                {"label": label, "value": fmt_value(info[info_key], unit), "at": "at last connect"}
            )
        else:
            figures.append({"label": label, "value": "not reported", "at": ""})
    channels = [
        {"id": c[0], "name": c[4], "kind": c[1], "value": fmt_value(c[5], c[3]), "at": fmt_ts(c[6])}
        for c in chans
    ]
    return figures, channels


async def device_context(
    request: web.Request, conn: AsyncConnection[Any], user: User, device_id: str
) -> dict[str, Any]:
    """What the device page shows; another account's id is 404 (device_not_found)."""
    now = request.app[CONFIG].clock()
    dev = await devices.get_device(conn, user.account_id, device_id, now)
    cur = await conn.execute(
        "SELECT info, connected, connected_changed_at FROM devices WHERE id = %s", (dev["id"],)
    )
    row = await cur.fetchone()
    assert row is not None
    info = row[0] if isinstance(row[0], dict) else {}
    figures, channels = await health(conn, user, dev, info)
    sites = await devices.list_sites(conn, user.account_id)
    site = next((s for s in sites if s["id"] == dev["site_id"]), None)
    return {
        "dev": dev,
        "site": site,
        "sites": [s for s in sites if s["id"] != dev["site_id"]],
        "figures": figures,
        "channels": channels,
        "last_seen": fmt_ts(dev["last_seen_at"]),
        "connected": row[1],
        "connected_at": fmt_ts(row[2]) if row[2] else "",
        "token_created": fmt_ts(dev["token"]["created_at"]) if dev["token"] else "",
        "errors": {},
        "new_token": None,
        "notice": None,
    }


async def device_page(
    request: web.Request,
    conn: AsyncConnection[Any],
    user: User,
    device_id: str,
    status: int = 200,
    **over: Any,
) -> web.Response:
    ctx = await device_context(request, conn, user, device_id)
    ctx.update(over)
    return render(request, user, "devices_one.html", ctx, status=status)


@routes.get("/devices")
async def device_list(request: web.Request) -> web.Response:
    now = request.app[CONFIG].clock()
    async with request.app[POOL].connection() as conn:
        user = await signed_in(request, conn)
        sites = await devices.list_sites(conn, user.account_id)
        devs = await devices.list_devices(conn, user.account_id, now)
    by_site = [
        {
            "site": s,
            "devices": [
                {**d, "last_seen": fmt_ts(d["last_seen_at"])}
                for d in devs
                if d["site_id"] == s["id"]
            ],
        }
        for s in sites
    ]
    return render(request, user, "devices.html", {"by_site": by_site})


@routes.get("/devices/new")
async def add_form(request: web.Request) -> web.Response:
    async with request.app[POOL].connection() as conn:
        user = await signed_in(request, conn)
        require(user, "manager")
        sites = await devices.list_sites(conn, user.account_id)
    return render(request, user, "devices_new.html", add_context(sites, {}, {}))


def add_context(sites: list[dict[str, Any]], values: Any, errors: dict[str, str]) -> dict[str, Any]:
    return {
        "sites": sites,
        "kinds": DEVICE_KINDS,
        "values": {k: text(values, k) or "" for k in ADD_FIELDS},
        "errors": errors,
    }


@routes.post("/devices/new")
async def add_submit(request: web.Request) -> web.Response:
    cfg = request.app[CONFIG]
    async with request.app[POOL].connection() as conn:
        user, form = await posted(request, conn, "manager")
        kind = DEVICE_KINDS.get(text(form, "kind") or "")
        body: dict[str, Any] = {
            "site_id": text(form, "site_id"),
            "name": text(form, "name"),
            "local_id": text(form, "local_id"),
            "model": kind.model if kind else None,
            "dev_eui": (text(form, "dev_eui") or "").strip() or None,
        }
        whk = None
        try:
            if kind is None:
                raise ApiError("invalid_request", KIND_INVALID)
            async with conn.transaction():
                dev, token = await devices.create_device(
                    conn, user.account_id, body, cfg.bcrypt_rounds, cfg.clock(), actor=user.id
                )
                if kind.door == "lorawan" and user.role == "owner":
                    _, whk = await devices.create_token(
                        conn,
                        user.account_id,
                        "whk",
                        cfg.bcrypt_rounds,
                        f"TTN webhook ({dev['local_id']})",
                        actor=user.id,
                    )
        except ApiError as err:
            sites = await devices.list_sites(conn, user.account_id)
            ctx = add_context(sites, form, errors_of(err, ADD_FIELDS))
            return render(request, user, "devices_new.html", ctx, status=err.status)
    await request.app[MQTT].credentials_changed(dev["id"], user.account_id, dev["local_id"], token)
    paste = paste_for(cfg, kind, user.account_id, dev, token, whk)
    ctx = {"dev": dev, "kind": kind, "paste": paste}
    return render(request, user, "devices_added.html", ctx, status=201)


def paste_for(
    cfg: Config,
    kind: DeviceKind,
    account_id: str,
    dev: dict[str, Any],
    token: str,
    whk: str | None,
) -> dict[str, Any]:
    """What to paste where for the new device (docs/firmware.md, docs/api.md "Third-party
    doors"): the node's config.json, the Shelly's action URL, or the TTN webhook."""
    base = cfg.public_url.rstrip("/")
    if kind.door == "node":
        hosts = [h.strip() for h in cfg.mqtt_hostnames.split(",") if h.strip()]
        server: dict[str, Any] = {"host": hosts[0] if hosts else "", "mqtt_port": cfg.mqtt_port}
        if base.startswith("https://"):
            server["https_url"] = base
        config = {
            "wifi": {"ssid": "YOUR-WIFI", "password": "YOUR-WIFI-PASSWORD"},
            "server": server,
            "account": account_id,
            "device_id": dev["id"],
            "local_id": dev["local_id"],
            "token": token,
            "probes": {},
            "cadence": dev["cadence_s"],
        }
        return {
            "door": "node",
            "config": json.dumps(config, indent=2, ensure_ascii=False),
            "commands": (
                "opensense ca --der ca.der\n"
                "opensense node check node.json --ca ca.der\n"
                "opensense node flash node.json --ca ca.der --port /dev/ttyUSB0"
            ),
        }
    if kind.door == "shelly":
        url = f"{base}/v1/ingest/shelly?token={token}&temp=${{ev.tC}}&hum=${{ev.rh}}"
        return {"door": "shelly", "url": url}
    return {
        "door": "lorawan",
        "url": f"{base}/v1/ingest/lorawan",
        "header": f"Bearer {whk}" if whk else None,
        "dev_eui": dev["dev_eui"],
    }


@routes.get("/devices/{device_id}")
async def device_one(request: web.Request) -> web.Response:
    async with request.app[POOL].connection() as conn:
        user = await signed_in(request, conn)
        return await device_page(request, conn, user, request.match_info["device_id"])


@routes.post("/devices/{device_id}/rotate-token")
async def rotate(request: web.Request) -> web.Response:
    """A new ingest token, shown on this answer only; the old one is revoked in the same
    transaction, so its next request fails (docs/api.md, Tokens)."""
    cfg = request.app[CONFIG]
    async with request.app[POOL].connection() as conn:
        user, _ = await posted(request, conn, "manager")
        async with conn.transaction():
            dev, token = await devices.rotate_device_token(
                conn,
                user.account_id,
                request.match_info["device_id"],
                cfg.bcrypt_rounds,
                cfg.clock(),
                actor=user.id,
            )
        await request.app[MQTT].credentials_changed(
            dev["id"], user.account_id, dev["local_id"], token
        )
        return await device_page(request, conn, user, dev["id"], new_token=token)


@routes.post("/devices/{device_id}/move")
async def move(request: web.Request) -> web.Response:
    now = request.app[CONFIG].clock()
    device_id = request.match_info["device_id"]
    async with request.app[POOL].connection() as conn:
        user, form = await posted(request, conn, "manager")
        await devices.get_device(conn, user.account_id, device_id, now)  # 404 first
        try:
            async with conn.transaction():
                dev = await devices.move_device(
                    conn, user.account_id, device_id, text(form, "site_id"), now, now, actor=user.id
                )
        except ApiError as err:
            return await device_page(
                request, conn, user, device_id, err.status, errors=errors_of(err, ("site_id",))
            )
        return await device_page(request, conn, user, dev["id"], notice="Moved.")


@routes.post("/devices/{device_id}/identify")
async def identify(request: web.Request) -> web.Response:
    """cmd/identify, as the API's POST /v1/devices/{id}/identify sends it."""
    now = request.app[CONFIG].clock()
    device_id = request.match_info["device_id"]
    async with request.app[POOL].connection() as conn:
        user, _ = await posted(request, conn, "operator")
        dev = await devices.get_device(conn, user.account_id, device_id, now)
        try:
            await send_identify(request.app[MQTT], user.account_id, dev["local_id"])
        except ApiError as err:
            return await device_page(
                request, conn, user, dev["id"], err.status, errors={"identify": err.message}
            )
        notice = (
            "Identify sent: a connected OpenSense node blinks its LED for 2 s. It is not kept"
            " for a node that is offline now; Shelly and LoRaWAN devices ignore it."
        )
        return await device_page(request, conn, user, dev["id"], notice=notice)
