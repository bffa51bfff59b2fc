"""JSON out: datetimes as RFC 3339 UTC with Z."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from typing import Any

from aiohttp import web


def rfc3339(ts: datetime) -> str:
    ts = ts.astimezone(UTC)
    text = ts.isoformat(timespec="microseconds" if ts.microsecond else "seconds")
    return text.replace("+00:00", "Z")


def _default(o: Any) -> Any:
    if isinstance(o, datetime):
        return rfc3339(o)
    if isinstance(o, date):
        return o.isoformat()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def dumps(data: Any) -> str:
    return json.dumps(data, default=_default, ensure_ascii=False, allow_nan=False)


def response(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=dumps)
