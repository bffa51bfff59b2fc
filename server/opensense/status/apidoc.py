"""The status feature's part of the OpenAPI document (merged by opensense.openapi)."""

from __future__ import annotations

from typing import Any

from ..api.spec import NTS, TS, err, obj, ok, op, path_param, q, ref
from .components import STATES

S = dict[str, Any]
STATE = {"type": "string", "enum": list(STATES)}
DAY_STATE = {"type": "string", "enum": [*STATES, "none"]}
RATIO = {"type": ["number", "null"], "minimum": 0, "maximum": 1}
OPERATOR: list[S] = [{"operatorToken": []}]
NSTR = {"type": ["string", "null"]}

DAY = obj(
    {"day": {"type": "string", "format": "date"}, "state": DAY_STATE, "uptime": RATIO},
    ("day", "state", "uptime"),
)
UPDATE = obj(
    {"at": TS, "status": {"type": "string"}, "body": {"type": "string"}},
    ("at", "status", "body"),
)
CLASS = {"type": "string", "enum": ["P0", "P1", "P2"]}
INCIDENT_STATUS = {
    "type": "string",
    "enum": ["investigating", "identified", "monitoring", "resolved"],
}

SCHEMAS: S = {
    "StatusComponent": obj(
        {
            "id": {"type": "string"},
            "name": {"type": "string"},
            "state": STATE,
            "detail": {"type": "string"},
            "uptime_90d": RATIO,
            "days": {"type": "array", "items": DAY, "minItems": 90, "maxItems": 90},
        },
        ("id", "name", "state", "detail", "uptime_90d", "days"),
    ),
    "PublicIncident": obj(
        {
            "id": {"type": "string", "pattern": "^inc_"},
            "class": CLASS,
            "title": {"type": "string"},
            "component": NSTR,
            "status": INCIDENT_STATUS,
            "opened_at": TS,
            "acknowledged_at": NTS,
            "resolved_at": NTS,
            "postmortem": NSTR,
            "updates": {"type": "array", "items": UPDATE},
        },
        ("id", "class", "title", "status", "opened_at", "updates"),
    ),
    "StatusSnapshot": obj(
        {
            "generated_at": TS,
            "stale": {"type": "boolean"},
            "overall": {
                "type": "string",
                "enum": ["operational", "degraded", "partial_outage", "major_outage", "unknown"],
            },
            "components": {"type": "array", "items": ref("StatusComponent")},
            "incidents": {"type": "array", "items": ref("PublicIncident")},
        },
        ("generated_at", "stale", "overall", "components", "incidents"),
    ),
    "Incident": obj(
        {
            "id": {"type": "string", "pattern": "^inc_"},
            "class": CLASS,
            "title": {"type": "string"},
            "condition": NSTR,
            "component": NSTR,
            "status": INCIDENT_STATUS,
            "opened_at": TS,
            "opened_by": {"type": "string"},
            "acknowledged_at": NTS,
            "acknowledged_by": NSTR,
            "resolved_at": NTS,
            "resolved_by": NSTR,
            "postmortem": NSTR,
            "postmortem_at": NTS,
            "affected_accounts": {"type": ["array", "null"], "items": {"type": "string"}},
            "class_policy": {"type": "string"},
            "resolution_target": NTS,
            "next_due": {
                "oneOf": [
                    {"type": "null"},
                    obj(
                        {
                            "what": {
                                "type": "string",
                                "enum": ["acknowledgement", "update", "post-mortem"],
                            },
                            "at": TS,
                            "overdue": {"type": "boolean"},
                        },
                        ("what", "at", "overdue"),
                    ),
                ]
            },
            "updates": {
                "type": "array",
                "items": obj(
                    {
                        "at": TS,
                        "author": {"type": "string"},
                        "status": {"type": "string"},
                        "body": {"type": "string"},
                    },
                    ("at", "author", "status", "body"),
                ),
            },
        },
        ("id", "class", "title", "status", "opened_at", "next_due", "updates"),
    ),
}

TEXT = {"type": "string", "minLength": 1, "maxLength": 20000, "pattern": "\\S"}
AUTHOR = {"type": "string", "minLength": 1, "maxLength": 200, "pattern": "\\S"}


def _body(props: S, required: tuple[str, ...] = ()) -> S:
    return {"required": True, "content": {"application/json": {"schema": obj(props, required)}}}


