"""The OpenAPI 3.1 document at /v1/openapi.json. A test holds it to the router:
every route the app serves is documented here, and schemathesis checks that the
answers match it."""

from __future__ import annotations

from aiohttp import web

from opensense_contract.payload import ENTRY_KEYS, MAX_MEASUREMENTS
from opensense_contract.topics import CADENCE_MAX_S, CADENCE_MIN_S

from . import __version__
from .alarms import openapi as alarms_doc  # the alarm routes document themselves
from .api.spec import (
    ID,
    MODEL,
    NAME,
    NTS,
    TS,
    S,
    body,
    err,
    listing,
    obj,
    ok,
    op,
    path_param,
    q,
    ref,
)
from .errors import CODES
from .ingest.tray import STATES as TRAY_STATES
from .kinds import KINDS
from .presets import VERTICALS
from .reports import apidoc as reports_doc
from .reports import verify_apidoc as report_verify_doc
from .status import apidoc as status_doc
from .storage.read import AGGS, FNS
from .web import apidoc as web_doc

routes = web.RouteTableDef()

# a device's cadence: what a node's firmware takes (opensense_contract.topics)
CADENCE = {"type": "integer", "minimum": CADENCE_MIN_S, "maximum": CADENCE_MAX_S}

SCHEMAS: S = {
    "Error": obj(
        {
            "error": obj(
                {
                    "code": {"type": "string", "enum": sorted(CODES)},
                    "message": {"type": "string"},
                    "request_id": {"type": "string", "pattern": "^req_"},
                },
                ("code", "message", "request_id"),
            )
        },
        ("error",),
    ),
    "Measurement": obj(
        {
            "type": {"type": "string", "enum": list(KINDS)},
            "value": {"type": "number"},
            "label": {"type": "string", "maxLength": 64},
            "unit": {"type": "string"},
            "ts": TS,
            "seq": {"type": "integer"},
        },
        ("type", "value"),
        extra=False,
    ),
    "IngestRequest": obj(
        {
            "device": {"type": "string", "minLength": 1, "maxLength": 64},
            "ts": TS,
            "measurements": {
                "type": "array",
                "minItems": 1,
                "maxItems": MAX_MEASUREMENTS,
                "items": ref("Measurement"),
            },
        },
        ("measurements",),
        extra=False,
    ),
    "IngestAnswer": obj(
        {
            "accepted": {"type": "integer", "minimum": 0},
            "deduplicated": {"type": "integer", "minimum": 0},
            "unassigned": {"type": "boolean"},
            "simulated": {"type": "boolean"},
            "duplicate": {"type": "boolean"},
            "ignored_event": {"type": "string"},
            "ignored": {"type": "array", "items": {"type": "string"}},
            "channels": {
                "type": "array",
                "items": obj(
                    {
                        "type": {"type": "string"},
                        "label": {"type": "string"},
                        "channel_id": {"type": "string", "pattern": "^chn_"},
                    },
                    ("type", "label", "channel_id"),
                ),
            },
        },
        ("accepted", "deduplicated", "channels"),
    ),
    "TtnUplink": obj(
        {
            "end_device_ids": obj({"dev_eui": {"type": "string"}}, ("dev_eui",)),
            "uplink_message": obj(
                {
                    "decoded_payload": obj(
                        {
                            "measurements": {
                                "type": "array",
                                "items": obj(
                                    {"type": {"type": "string"}, "value": {"type": "number"}},
                                    ("type", "value"),
                                ),
                            },
                            "battery": {"type": "number"},
                        }
                    ),
                    "rx_metadata": {
                        "type": "array",
                        "items": obj({"rssi": {"type": "number"}, "snr": {"type": "number"}}),
                    },
                }
            ),
        },
        ("end_device_ids", "uplink_message"),
    ),
    "Account": obj(
        {"id": ID, "name": {"type": "string"}, "email": {"type": "string"}, "created_at": TS},
        ("id", "name", "email", "created_at"),
    ),
    "Site": obj(
        {
            "id": ID,
            "name": {"type": "string"},
            "address": {"type": "string"},
            "timezone": {"type": "string"},
            "vertical": {"type": "string", "enum": list(VERTICALS)},
            "opening_hours": {"type": "object"},
            "report_options": {"type": "object"},
            "report_recipients": {"type": "array", "items": {"type": "string"}},
            "created_at": TS,
        },
        ("id", "name", "timezone", "vertical", "created_at"),
    ),
    "SiteCreate": obj(
        {
            "name": NAME,
            "address": {"type": "string", "maxLength": 500},
            "timezone": {
                "type": "string",
                "maxLength": 64,
                "description": "IANA time zone, e.g. Europe/Berlin",
            },
            "vertical": {"type": "string", "enum": list(VERTICALS)},
        },
        ("name",),
    ),
    "SitePatch": obj(
        {
            "name": NAME,
            "address": {"type": "string", "maxLength": 500},
            "timezone": {"type": "string", "maxLength": 64},
            "vertical": {"type": "string", "enum": list(VERTICALS)},
            "opening_hours": {"type": "object"},
            "report_options": {"type": "object"},
            "report_recipients": {
                "type": "array",
                "maxItems": 20,
                "items": {"type": "string", "pattern": "@", "description": "an email address"},
                "description": "the monthly report's email recipients (docs/reports.md)",
            },
        },
    ),
    "TokenInfo": obj(
        {
            "id": ID,
            "kind": {"type": "string", "enum": ["ds_live", "ua_live", "whk", "gw"]},
            "name": {"type": "string"},
            "device_id": {"type": ["string", "null"]},
            "created_at": TS,
            "last_used_at": NTS,
            "revoked_at": NTS,
            "rotate_recommended": {"type": "boolean"},
        },
        ("id", "kind", "created_at", "rotate_recommended"),
    ),
    "Device": obj(
        {
            "id": ID,
            "local_id": {"type": "string"},
            "name": {"type": "string"},
            "model": {"type": "string"},
            "site_id": {"type": "string"},
            "fw_version": {"type": ["string", "null"]},
            "dev_eui": {"type": ["string", "null"]},
            "cadence_s": {"type": "integer"},
            "last_seen_at": NTS,
            "online": {"type": "boolean"},
            "token": {"oneOf": [ref("TokenInfo"), {"type": "null"}]},
            "uplink_problem": {
                "oneOf": [
                    obj(
                        {
                            "id": {"type": "integer"},
                            "state": {"type": "string"},
                            "reason": {"type": ["string", "null"]},
                            "received_at": TS,
                        }
                    ),
                    {"type": "null"},
                ],
                "description": "the newest of its uplinks still in the LoRaWAN tray",
            },
            "created_at": TS,
            "ingest_token": {
                "type": "string",
                "description": "only in create and rotate answers, shown once",
            },
        },
        ("id", "local_id", "name", "model", "site_id", "cadence_s", "online", "created_at"),
    ),
    "DeviceCreate": obj(
        {
            "site_id": ID,
            "local_id": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"},
            "name": NAME,
            "model": MODEL,
            "cadence_s": CADENCE,
            "dev_eui": {"type": "string", "pattern": "^[0-9A-Fa-f]{16}$"},
        },
        ("site_id", "local_id"),
    ),
    "DevicePatch": obj(
        {
            "name": NAME,
            "model": MODEL,
            "cadence_s": CADENCE,
            "dev_eui": {"type": ["string", "null"], "pattern": "^[0-9A-Fa-f]{16}$"},
        }
    ),
    "TrayUplink": obj(
        {
            "id": {"type": "integer"},
            "dev_eui": {"type": ["string", "null"]},
            "network": {"type": ["string", "null"], "enum": ["tts", "chirpstack", None]},
            "state": {"type": "string", "enum": list(TRAY_STATES)},
            "reason": {"type": ["string", "null"]},
            "device_id": {"type": ["string", "null"]},
            "received_at": TS,
            "uplink_key": {"type": ["string", "null"]},
            "resolved_at": NTS,
            "resolved_by": {"type": ["string", "null"]},
            "payload": {},
        },
        ("id", "state", "received_at", "payload"),
    ),
    "TrayAssign": obj({"device_id": {"type": "string"}}, ("device_id",), extra=False),
    "TrayAssigned": obj(
        {
            "device_id": ID,
            "dev_eui": {"type": "string"},
            "accepted": {"type": "integer", "minimum": 0},
            "remaining": {
                "type": "integer",
                "minimum": 0,
                "description": "unassigned uplinks of this DevEUI left (500 per call)",
            },
            "uplinks": {
                "type": "array",
                "items": obj(
                    {
                        "id": {"type": "integer"},
                        "state": {"type": "string"},
                        "accepted": {"type": "integer"},
                        "deduplicated": {"type": "integer"},
                        "reason": {"type": ["string", "null"]},
                    },
                    ("id", "state", "accepted", "deduplicated"),
                ),
            },
        },
        ("device_id", "dev_eui", "accepted", "uplinks", "remaining"),
    ),
    "Move": obj({"site_id": ID, "effective_at": TS}, ("site_id",)),
    "Placement": obj({"site_id": ID, "effective_from": TS}, ("site_id", "effective_from")),
    "Rule": obj(
        {
            "id": ID,
            "kind": {"type": "string"},
            "params": {"type": "object"},
            "grace_min": {"type": "integer"},
            "severity": {"type": "string"},
            "enabled": {"type": "boolean"},
        },
        ("id", "kind", "params"),
    ),
    "Channel": obj(
        {
            "id": ID,
            "sensor_id": ID,
            "device_id": ID,
            "kind": {"type": "string"},
            "label": {"type": "string"},
            "unit": {"type": "string"},
            "name": {"type": "string"},
            "offset": {"type": "number"},
            "auxiliary": {"type": "boolean"},
            "rules": {"type": "array", "items": ref("Rule")},
            "created_at": TS,
        },
        ("id", "sensor_id", "device_id", "kind", "label", "unit", "name", "offset", "rules"),
    ),
    "ChannelPatch": obj(
        {
            "name": NAME,
            "offset": {"type": "number", "minimum": -50, "maximum": 50},
            "ok_min": {"type": ["number", "null"]},
            "ok_max": {"type": ["number", "null"]},
            "grace_min": {"type": "integer", "minimum": 0, "maximum": 10080},
        },
    ),
    "Series": obj(
        {
            "channel_id": ID,
            "agg": {"type": "string", "enum": list(AGGS)},
            "fn": {"type": ["string", "null"]},
            "data": {
                "type": "array",
                # [ts (RFC 3339), value]. Not spelled with prefixItems: schemathesis 4
                # rewrites prefixItems in response schemas into an invalid draft-4 tuple.
                "items": {
                    "type": "array",
                    "items": {"type": ["string", "number"]},
                    "minItems": 2,
                    "maxItems": 2,
                    "description": "[ts, value]: an RFC 3339 timestamp, then a number",
                },
            },
            "next_cursor": {"type": ["string", "null"]},
            "has_more": {"type": "boolean"},
        },
        ("channel_id", "agg", "data", "next_cursor", "has_more"),
    ),
    "TokenCreate": obj(
        {
            "kind": {"type": "string", "enum": ["ua_live", "whk"]},
            "name": {"type": "string", "maxLength": 200},
        }
    ),
    "TokenCreated": obj(
        {
            "id": ID,
            "kind": {"type": "string"},
            "name": {"type": "string"},
            "token": {"type": "string"},
        },
        ("id", "kind", "token"),
    ),
}


