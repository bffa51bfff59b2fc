"""Request helpers: JSON bodies and query parameters, with errors that say why."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from aiohttp import web

from ..errors import ApiError
from ..ingest.validate import parse_json, parse_ts


async def json_object(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    if not raw:
        return {}
    body = parse_json(raw)
    if not isinstance(body, dict):
        raise ApiError("invalid_request", "the body must be a JSON object")
    return body


def query_ts(request: web.Request, name: str) -> datetime | None:
    v = request.query.get(name)
    if v is None or v == "":
        return None
    try:
        return parse_ts(v, name)
    except ApiError as e:
        raise ApiError("invalid_request", e.message) from None


def body_ts(body: dict[str, Any], name: str) -> datetime | None:
    v = body.get(name)
    if v is None:
        return None
    try:
        return parse_ts(v, name)
    except ApiError as e:
        raise ApiError("invalid_request", e.message) from None


def query_int(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    v = request.query.get(name)
    if v is None or v == "":
        return default
    try:
        n = int(v)
    except ValueError:
        raise ApiError("invalid_request", f"{name} must be an integer, got {v[:20]!r}") from None
    if not lo <= n <= hi:
        raise ApiError("invalid_request", f"{name} must be between {lo} and {hi}, got {n}")
    return n


def query_choice(request: web.Request, name: str, choices: tuple[str, ...], default: str) -> str:
    v = request.query.get(name, default)
    if v not in choices:
        raise ApiError(
            "invalid_request", f"{name} must be one of {', '.join(choices)}, got {v[:20]!r}"
        )
    return v
