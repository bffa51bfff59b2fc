"""The error codes of the one envelope (docs/api.md "Errors") and the HTTP status each
stands for, declared once: the server raises them, the gateway's local HTTP door
answers with the same ones, and the firmware reacts to a few of them.

`WireError` is how the contract's pure parsers say why a body is refused: a code of
this table and a message in plain words. The server turns it into its `ApiError`,
the gateway into its `PayloadError`.
"""

from __future__ import annotations

# code -> HTTP status: the product's codes, plus the few the HTTP layer itself needs.
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
    "report_not_found": 404,  # a compliance report (docs/reports.md)
    "user_not_found": 404,  # a dashboard user of the account (docs/dashboard.md)
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

# The code of an …/err envelope after which a node sends the same batch again (the
# server did not take it: docs/mqtt.md); every other refusal is for good.
RETRY_CODE = "rate_limited"


class WireError(ValueError):
    """A body the contract refuses: `code` is one of CODES, `message` says why."""

    def __init__(self, code: str, message: str) -> None:
        assert code in CODES, code
        super().__init__(message)
        self.code = code
        self.message = message
