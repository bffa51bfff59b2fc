"""Management API: account, sites, devices, channels, user tokens (ua_live_ / whk_)."""

from __future__ import annotations

import logging

from aiohttp import web

from opensense_contract import topics

from ..api import auth
from ..api.body import body_ts, json_object, query_ts
from ..api.jsonutil import response
from ..api.keys import CONFIG, MQTT, POOL
from ..errors import ApiError
from ..mqtt.side import MqttSide
from . import store

log = logging.getLogger(__name__)
routes = web.RouteTableDef()


@routes.get("/v1/account")
async def get_account(request: web.Request) -> web.Response:
    async with request.app[POOL].connection() as conn:
        acc = await auth.account(request, conn)
        cur = await conn.execute(
            "SELECT id, name, email, created_at FROM accounts WHERE id = %s", (acc,)
        )
        row = await cur.fetchone()
    assert row is not None
    return response({"id": row[0], "name": row[1], "email": row[2], "created_at": row[3]})


# --- sites -------------------------------------------------------------------------


@routes.get("/v1/sites")
async def list_sites(request: web.Request) -> web.Response:
    async with request.app[POOL].connection() as conn:
        acc = await auth.account(request, conn)
        return response({"data": await store.list_sites(conn, acc)})


@routes.post("/v1/sites")
async def create_site(request: web.Request) -> web.Response:
    async with request.app[POOL].connection() as conn:
        acc = await auth.account(request, conn)
        body = await json_object(request)
        async with conn.transaction():
            site = await store.create_site(conn, acc, body, actor=auth.actor(request))
    return response(site, status=201)


@routes.get("/v1/sites/{site_id}")
async def get_site(request: web.Request) -> web.Response:
    async with request.app[POOL].connection() as conn:
        acc = await auth.account(request, conn)
        return response(await store.get_site(conn, acc, request.match_info["site_id"]))


@routes.patch("/v1/sites/{site_id}")
async def patch_site(request: web.Request) -> web.Response:
    async with request.app[POOL].connection() as conn:
        acc = await auth.account(request, conn)
        body = await json_object(request)
        async with conn.transaction():
            site = await store.patch_site(
                conn, acc, request.match_info["site_id"], body, actor=auth.actor(request)
            )
    return response(site)


@routes.get("/v1/sites/{site_id}/devices")
async def site_devices(request: web.Request) -> web.Response:
    """Devices at the site now, or (with ?at=) the devices that stood there then."""
    now = request.app[CONFIG].clock()
    async with request.app[POOL].connection() as conn:
        acc = await auth.account(request, conn)
        site = await store.get_site(conn, acc, request.match_info["site_id"])
        at = query_ts(request, "at")
        devs = await store.list_devices(conn, acc, now, site_id=site["id"], at=at)
    return response({"data": devs})


# --- devices -----------------------------------------------------------------------


@routes.get("/v1/devices")
async def list_devices(request: web.Request) -> web.Response:
    now = request.app[CONFIG].clock()
    async with request.app[POOL].connection() as conn:
        acc = await auth.account(request, conn)
        return response({"data": await store.list_devices(conn, acc, now)})


@routes.post("/v1/devices")
async def create_device(request: web.Request) -> web.Response:
    cfg = request.app[CONFIG]
    async with request.app[POOL].connection() as conn:
        acc = await auth.account(request, conn)
        body = await json_object(request)
        async with conn.transaction():
            dev, token = await store.create_device(
                conn, acc, body, cfg.bcrypt_rounds, cfg.clock(), actor=auth.actor(request)
            )
    await request.app[MQTT].credentials_changed(dev["id"], acc, dev["local_id"], token)
    return response({**dev, "ingest_token": token}, status=201)


@routes.get("/v1/devices/{device_id}")
async def get_device(request: web.Request) -> web.Response:
    now = request.app[CONFIG].clock()
    async with request.app[POOL].connection() as conn:
        acc = await auth.account(request, conn)
        return response(await store.get_device(conn, acc, request.match_info["device_id"], now))


@routes.patch("/v1/devices/{device_id}")
async def patch_device(request: web.Request) -> web.Response:
    now = request.app[CONFIG].clock()
    async with request.app[POOL].connection() as conn:
        acc = await auth.account(request, conn)
        body = await json_object(request)
        async with conn.transaction():
            before = await store.get_device(conn, acc, request.match_info["device_id"], now)
            dev = await store.patch_device(
                conn, acc, request.match_info["device_id"], body, now, actor=auth.actor(request)
            )
    if dev["cadence_s"] != before["cadence_s"]:
        await send_cadence(request.app[MQTT], dev["id"], acc, dev["local_id"], dev["cadence_s"])
    return response(dev)


async def send_cadence(
    mqtt: MqttSide, device_id: str, account_id: str, local_id: str, cadence_s: int
) -> None:
    """cmd/cadence to the node: retained, so a node that is offline now gets it when it
    reconnects (PATCH above; again when its info reports another cadence, mqtt/ingest.py).
    The change is committed already, so a broker that refuses is logged, not an error."""
    try:
        await mqtt.publish(
            topics.topic(account_id, local_id, "cmd/cadence"),
            str(cadence_s).encode(),
            qos=1,
            retain=True,
        )
    except ApiError as err:
        log.warning("cmd/cadence for %s not sent: %s", device_id, err.message)


async def send_identify(mqtt: MqttSide, account_id: str, local_id: str) -> None:
    """cmd/identify to the node (QoS 1, not retained: a node offline now never blinks
    later); the dashboard's device page sends it too."""
    if not await mqtt.publish(topics.topic(account_id, local_id, "cmd/identify"), b"1", qos=1):
        raise ApiError(
            "conflict",
            "this server runs without MQTT (OPENSENSE_MQTT=off): commands cannot reach nodes",
        )


