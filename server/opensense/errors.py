"""The one error envelope, and the codes it may carry.

Every failure leaves the server as
``{"error": {"code": ..., "message": ..., "request_id": "req_..."}}``; `code` is
stable, `message` says in plain words why. Handlers raise `ApiError`; the single
translator in `opensense.api.middleware` turns it (and anything else) into the
envelope. No stack trace ever reaches a client.
"""

from __future__ import annotations

from typing import Any

# code -> HTTP status. docs/product.md#errors codes, plus the few the HTTP layer itself needs.
CODES: dict[str, int] = {
    "bad_json": 400,
    "invalid_measurement": 400,
    "invalid_request": 400,
    "auth_required": 401,
    "token_invalid": 401,
    "forbidden": 403,
    "not_found": 404,
    "device_not_found": 404,
    "channel_not_found": 404,
    "sensor_not_found": 404,
    "site_not_found": 404,
    "token_not_found": 404,
    "incident_not_found": 404,
    "event_not_found": 404,
    "rule_not_found": 404,
    "target_not_found": 404,
    "uplink_not_found": 404,  # the LoRaWAN tray (docs/api.md)
    "method_not_allowed": 405,
    "idempotency_conflict": 409,
    "conflict": 409,
    "incident_resolved": 409,
    "event_state": 409,
    "length_required": 411,  # the site gateway's local HTTP door (docs/gateway.md)
    "payload_too_large": 413,
    "unsupported_media_type": 415,
    "out_of_range": 422,
    "unknown_kind": 422,
    "invalid_range": 422,
    "invalid_rule": 422,
    "rate_limited": 429,
    "internal": 500,
    "unavailable": 503,
}


class ApiError(Exception):
    def __init__(
        self,
        code: str,
        message: str,
        *,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        assert code in CODES, code
        super().__init__(message)
        self.code = code
        self.status = CODES[code]
        self.message = message
        self.headers = headers or {}
        self.extra = extra or {}


def envelope(code: str, message: str, request_id: str, **extra: Any) -> dict[str, Any]:
    err: dict[str, Any] = {"code": code, "message": message, "request_id": request_id}
    err.update(extra)
    return {"error": err}
