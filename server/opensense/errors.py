"""The one error envelope, and the codes it may carry.

Every failure leaves the server as
``{"error": {"code": ..., "message": ..., "request_id": "req_..."}}``; `code` is
stable, `message` says in plain words why. Handlers raise `ApiError`; the single
translator in `opensense.api.middleware` turns it (and anything else) into the
envelope. No stack trace ever reaches a client.
"""

from __future__ import annotations

from typing import Any

from opensense_contract import errors as contract_errors

# code -> HTTP status, declared in the wire contract (the gateway answers the same).
CODES = contract_errors.CODES


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