INGEST_EXAMPLE: S = {
    "device": "fridge01",
    "measurements": [
        {"type": "temperature", "value": 4.2, "label": "front"},
        {"type": "humidity", "value": 61},
    ],
}
TTN_EXAMPLE: S = {
    "end_device_ids": {"dev_eui": "70B3D57ED0000001"},
    "uplink_message": {
        "decoded_payload": {"measurements": [{"type": "temperature", "value": 3.5}], "battery": 90},
        "rx_metadata": [{"rssi": -97, "snr": 7.5}],
    },
}


MGMT_ERR = (400, 401, 404, 413, 429)

READ_PARAMS = [
    q("from", TS, "inclusive start; default: 24 h before `to`"),
    q("to", TS, "exclusive end; default: now"),
    q("agg", {"type": "string", "enum": list(AGGS)}),
    q("fn", {"type": "string", "enum": list(FNS)}),
    q("limit", {"type": "integer", "minimum": 1, "maximum": 5000}),
    q("cursor", {"type": "string"}),
]


def document() -> S:

    def lorawan_op() -> S:
        """The LoRaWAN door's operation: the same with or without a path suffix."""
        return op(
            "LoRaWAN webhook: The Things Stack v3 or ChirpStack v4 (token: whk_)",
            {
                **ok(200, ref("IngestAnswer"), "Stored, a duplicate, simulated, or not an uplink"),
                **ok(202, ref("IngestAnswer"), "Unknown dev_eui: kept in the tray"),
                **err(400, 401, 404, 413, 422, 429),
            },
            security=[{"webhookToken": []}],
            parameters=[
                q("event", {"type": "string"}, "ChirpStack's event type (up, join, ...)"),
            ],
            requestBody=body(ref("TtnUplink"), TTN_EXAMPLE),
            description="docs/api.md, LoRaWAN: what to paste where on each network.",
        )

    ingest_err = err(400, 401, 403, 404, 409, 413, 422, 429)
    paths: S = {
        "/v1/ingest": {
            "post": op(
                "Send readings (the product's ingest payload)",
                {**ok(200, ref("IngestAnswer")), **ingest_err},
                security=[{"deviceToken": []}],
                parameters=[
                    {
                        "name": "X-Device-Id",
                        "in": "header",
                        "required": False,
                        "schema": {"type": "string"},
                    },
                    {
                        "name": "Idempotency-Key",
                        "in": "header",
                        "required": False,
                        "schema": {"type": "string", "minLength": 1, "maxLength": 200},
                    },
                ],
                requestBody=body(ref("IngestRequest"), INGEST_EXAMPLE),
                description=f"1–{MAX_MEASUREMENTS} measurements; entry fields: {', '.join(sorted(ENTRY_KEYS))}.",
            )
        },
        "/v1/ingest/shelly": {
            "get": op(
                "Send readings as GET parameters (Shelly H&T)",
                {**ok(200, ref("IngestAnswer")), **err(400, 401, 403, 404, 422, 429)},
                security=[{"shellyToken": []}, {"deviceToken": []}],
                parameters=[
                    q("device", {"type": "string"}, example="fridge01"),
                    q("temp", {"type": "number"}, example=4.5),
                    q("hum", {"type": "number"}, example=61),
                    q("battery", {"type": "number"}),
                    q("signal", {"type": "number"}),
                    q("ts", {"type": "string"}),
                ],
            )
        },
        "/v1/ingest/lorawan": {
            "post": lorawan_op(),
        },
        "/v1/ingest/lorawan/{suffix}": {
            "parameters": [
                {
                    **path_param("suffix"),
                    "schema": {"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,64}$"},
                    "description": "a per-message path (TTS appends it to the base URL)",
                }
            ],
            "post": lorawan_op(),
        },
        "/v1/lorawan/unassigned": {
            "get": op(
                "The LoRaWAN tray: open uplinks (or one state's), oldest first",
                {**ok(200, listing("TrayUplink")), **err(400, 401, 429)},
                parameters=[
                    q("state", {"type": "string", "enum": list(TRAY_STATES)}),
                    q("dev_eui", {"type": "string"}),
                    q("limit", {"type": "integer", "minimum": 1, "maximum": 500}),
                ],
            )
        },
        "/v1/lorawan/unassigned/{uplink_id}/assign": {
            "parameters": [path_param("uplink_id")],
            "post": op(
                "Assign an unknown DevEUI's uplinks to a device; readings replayed once",
                {**ok(200, ref("TrayAssigned")), **err(*MGMT_ERR, 409)},
                requestBody=body(ref("TrayAssign")),
            ),
        },
        "/v1/lorawan/unassigned/{uplink_id}": {
            "parameters": [path_param("uplink_id")],
            "delete": op(
                "Discard an uplink from the tray (kept, marked discarded)",
                {**ok(204, None, "Discarded"), **err(401, 404, 409, 429)},
            ),
        },
        "/v1/account": {
            "get": op("The token's account", {**ok(200, ref("Account")), **err(401, 429)})
        },
        "/v1/sites": {
            "get": op("List sites", {**ok(200, listing("Site")), **err(401, 429)}),
            "post": op(
                "Create a site",
                {**ok(201, ref("Site")), **err(*MGMT_ERR)},
                requestBody=body(ref("SiteCreate")),
            ),
        },
        "/v1/sites/{site_id}": {
            "parameters": [path_param("site_id")],
            "get": op("A site", {**ok(200, ref("Site")), **err(401, 404, 429)}),
            "patch": op(
                "Change a site",
                {**ok(200, ref("Site")), **err(*MGMT_ERR)},
                requestBody=body(ref("SitePatch")),
            ),
        },
        "/v1/sites/{site_id}/devices": {
            "parameters": [path_param("site_id")],
            "get": op(
                "Devices at a site (now, or at a past time with ?at=)",
                {**ok(200, listing("Device")), **err(400, 401, 404, 429)},
                parameters=[q("at", TS)],
            ),
        },
        "/v1/devices": {
            "get": op("List devices", {**ok(200, listing("Device")), **err(401, 429)}),
            "post": op(
                "Create a device; the answer carries its ingest token once",
                {**ok(201, ref("Device")), **err(*MGMT_ERR, 409)},
                requestBody=body(ref("DeviceCreate")),
            ),
        },
        "/v1/devices/{device_id}": {
            "parameters": [path_param("device_id")],
            "get": op(
                "A device (dev_ id or local_id)", {**ok(200, ref("Device")), **err(401, 404, 429)}
            ),
            "patch": op(
                "Change a device",
                {**ok(200, ref("Device")), **err(*MGMT_ERR)},
                requestBody=body(ref("DevicePatch")),
            ),
            "delete": op(
                "Delete a device: token revoked, measurements kept",
                {**ok(204, None, "Deleted"), **err(401, 404, 429)},
            ),
        },
        "/v1/devices/{device_id}/rotate-token": {
            "parameters": [path_param("device_id")],
            "post": op(
                "New ingest token; the old one fails on its next use",
                {**ok(200, ref("Device")), **err(401, 404, 429)},
            ),
        },
        "/v1/devices/{device_id}/move": {
            "parameters": [path_param("device_id")],
            "post": op(
                "Move to another site from effective_at; history stays",
                {**ok(200, ref("Device")), **err(*MGMT_ERR, 422)},
                requestBody=body(ref("Move")),
            ),
        },
        "/v1/devices/{device_id}/placements": {
            "parameters": [path_param("device_id")],
            "get": op(
                "Where the device stood, and from when",
                {**ok(200, listing("Placement")), **err(401, 404, 429)},
            ),
        },
        "/v1/devices/{device_id}/identify": {
            "parameters": [path_param("device_id")],
            "post": op(
                "Blink the node's LED: publishes cmd/identify to it",
                {
                    **ok(
                        202,
                        obj({"device_id": ID, "sent": {"type": "string"}}, ("device_id", "sent")),
                        "Sent to the broker",
                    ),
                    **err(401, 404, 409, 429),
                },
            ),
        },
        "/v1/channels": {
            "get": op(
                "List channels",
                {**ok(200, listing("Channel")), **err(401, 404, 429)},
                parameters=[q("device_id", {"type": "string"})],
            ),
        },
        "/v1/channels/{channel_id}": {
            "parameters": [path_param("channel_id")],
            "get": op(
                "A channel (chn_ or snr_ id)", {**ok(200, ref("Channel")), **err(401, 404, 429)}
            ),
            "patch": op(
                "Name, calibration offset, range thresholds",
                {**ok(200, ref("Channel")), **err(*MGMT_ERR, 422)},
                requestBody=body(ref("ChannelPatch")),
            ),
        },
        "/v1/channels/{channel_id}/measurements": {
            "parameters": [path_param("channel_id")],
            "get": op(
                "A channel's readings or buckets, ascending; JSON or CSV (ts,value);"
                " fn=last|p50|p95 over at most OPENSENSE_READ_MAX_CHANNEL_DAYS days (else 422)",
                {
                    "200": {
                        "description": "OK",
                        "content": {
                            "application/json": {"schema": ref("Series")},
                            "text/csv": {"schema": {"type": "string"}},
                        },
                    },
                    **err(400, 401, 404, 422, 429),
                },
                parameters=[*READ_PARAMS, q("format", {"type": "string", "enum": ["json", "csv"]})],
            ),
        },
        "/v1/measurements": {
            "get": op(
                "Up to 32 channels at once; each counts one unit of the read rate limit,"
                " fn=last|p50|p95 over at most OPENSENSE_READ_MAX_CHANNEL_DAYS channel-days",
                {
                    **ok(
                        200, obj({"series": {"type": "array", "items": ref("Series")}}, ("series",))
                    ),
                    **err(400, 401, 404, 422, 429),
                },
                parameters=[
                    {
                        "name": "channel_id",
                        "in": "query",
                        "required": False,
                        "explode": True,
                        "schema": {"type": "array", "items": {"type": "string"}, "maxItems": 32},
                    },
                    q("channels", {"type": "string"}, "comma-separated channel ids"),
                    *READ_PARAMS,
                ],
            ),
        },
        "/v1/tokens": {
            "get": op(
                "Live user and webhook tokens", {**ok(200, listing("TokenInfo")), **err(401, 429)}
            ),
            "post": op(
                "New ua_live_ or whk_ token, shown once",
                {**ok(201, ref("TokenCreated")), **err(*MGMT_ERR)},
                requestBody=body(ref("TokenCreate")),
            ),
        },
        "/v1/tokens/{token_id}": {
            "parameters": [path_param("token_id")],
            "delete": op("Revoke a token", {**ok(204, None, "Revoked"), **err(401, 404, 429)}),
        },
        "/v1/mqtt/emqx/authn": {
            "post": op(
                "EMQX HTTP authentication: is this (dev_ id, ds_live_ token) a live device?",
                {
                    **ok(
                        200,
                        obj(
                            {
                                "result": {"type": "string", "enum": ["allow", "deny"]},
                                "is_superuser": {"type": "boolean"},
                            },
                            ("result", "is_superuser"),
                        ),
                    ),
                    **err(400, 401, 404, 413),
                },
                security=[{"emqxSecret": []}],
                requestBody=body(
                    obj(
                        {
                            "username": {"type": "string"},
                            "password": {"type": "string"},
                            "clientid": {"type": "string"},
                        },
                        ("username", "password"),
                    )
                ),
            )
        },
        "/v1/mqtt/emqx/authz": {
            "post": op(
                "EMQX HTTP authorization: may this device publish or subscribe to this topic?",
                {
                    **ok(
                        200,
                        obj({"result": {"type": "string", "enum": ["allow", "deny"]}}, ("result",)),
                    ),
                    **err(400, 401, 404, 413),
                },
                security=[{"emqxSecret": []}],
                requestBody=body(
                    obj(
                        {
                            "username": {"type": "string"},
                            "topic": {"type": "string"},
                            "action": {"type": "string", "enum": ["publish", "subscribe"]},
                        },
                        ("username", "topic", "action"),
                    )
                ),
            )
        },
        **gateway_paths(),
        "/v1/openapi.json": {
            "get": op("This document", ok(200, {"type": "object"}), security=[], uses_db=False)
        },
        "/healthz": {
            "get": op(
                "Liveness",
                ok(200, obj({"ok": {"type": "boolean"}}, ("ok",))),
                security=[],
                uses_db=False,
            )
        },
    }
    paths.update(status_doc.paths())
    paths.update(alarms_doc.paths())
    paths.update(reports_doc.paths())
    paths.update(web_doc.paths())
    paths.update(report_verify_doc.paths())
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "OpenSense API",
            "version": __version__,
            "description": "Errors always use the envelope {error: {code, message, request_id}}.",
        },
        "paths": paths,
        "components": {
            "schemas": {**SCHEMAS, **status_doc.SCHEMAS, **reports_doc.SCHEMAS},
            "securitySchemes": {
                **status_doc.SECURITY,
                "emqxSecret": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "OPENSENSE_EMQX_SECRET, sent by EMQX",
                },
                **alarms_doc.SECURITY,
                "userToken": {"type": "http", "scheme": "bearer", "description": "ua_live_…"},
                "deviceToken": {"type": "http", "scheme": "bearer", "description": "ds_live_…"},
                "gatewayToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "gw_… site gateway token (docs/gateway.md)",
                },
                "shellyToken": {
                    "type": "apiKey",
                    "in": "query",
                    "name": "token",
                    "description": "ds_live_… device token as ?token= (Shelly); redacted from logs",
                },
                "webhookToken": {
                    "type": "apiKey",
                    "in": "query",
                    "name": "token",
                    "description": "whk_… inbound webhook token as ?token= (LoRaWAN/TTN); redacted from logs",
                },
            },
        },
    }


