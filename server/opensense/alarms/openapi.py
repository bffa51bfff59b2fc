"""The alarm routes' part of the OpenAPI document (merged by opensense.openapi)."""

from __future__ import annotations

from typing import Any

from ..api.spec import NTS, TS, body, err, obj, ok, op, path_param, q
from . import engine, outbox
from . import paths as notify_paths

S = dict[str, Any]
STR = {"type": "string"}
NSTR = {"type": ["string", "null"]}
NNUM = {"type": ["number", "null"]}
NOTE = {"type": "string", "minLength": 1, "maxLength": 2000, "pattern": "\\S"}
BY = {"type": "string", "minLength": 1, "maxLength": 200, "pattern": "\\S"}
MINUTES = {"type": "integer", "minimum": 0, "maximum": 10080}

EVENT = obj(
    {
        "id": STR,
        "channel_id": STR,
        "device_id": NSTR,
        "rule_id": NSTR,
        "kind": STR,
        "severity": STR,
        "state": {"type": "string", "enum": ["grace", "alarm", "acknowledged", "cleared"]},
        "value": NNUM,
        "started_at": TS,
        "alarm_at": NTS,
        "acknowledged_at": NTS,
        "acknowledged_by": NSTR,
        "ack_note": NSTR,
        "ack_cause": NSTR,
        "ack_action": NSTR,
        "ack_product": NSTR,
        "cleared_at": NTS,
        "cleared_by": NSTR,
        "clear_note": NSTR,
        "renotified_at": NTS,
    },
    ("id", "channel_id", "kind", "state", "started_at"),
)
ACK = obj(
    {
        "by": BY,
        "note": NOTE,
        "cause": {"type": "string", "maxLength": 2000},
        "action": {"type": "string", "maxLength": 2000},
        "product": {"type": "string", "maxLength": 2000},
    },
    ("by", "note"),
)
WINDOW = obj(
    {
        "rrule": {
            "type": "string",
            "maxLength": engine.WINDOW_RRULE_MAX_LEN,
            "description": "RFC 5545 subset, e.g. FREQ=DAILY;BYHOUR=2: FREQ DAILY or WEEKLY;"
            " INTERVAL, BYDAY (no ordinals), BYHOUR, BYMINUTE, WKST; at most"
            f" {engine.WINDOW_MAX_PER_DAY} starts a day",
        },
        "duration_min": {"type": "integer", "minimum": 1, "maximum": 10080},
        "params": {"type": ["object", "null"], "description": "limits inside; null: rule off"},
        "dtstart": {
            "type": "string",
            "description": "local wall time of the first occurrence, years"
            f" {engine.WINDOW_DTSTART_YEARS[0]}..{engine.WINDOW_DTSTART_YEARS[1] - 1}",
        },
    },
    ("rrule", "duration_min"),
)
RULE_FIELDS: S = {
    "params": {"type": "object"},
    "grace_min": MINUTES,
    "clear_min": {"type": ["integer", "null"], "minimum": 0, "maximum": 10080},
    "renotify_min": {"type": ["integer", "null"], "minimum": 1, "maximum": 10080},
    "severity": {"type": "string", "enum": list(engine.SEVERITIES)},
    "enabled": {"type": "boolean"},
    "windows": {"type": "array", "items": WINDOW, "maxItems": 20},
}


# The enums of rule kinds and notification paths are read from their declarations
# (engine.RULE_KINDS, paths.PATHS) each time the document is built.
def kind_enum() -> S:
    return {"type": "string", "enum": list(engine.RULE_KINDS)}


def path_enum(added_by_api: bool = False) -> S:
    """Every declared path, or (added_by_api) those POST /v1/targets adds."""
    ps = notify_paths.PATHS.values()
    return {"type": "string", "enum": [p.name for p in ps if p.check or not added_by_api]}


def rule_schema() -> S:
    return obj(
        {"id": STR, "channel_id": STR, "kind": kind_enum(), **RULE_FIELDS},
        ("id", "channel_id", "kind", "params"),
    )


def target_schema() -> S:
    return obj(
        {
            "id": STR,
            "site_id": NSTR,
            "path": path_enum(),
            "address": STR,
            "name": STR,
            "roles": {"type": "array", "items": {"type": "string", "enum": list(outbox.ROLES)}},
            "verified": {"type": "boolean"},
            "created_at": TS,
            "secret": {
                "type": "string",
                "description": "webhooks: the signing secret, shown once",
            },
        },
        ("id", "path", "address"),
    )