def paths() -> S:
    inc_err = err(400, 401, 404, 409, 413)
    one = {**ok(200, ref("Incident")), **inc_err}
    return {
        "/status": {
            "get": op(
                "The public status page (HTML, no JavaScript needed)",
                {
                    "200": {
                        "description": "OK",
                        "content": {"text/html": {"schema": {"type": "string"}}},
                    }
                },
                security=[],
                uses_db=False,
            )
        },
        "/status.json": {
            "get": op(
                "The public status snapshot: components, 90-day bars, incidents",
                ok(200, ref("StatusSnapshot")),
                security=[],
                uses_db=False,
            )
        },
        "/metrics": {
            "get": op(
                "Prometheus text exposition (bearer OPENSENSE_METRICS_TOKEN when set)",
                {
                    "200": {
                        "description": "OK",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    **err(401),
                },
                security=[],
                uses_db=False,
            )
        },
        "/v1/status/gateways": {
            "get": op(
                "The account's site gateways: state and 90-day bars",
                {
                    **ok(
                        200,
                        obj(
                            {
                                "data": {
                                    "type": "array",
                                    "items": obj(
                                        {
                                            "id": {"type": "string"},
                                            "state": STATE,
                                            "days": {"type": "array", "items": DAY},
                                        },
                                        ("id", "state", "days"),
                                    ),
                                }
                            },
                            ("data",),
                        ),
                    ),
                    **err(401, 429),
                },
            )
        },
        "/v1/status/internal": {
            "get": op(
                "Operator: the raw figures of the last tick and the firing conditions",
                {**ok(200, {"type": "object"}), **err(401, 404)},
                security=OPERATOR,
                uses_db=False,
            )
        },
        "/v1/incidents": {
            "get": op(
                "Operator: incidents, newest first",
                {
                    **ok(
                        200,
                        obj({"data": {"type": "array", "items": ref("Incident")}}, ("data",)),
                    ),
                    **err(401, 404),
                },
                security=OPERATOR,
                parameters=[q("open", {"type": "string", "enum": ["true", "false"]})],
            ),
            "post": op(
                "Operator: open an incident",
                {**ok(201, ref("Incident")), **err(400, 401, 404, 413)},
                security=OPERATOR,
                requestBody=_body(
                    {
                        "class": CLASS,
                        "title": {
                            "type": "string",
                            "minLength": 1,
                            "maxLength": 200,
                            "pattern": "\\S",
                        },
                        "body": TEXT,
                        "component": {"type": "string"},
                        "affected_accounts": {"type": "array", "items": {"type": "string"}},
                        "author": AUTHOR,
                    },
                    ("class", "title", "body"),
                ),
            ),
        },
        "/v1/incidents/{incident_id}": {
            "parameters": [path_param("incident_id")],
            "get": op(
                "Operator: one incident with its updates and what is due",
                {**ok(200, ref("Incident")), **err(401, 404)},
                security=OPERATOR,
            ),
        },
        "/v1/incidents/{incident_id}/ack": {
            "parameters": [path_param("incident_id")],
            "post": op(
                "Operator: acknowledge (emails the affected customers)",
                one,
                security=OPERATOR,
                requestBody=_body({"author": AUTHOR, "body": TEXT}),
            ),
        },
        "/v1/incidents/{incident_id}/updates": {
            "parameters": [path_param("incident_id")],
            "post": op(
                'Operator: post an update ("still investigating" is one)',
                one,
                security=OPERATOR,
                requestBody=_body(
                    {
                        "author": AUTHOR,
                        "status": {
                            "type": "string",
                            "enum": ["investigating", "identified", "monitoring"],
                        },
                        "body": TEXT,
                    },
                    ("body",),
                ),
            ),
        },
        "/v1/incidents/{incident_id}/resolve": {
            "parameters": [path_param("incident_id")],
            "post": op(
                "Operator: resolve",
                one,
                security=OPERATOR,
                requestBody=_body({"author": AUTHOR, "body": TEXT}, ("body",)),
            ),
        },
        "/v1/incidents/{incident_id}/postmortem": {
            "parameters": [path_param("incident_id")],
            "put": op(
                "Operator: the post-mortem text of a resolved incident",
                one,
                security=OPERATOR,
                requestBody=_body({"author": AUTHOR, "text": TEXT}, ("text",)),
            ),
        },
    }


SECURITY: S = {
    "operatorToken": {
        "type": "http",
        "scheme": "bearer",
        "description": "OPENSENSE_OPERATOR_TOKEN, the service operator's token",
    }
}
