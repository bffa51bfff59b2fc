"""The reports feature's part of the OpenAPI document (merged by opensense.openapi)."""

from __future__ import annotations

from typing import Any

from ..api.spec import NTS, TS, body, err, obj, ok, op, path_param, ref
from .build import TEMPLATES
from .catalogue import LANGUAGES
from .store import MAX_MONTHS, STATUSES

S = dict[str, Any]
DAY = {"type": "string", "format": "date"}
NSTR = {"type": ["string", "null"]}
NINT = {"type": ["integer", "null"]}
PERIOD = obj({"from": DAY, "to": DAY}, ("from", "to"), extra=False)

SCHEMAS: S = {
    "ReportRequest": obj(
        {
            "site_id": {"type": "string", "pattern": "^site_"},
            "template": {"type": "string", "enum": list(TEMPLATES), "default": "haccp_monthly"},
            "period": PERIOD,
            "language": {"type": "string", "enum": list(LANGUAGES), "default": "en"},
        },
        ("site_id", "period"),
        extra=False,
    ),
    "Report": obj(
        {
            "id": {"type": "string", "pattern": "^rpt_"},
            "site_id": {"type": "string"},
            "template": {"type": "string", "enum": list(TEMPLATES)},
            "period": PERIOD,
            "language": {"type": "string", "enum": list(LANGUAGES)},
            "status": {"type": "string", "enum": list(STATUSES)},
            "progress": {"type": "number", "minimum": 0, "maximum": 1},
            "stage": NSTR,
            "error": NSTR,
            "attempts": {"type": "integer"},
            "origin": {"type": "string", "enum": ["api", "cli", "schedule"]},
            "created_at": TS,
            "started_at": NTS,
            "ready_at": NTS,
            "render_ms": NINT,
            "sha256": {"type": ["string", "null"], "pattern": "^[0-9a-f]{64}$"},
            "size_bytes": NINT,
            "file": NSTR,
        },
        ("id", "site_id", "template", "period", "language", "status", "progress", "created_at"),
    ),
}

EXAMPLE = {
    "site_id": "site_…",
    "template": "haccp_monthly",
    "period": {"from": "2026-11-01", "to": "2026-11-30"},
    "language": "en",
}


def paths() -> S:
    return {
        "/v1/reports": {
            "post": op(
                "Ask for a report (asynchronous: queued, rendering, then ready or failed)",
                {**ok(202, ref("Report"), "Queued"), **err(400, 401, 404, 413, 422, 429)},
                requestBody=body(ref("ReportRequest"), EXAMPLE),
                description=(
                    "400: an unknown template or language, a malformed period. 422 "
                    "`invalid_range`: from after to, longer than "
                    f"{MAX_MONTHS} months, or a period that has not ended in the site's time "
                    "zone. 404: a site not in this account. 429: the account's queue is full "
                    "(OPENSENSE_REPORT_QUEUE_MAX). docs/reports.md."
                ),
            )
        },
        "/v1/reports/{report_id}": {
            "parameters": [path_param("report_id")],
            "get": op(
                "A report's status, progress and (when ready) SHA-256",
                {**ok(200, ref("Report")), **err(401, 404, 429)},
            ),
        },
        "/v1/reports/{report_id}/file": {
            "parameters": [path_param("report_id")],
            "get": op(
                "The report's PDF, rendered again and checked against its SHA-256",
                {
                    "200": {
                        "description": "The PDF (header X-Content-SHA256)",
                        "content": {
                            "application/pdf": {"schema": {"type": "string", "format": "binary"}}
                        },
                    },
                    **err(401, 404, 409, 429),
                },
                description=(
                    "409: the report is not ready, or the site's data for the period changed "
                    "since it was rendered (the same bytes cannot be made again)."
                ),
            ),
        },
    }
