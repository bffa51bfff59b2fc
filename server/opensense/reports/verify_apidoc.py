"""The verification page's part of the OpenAPI document (merged by opensense.openapi):
public HTML pages, no token (docs/reports.md "Verification")."""

from __future__ import annotations

from typing import Any

from ..api.spec import err, obj, op, path_param

S = dict[str, Any]
HTML = {"content": {"text/html": {"schema": {"type": "string"}}}}
PUBLIC: list[S] = []  # no sign-in: an inspector holding a report checks it
LIMITED = "Limited per IP (OPENSENSE_AUTH_RATE_PER_MIN, a counter of its own)."


def _html(status: int, description: str) -> S:
    return {str(status): {"description": description, **HTML}}


FIELDS = {
    "code": {"type": "string", "maxLength": 256, "description": "the short link's code"},
    "sha256": {"type": "string", "maxLength": 256, "description": "64 hex digits"},
}


def paths() -> S:
    check = {
        **_html(200, "Confirmed: the report's site name, period and rendering time only"),
        **_html(404, "Refused: no sealed report has this SHA-256 (or not the link's report)"),
        **_html(422, "Not a SHA-256: the form again, saying so"),
        **err(413, 429),
    }
    return {
        "/verify": {
            "get": op(
                "Verify a report: the form (upload the PDF or enter its SHA-256) (HTML)",
                {**_html(200, "The form"), **err(429)},
                security=PUBLIC,
                description=LIMITED,
            ),
            "post": op(
                "Verify a report by its SHA-256, typed or computed from the uploaded PDF (HTML)",
                check,
                security=PUBLIC,
                description=(
                    "multipart/form-data with `file` (the PDF, at most 32 MB, hashed and not "
                    "kept; 413 above) or urlencoded `sha256`. " + LIMITED
                ),
                requestBody={
                    "required": True,
                    "content": {
                        "application/x-www-form-urlencoded": {"schema": obj(FIELDS)},
                        "multipart/form-data": {
                            "schema": obj(
                                {**FIELDS, "file": {"type": "string", "format": "binary"}}
                            )
                        },
                    },
                },
            ),
        },
        "/verify/{code}": {
            "get": op(
                "Verify a report: the page a sealed report's short link and QR code open (HTML)",
                {**_html(200, "The form, bound to the report the link names"), **err(429)},
                security=PUBLIC,
                parameters=[path_param("code")],
                description=LIMITED,
            )
        },
    }