RULE = rule_schema()
TARGET = target_schema()
STEP = obj(
    {
        "delay_min": {"type": "integer", "minimum": 0, "maximum": 1440},
        "to": {
            "oneOf": [
                {"type": "string", "enum": list(outbox.STEP_TARGETS)},
                {"type": "array", "items": {"type": "string"}},
            ]
        },
    },
    ("delay_min", "to"),
)
ESCALATION = obj(
    {"site_id": STR, "steps": {"type": "array", "items": STEP, "minItems": 1, "maxItems": 10}},
    ("steps",),
)
SILENCE = obj(
    {
        "id": STR,
        "site_id": NSTR,
        "channel_id": NSTR,
        "starts_at": TS,
        "ends_at": TS,
        "reason": STR,
    },
    ("id", "starts_at", "ends_at", "reason"),
)
LOG_ENTRY = obj(
    {
        "id": {"type": "integer"},
        "path": STR,
        "target": STR,
        "event_id": NSTR,
        "kind": STR,
        "status": {
            "type": "string",
            "enum": ["ok", "failed", "rejected", "dropped", "quarantined", "queued", "retrying"],
        },
        "code": {"type": ["integer", "null"]},
        "error": NSTR,
        "attempt": {"type": "integer"},
        "at": TS,
    },
    ("id", "path", "status", "at"),
)


def data(item: S) -> S:
    return obj({"data": {"type": "array", "items": item}}, ("data",))


ERR = (400, 401, 404, 413, 429)
HTML_OK: S = {"200": {"description": "An HTML page", "content": {"text/html": {"schema": STR}}}}