@routes.post("/v1/devices/{device_id}/identify")
async def identify_device(request: web.Request) -> web.Response:
    """Blink the node's LED (cmd/identify) so an installer finds it in the fridge."""
    now = request.app[CONFIG].clock()
    async with request.app[POOL].connection() as conn:
        acc = await auth.account(request, conn)
        dev = await store.get_device(conn, acc, request.match_info["device_id"], now)
    await send_identify(request.app[MQTT], acc, dev["local_id"])
    return response({"device_id": dev["id"], "sent": "cmd/identify"}, status=202)


@routes.delete("/v1/devices/{device_id}")
async def delete_device(request: web.Request) -> web.Response:
    now = request.app[CONFIG].clock()
    async with request.app[POOL].connection() as conn:
        acc = await auth.account(request, conn)
        async with conn.transaction():
            dev = await store.get_device(conn, acc, request.match_info["device_id"], now)
            await store.delete_device(conn, acc, dev["id"], now, actor=auth.actor(request))
    await request.app[MQTT].device_deleted(dev["id"])
    return web.Response(status=204)


@routes.post("/v1/devices/{device_id}/rotate-token")
async def rotate_token(request: web.Request) -> web.Response:
    cfg = request.app[CONFIG]
    async with request.app[POOL].connection() as conn:
        acc = await auth.account(request, conn)
        async with conn.transaction():
            dev, token = await store.rotate_device_token(
                conn,
                acc,
                request.match_info["device_id"],
                cfg.bcrypt_rounds,
                cfg.clock(),
                actor=auth.actor(request),
            )
    await request.app[MQTT].credentials_changed(dev["id"], acc, dev["local_id"], token)
    return response({**dev, "ingest_token": token})


@routes.post("/v1/devices/{device_id}/move")
async def move_device(request: web.Request) -> web.Response:
    now = request.app[CONFIG].clock()
    async with request.app[POOL].connection() as conn:
        acc = await auth.account(request, conn)
        body = await json_object(request)
        effective = body_ts(body, "effective_at") or now
        async with conn.transaction():
            dev = await store.move_device(
                conn,
                acc,
                request.match_info["device_id"],
                body.get("site_id"),
                effective,
                now,
                actor=auth.actor(request),
            )
    # this process's broker side at once (the others by the NOTIFY sent at commit): a
    # live MQTT session holds the device's site vertical, whose default rules a probe
    # first heard after the move gets
    await request.app[MQTT].channels_changed(dev["id"])
    return response(dev)


@routes.get("/v1/devices/{device_id}/placements")
async def device_placements(request: web.Request) -> web.Response:
    async with request.app[POOL].connection() as conn:
        acc = await auth.account(request, conn)
        return response(
            {"data": await store.placements(conn, acc, request.match_info["device_id"])}
        )


# --- channels ----------------------------------------------------------------------


@routes.get("/v1/channels")
async def list_channels(request: web.Request) -> web.Response:
    async with request.app[POOL].connection() as conn:
        acc = await auth.account(request, conn)
        dev = request.query.get("device_id") or None
        return response({"data": await store.list_channels(conn, acc, dev)})


@routes.get("/v1/channels/{channel_id}")
async def get_channel(request: web.Request) -> web.Response:
    async with request.app[POOL].connection() as conn:
        acc = await auth.account(request, conn)
        row = await store.channel_row(conn, acc, request.match_info["channel_id"])
    return response(store.channel_public(row))


@routes.patch("/v1/channels/{channel_id}")
async def patch_channel(request: web.Request) -> web.Response:
    now = request.app[CONFIG].clock()
    async with request.app[POOL].connection() as conn:
        acc = await auth.account(request, conn)
        body = await json_object(request)
        async with conn.transaction():
            ch = await store.patch_channel(
                conn, acc, request.match_info["channel_id"], body, now, actor=auth.actor(request)
            )
    if "offset" in body:
        # this process's broker side at once (the others by the NOTIFY sent at commit):
        # the next reading of a live MQTT session gets the new offset
        await request.app[MQTT].channels_changed(ch["device_id"])
    return response(ch)


# --- user tokens -------------------------------------------------------------------


@routes.get("/v1/tokens")
async def list_tokens(request: web.Request) -> web.Response:
    now = request.app[CONFIG].clock()
    async with request.app[POOL].connection() as conn:
        acc = await auth.account(request, conn)
        return response({"data": await store.list_tokens(conn, acc, now)})


@routes.post("/v1/tokens")
async def create_token(request: web.Request) -> web.Response:
    """A new ua_live_ (management) or whk_ (inbound webhook) token, shown once."""
    cfg = request.app[CONFIG]
    async with request.app[POOL].connection() as conn:
        acc = await auth.account(request, conn)
        body = await json_object(request)
        kind, name = store.check_token_request(body)
        async with conn.transaction():
            tid, plaintext = await store.create_token(
                conn, acc, kind, cfg.bcrypt_rounds, name, actor=auth.actor(request)
            )
    return response({"id": tid, "kind": kind, "name": name, "token": plaintext}, status=201)


@routes.delete("/v1/tokens/{token_id}")
async def revoke_token(request: web.Request) -> web.Response:
    now = request.app[CONFIG].clock()
    async with request.app[POOL].connection() as conn:
        acc = await auth.account(request, conn)
        async with conn.transaction():
            await store.revoke_token(
                conn, acc, request.match_info["token_id"], now, actor=auth.actor(request)
            )
    return web.Response(status=204)