def gateway_paths() -> S:
    """The site gateway's API (docs/gateway.md), all with its gw_ token."""
    gw: list[S] = [{"gatewayToken": []}]
    num_or_ts = {"type": ["number", "string"]}
    series = obj(
        {
            "device": ID,
            "type": {"type": "string", "enum": list(KINDS)},
            "label": {"type": "string", "maxLength": 64},
            "unit": {"type": "string"},
            "ts": {"type": "array", "items": num_or_ts, "description": "Unix seconds or RFC 3339"},
            "values": {"type": "array", "items": {"type": "number"}},
        },
        ("device", "type", "ts", "values"),
    )
    rejected = obj(
        {
            "series": {"type": "integer"},
            "index": {"type": "integer"},
            "code": {"type": "string", "enum": sorted(CODES)},
            "message": {"type": "string"},
        },
        ("series", "index", "code", "message"),
    )
    answer = obj(
        {
            "batch": {"type": "string"},
            "accepted": {"type": "integer"},
            "deduplicated": {"type": "integer"},
            "rejected": {"type": "array", "items": rejected},
        },
        ("batch", "accepted", "deduplicated", "rejected"),
    )
    alert = obj(
        {
            "ref": {"type": "string", "minLength": 1, "maxLength": 200},
            "device": {"type": "string", "minLength": 1, "maxLength": 200},
            "type": {"type": "string", "minLength": 1, "maxLength": 200},
            "label": {"type": "string"},
            "unit": {"type": ["string", "null"]},
            "rule_id": {"type": ["string", "null"]},
            "opened_at": TS,
            "notified_at": TS,
            "cleared_at": NTS,
            "path": {"type": "string", "minLength": 1, "maxLength": 200},
        },
        ("ref", "device", "type", "opened_at", "notified_at", "path"),
    )
    health = obj(
        {
            "queue_depth": {"type": "integer", "minimum": 0},
            "oldest_unsent_s": {"type": ["number", "null"], "minimum": 0},
            "uplink": {"type": "string"},
            "last_sync": NTS,
            "dead_letters": {"type": "integer", "minimum": 0},
        },
        ("queue_depth", "uplink", "dead_letters"),
    )
    return {
        "/v1/gateway/sync": {
            "get": op(
                "The gateway's site: devices with token site hashes, rules, default rules."
                " With wait and version, a long-poll answered as soon as the site changes",
                {
                    **ok(200, {"type": "object"}),
                    "304": {"description": "wait ran out and the site is unchanged"},
                    **err(400, 401),
                },
                security=gw,
                parameters=[
                    q(
                        "wait",
                        {"type": "number", "minimum": 0, "maximum": 55},
                        "hold the request up to this many seconds for a change (long-poll)",
                    ),
                    q(
                        "version",
                        {"type": "string", "maxLength": 128},
                        "the document's version the gateway holds (with wait)",
                    ),
                ],
            )
        },
        "/v1/gateway/ingest": {
            "post": op(
                "Forward a batch of the site's readings; bad readings are rejected one by one",
                {**ok(200, answer), **err(401, 413)},
                security=gw,
                requestBody=body(
                    obj(
                        {
                            "batch": {"type": "string", "minLength": 1, "maxLength": 64},
                            "series": {"type": "array", "items": series, "maxItems": 1000},
                        },
                        ("batch", "series"),
                    )
                ),
            )
        },
        "/v1/gateway/health": {
            "post": op(
                "Publish the gateway's health (shown on the dashboard and status page)",
                {**ok(200, obj({"ok": {"type": "boolean"}}, ("ok",))), **err(401)},
                security=gw,
                requestBody=body(health),
            )
        },
        "/v1/gateway/local-alerts": {
            "post": op(
                "Record alarms the gateway raised locally while the server was unreachable",
                {
                    **ok(200, obj({"stored": {"type": "integer"}}, ("stored",))),
                    **err(400, 401, 422),
                },
                security=gw,
                requestBody=body(
                    obj(
                        {"alerts": {"type": "array", "items": alert, "maxItems": 1000}}, ("alerts",)
                    )
                ),
            )
        },
    }


@routes.get("/v1/openapi.json")
async def openapi_json(request: web.Request) -> web.Response:
    return web.json_response(document())


def setup(app: web.Application) -> None:
    """Serve the document; the status and alarm fragments are in it already."""
    app.router.add_routes(routes)