def paths() -> S:
    RULE, TARGET = rule_schema(), target_schema()  # noqa: N806  (the enums as declared now)
    return {
        "/v1/events": {
            "get": op(
                "Alarm events, newest first (persisted forever)",
                {**ok(200, data(EVENT)), **err(400, 401, 429)},
                parameters=[
                    q(
                        "state",
                        {"type": "string", "enum": ["open", "alarm", "acknowledged", "cleared"]},
                    ),
                    q("channel_id", STR),
                    q("limit", {"type": "integer", "minimum": 1, "maximum": 1000}),
                ],
            )
        },
        "/v1/events/{event_id}": {
            "parameters": [path_param("event_id")],
            "get": op("One event", {**ok(200, EVENT), **err(401, 404, 429)}),
        },
        "/v1/events/{event_id}/ack": {
            "parameters": [path_param("event_id")],
            "post": op(
                "Acknowledge with who and the corrective action (stops escalation)",
                {**ok(200, EVENT), **err(*ERR, 409)},
                requestBody=body(ACK, {"by": "Maria", "note": "door left open", "product": "kept"}),
            ),
        },
        "/v1/events/{event_id}/clear": {
            "parameters": [path_param("event_id")],
            "post": op(
                "Close an event by hand, with who and a note",
                {**ok(200, EVENT), **err(*ERR, 409)},
                requestBody=body(ACK),
            ),
        },
        "/v1/channels/{channel_id}/rules": {
            "parameters": [path_param("channel_id")],
            "post": op(
                "Add a rule (kinds and parameters: docs/alarms.md)",
                {**ok(201, RULE), **err(*ERR, 422)},
                requestBody=body(
                    obj(
                        {
                            "kind": kind_enum(),
                            **RULE_FIELDS,
                        },
                        ("kind",),
                    ),  # fmt: skip
                    {"kind": "range", "params": {"ok_min": -2, "ok_max": 5}, "grace_min": 15},
                ),
            ),
        },
        "/v1/rules/{rule_id}": {
            "parameters": [path_param("rule_id")],
            "patch": op(
                "Change a rule (limits, grace, clear delay, windows, re-notification)",
                {**ok(200, RULE), **err(*ERR, 422)},
                requestBody=body(obj(RULE_FIELDS)),
            ),
            "delete": op(
                "Disable a rule (kept for its events)", {**ok(200, RULE), **err(401, 404, 429)}
            ),
        },
        "/v1/channels/{channel_id}/alarm-state": {
            "parameters": [path_param("channel_id")],
            "get": op(
                "The channel's state (ok, grace, alarm, no_data) and its rules' states",
                {
                    **ok(200, obj({"channel_id": STR, "status": STR}, ("channel_id", "status"))),
                    **err(401, 404, 429),
                },  # fmt: skip
            ),
        },
        "/v1/channels/{channel_id}/recompute": {
            "parameters": [path_param("channel_id")],
            "post": op(
                "Replay the rule engine over the last 24 h (idempotent)",
                {**ok(202, obj({"channel_id": STR, "status": STR})), **err(401, 404, 429)},
            ),
        },
        "/v1/targets": {
            "get": op("Notification recipients", {**ok(200, data(TARGET)), **err(401, 429)}),
            "post": op(
                "Add an email recipient or a signed webhook",
                {**ok(201, TARGET), **err(*ERR, 409)},
                requestBody=body(
                    obj(
                        {
                            "path": path_enum(added_by_api=True),
                            "address": {"type": "string", "minLength": 1, "maxLength": 500},
                            "name": {"type": "string", "maxLength": 2000},
                            "roles": {
                                "type": "array",
                                "items": {"type": "string", "enum": list(outbox.ROLES)},
                            },
                            "site_id": STR,
                        },
                        ("path", "address"),
                    ),
                    {"path": "email", "address": "chef@example.com", "roles": ["shift"]},
                ),
            ),
        },
        "/v1/targets/verify": {
            "get": op(
                "The confirmation link in email: a page with a confirm button (changes nothing)",
                {**HTML_OK, **err(404)},
                security=[],
                parameters=[q("token", STR)],
            ),
            "post": op(
                "Confirm an email recipient (the page's button; no login: the token is the proof)",
                {**HTML_OK, **err(404)},
                security=[],
                parameters=[q("token", STR)],
            ),
        },
        "/v1/unsubscribe": {
            "get": op(
                "The unsubscribe link in every alarm email: a page with a button (changes nothing)",
                {**HTML_OK, **err(404)},
                security=[],
                parameters=[q("token", STR)],
            ),
            "post": op(
                "Stop alarm emails to an address: the page's button or RFC 8058 one-click "
                "(body List-Unsubscribe=One-Click); the account's owner is told by email",
                {**HTML_OK, **err(404)},
                security=[],
                parameters=[q("token", STR)],
            ),
        },
        "/v1/targets/{target_id}": {
            "parameters": [path_param("target_id")],
            "delete": op(
                "Remove a recipient", {**ok(200, {"type": "object"}), **err(401, 404, 429)}
            ),
        },
        "/v1/telegram/link": {
            "post": op(
                "A one-time code: send /start <code> to the bot from the chat or group",
                {
                    **ok(201, obj({"code": STR, "expires_at": TS, "send": STR}, ("code",))),
                    **err(*ERR),
                },  # fmt: skip
                requestBody={
                    "required": False,
                    "content": {
                        "application/json": {
                            "schema": obj(
                                {
                                    "site_id": STR,
                                    "roles": {
                                        "type": "array",
                                        "items": {"type": "string", "enum": list(outbox.ROLES)},
                                    },
                                }
                            )
                        }
                    },
                },
            )  # fmt: skip
        },
        "/v1/telegram/webhook": {
            "post": op(
                "Bot API updates (setWebhook with secret_token): chat linking, the Acknowledge button",
                {**ok(200, obj({"ok": {"type": "boolean"}})), **err(400, 403, 404, 413)},
                security=[{"telegramSecret": []}],
                requestBody=body({"type": "object"}),
            )
        },
        "/v1/sites/{site_id}/escalation": {
            "parameters": [path_param("site_id")],
            "get": op("The site's escalation steps", {**ok(200, ESCALATION), **err(401, 404, 429)}),
            "put": op(
                "Set the site's escalation steps (an acknowledgement stops them)",
                {**ok(200, ESCALATION), **err(*ERR)},
                requestBody=body(
                    obj({"steps": ESCALATION["properties"]["steps"]}, ("steps",)),
                    {
                        "steps": [
                            {"delay_min": 0, "to": "on_shift"},
                            {"delay_min": 15, "to": "manager"},
                            {"delay_min": 30, "to": "everyone"},
                        ]
                    },  # fmt: skip
                ),
            ),
        },
        "/v1/silences": {
            "get": op("Silence windows", {**ok(200, data(SILENCE)), **err(401, 429)}),
            "post": op(
                "Silence notifications (the alarm still opens and is reported)",
                {**ok(201, SILENCE), **err(*ERR)},
                requestBody=body(
                    obj(
                        {"from": TS, "to": TS, "reason": NOTE, "site_id": STR, "channel_id": STR},
                        ("from", "to", "reason"),
                    ),  # fmt: skip
                ),
            ),
        },
        "/v1/notifications/test": {
            "post": op(
                "Send a test notification through every recipient now; results are logged",
                {
                    **ok(
                        200,
                        obj(
                            {
                                "results": {
                                    "type": "array",
                                    "items": obj(
                                        {
                                            "target_id": STR,
                                            "path": STR,
                                            "status": {"type": "string", "enum": ["ok", "failed"]},
                                            "code": {"type": ["integer", "null"]},
                                            "error": NSTR,
                                        }
                                    ),
                                }
                            },
                            ("results",),
                        ),
                    ),  # fmt: skip
                    **err(400, 401, 413, 429),
                },
                requestBody={
                    "required": False,
                    "content": {"application/json": {"schema": obj({"by": BY})}},
                },
            )
        },
        "/v1/outbound-log": {
            "get": op(
                "Every delivery attempt (90 days)",
                {**ok(200, data(LOG_ENTRY)), **err(400, 401, 429)},
                parameters=[q("limit", {"type": "integer", "minimum": 1, "maximum": 1000})],
            )
        },
    }


SECURITY: S = {
    "telegramSecret": {
        "type": "apiKey",
        "in": "header",
        "name": "X-Telegram-Bot-Api-Secret-Token",
        "description": "OPENSENSE_TELEGRAM_WEBHOOK_SECRET, sent by Telegram",
    }
}
