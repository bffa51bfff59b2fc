"""The one error translator at the boundary, and the request log.

Whatever a handler raises leaves as the docs/product.md#errors envelope; an unexpected
exception is logged with its request id and answered 500 with no detail.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import psycopg
from aiohttp import web
from psycopg_pool import PoolClosed, PoolTimeout

from opensense_contract import retry

from ..errors import ApiError, envelope
from ..ids import new_id
from .keys import CONFIG, LOG_ACCOUNT, LOG_DEVICE, OBSERVER, REQUEST_ID, REQUEST_LOG

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_HTTP_CODES = {
    400: ("invalid_request", "the request is malformed"),
    404: ("not_found", "there is no such endpoint; see /v1/openapi.json"),
    405: ("method_not_allowed", "this endpoint does not take that method"),
    413: ("payload_too_large", "the body is larger than 64 KiB"),
    415: ("unsupported_media_type", "send the body as application/json"),
}


def check_url(request: web.Request) -> None:
    """No id or parameter may hold a NUL character: PostgreSQL text cannot store one,
    so it would otherwise surface as a 500 from the first query that used it."""
    if "\x00" in request.path or any("\x00" in k + v for k, v in request.query.items()):
        raise ApiError(
            "invalid_request", "the URL holds a NUL character (%00), which no id or parameter may"
        )


def error_response(err: ApiError, request_id: str) -> web.Response:
    resp = web.json_response(
        envelope(err.code, err.message, request_id, **err.extra), status=err.status
    )
    resp.headers.update(err.headers)
    return resp


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    request_id = new_id("req")
    request[REQUEST_ID] = request_id
    started = time.perf_counter()
    code: str | None = None
    reason: str | None = None
    try:
        check_url(request)
        resp = await handler(request)
    except ApiError as err:
        code, reason = err.code, err.message
        resp = error_response(err, request_id)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code, default = _HTTP_CODES.get(exc.status, ("invalid_request", exc.reason))
        if exc.status == 413:
            reason = default
        else:
            reason = default if exc.status != 400 else (exc.text or default)
        if code not in (
            "invalid_request",
            "not_found",
            "method_not_allowed",
            "payload_too_large",
            "unsupported_media_type",
        ):
            code = "invalid_request"
        resp = web.json_response(envelope(code, reason, request_id), status=exc.status)
        if exc.status == 405 and "Allow" in exc.headers:
            resp.headers["Allow"] = exc.headers["Allow"]
    except web.RequestPayloadError:
        # the body could not be read: bad gzip/deflate data, a broken chunked encoding
        code = "invalid_request"
        reason = "the body could not be read: check its Content-Encoding and length"
        resp = web.json_response(envelope(code, reason, request_id), status=400)
    except (psycopg.OperationalError, PoolTimeout, PoolClosed):
        log.exception(
            "database unreachable in %s %s (%s)", request.method, request.path, request_id
        )
        code = "unavailable"
        reason = "the database cannot be reached right now; retry with backoff"
        resp = web.json_response(envelope(code, reason, request_id), status=503)
        resp.headers["Retry-After"] = str(retry.SERVER_BUSY_RETRY_S)
    except Exception:
        log.exception("unhandled error in %s %s (%s)", request.method, request.path, request_id)
        code, reason = "internal", "the server failed to handle this request; it has been logged"
        resp = web.json_response(envelope(code, reason, request_id), status=500)
    resp.headers["X-Request-Id"] = request_id
    if request.path.startswith("/v1/ingest"):
        # the status page's ingest figures: 5xx share and latency (opensense.status.observe)
        observer = request.app.get(OBSERVER)
        if observer is not None:
            observer.ingest(request.app[CONFIG].clock(), resp.status, time.perf_counter() - started)
    reqlog = request.app.get(REQUEST_LOG)
    if reqlog is not None and not request.path.startswith("/v1/openapi"):
        reqlog.add(
            request.app[CONFIG].clock(),
            request_id,
            request.method,
            request.path_qs,
            resp.status,
            code,
            reason,
            request.get(LOG_ACCOUNT),
            request.get(LOG_DEVICE),
            (time.perf_counter() - started) * 1000,
        )
    return resp
