"""The public verification page of sealed reports (issue 18 item 4, docs/reports.md
"Verification"): no sign-in, server-rendered HTML that works without JavaScript.

`GET /verify/<code>` is where a report's short link and QR code lead; `GET /verify`
is the same form without a code. `POST /verify` takes the report's SHA-256 (typed,
urlencoded) or the PDF itself (multipart, at most MAX_UPLOAD bytes, hashed while it
streams in and never kept). A known hash is confirmed with the report's site name,
period and rendering time and nothing else; an unknown one is refused (404). Every
request counts against OPENSENSE_AUTH_RATE_PER_MIN per IP, like sign-in, in a
counter of its own. Answers carry the dashboard's security headers.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from datetime import UTC
from typing import Any

import jinja2
from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError
from psycopg import AsyncConnection

from .. import ratelimit
from ..api.keys import CONFIG, POOL
from ..errors import ApiError
from ..web.routes import SECURITY_HEADERS, client_ip, form_of
from . import seal_store
from .seal_store import CODE_RE, SHA256_RE

routes = web.RouteTableDef()

MAX_UPLOAD = 32 * 1024 * 1024  # a year's report of many channels is a few MB
MAX_FIELD = 256  # a typed checksum, or a code: anything longer is not one
MAX_PARTS = 4  # code, sha256, file
UPLOAD_TIMEOUT_S = 120
HEX_RUN = re.compile(r"(?<![0-9a-f])[0-9a-f]{64}(?![0-9a-f])")

_env = jinja2.Environment(
    loader=jinja2.ChoiceLoader(
        [
            jinja2.PackageLoader("opensense.reports", "templates"),
            jinja2.PackageLoader("opensense.web", "templates"),  # base.html
        ]
    ),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
)


def _page(context: dict[str, Any], status: int = 200) -> web.Response:
    ctx = {"code": "", "max_mb": MAX_UPLOAD // (1024 * 1024), **context}
    html = _env.get_template("verify.html").render(ctx)
    return web.Response(text=html, content_type="text/html", status=status)


async def _limit(request: web.Request, conn: AsyncConnection[Any]) -> None:
    cfg = request.app[CONFIG]
    await ratelimit.hit(
        conn,
        f"verify:{client_ip(request)}",
        cfg.auth_rate_per_min,
        60,
        cfg.clock(),
        "Report verification",
    )


def parse_sha256(text: str) -> str | None:
    """The 64 hex digits in what a person pasted: the bare digest, `sha256sum`'s
    line (digest, then the file name) or certutil's output (a header line, the
    digest, older versions with a space between bytes)."""
    low = text.lower()
    found = HEX_RUN.search(low)
    if found is None:  # certutil's spaced bytes
        for line in low.splitlines():
            if re.fullmatch(r"[0-9a-f ]+", line.strip()):
                found = HEX_RUN.search(line.replace(" ", ""))
                if found:
                    break
    return found.group(0) if found else None


def _too_big() -> ApiError:
    return ApiError(
        "payload_too_large", f"file: a report is checked up to {MAX_UPLOAD // 2**20} MB"
    )


async def _field(part: BodyPartReader) -> str:
    data = bytearray()
    while chunk := await part.read_chunk(1024):
        data += chunk
        if len(data) > MAX_FIELD:
            raise ApiError("invalid_request", f"{part.name}: at most {MAX_FIELD} characters")
    return data.decode("utf-8", "replace")


async def _multipart(request: web.Request) -> dict[str, str]:
    """code and sha256 fields, and the file hashed as it streams (its digest as
    `file`); bounded in size, parts and time."""
    if request.content_length is not None and request.content_length > MAX_UPLOAD + 65536:
        raise _too_big()
    out: dict[str, str] = {}
    try:
        async with asyncio.timeout(UPLOAD_TIMEOUT_S):
            reader = await request.multipart()
            for _ in range(MAX_PARTS + 1):
                part = await reader.next()
                if part is None:
                    return out
                if not isinstance(part, BodyPartReader):
                    raise ApiError("invalid_request", "a form of plain fields and one file")
                if part.name == "file":
                    h, n = hashlib.sha256(), 0
                    while chunk := await part.read_chunk(65536):
                        n += len(chunk)
                        if n > MAX_UPLOAD:
                            raise _too_big()
                        h.update(chunk)
                    if n:
                        out["file"] = h.hexdigest()
                elif part.name in ("code", "sha256"):
                    out[part.name] = await _field(part)
                else:
                    await _field(part)  # an unknown field is read (bounded) and ignored
    except TimeoutError as exc:
        raise ApiError("invalid_request", f"the upload took over {UPLOAD_TIMEOUT_S} s") from exc
    except (ValueError, KeyError, HttpProcessingError) as exc:  # a malformed multipart body
        raise ApiError("invalid_request", f"the form cannot be read: {exc}") from exc
    raise ApiError("invalid_request", f"a form of at most {MAX_PARTS} parts")


@routes.get("/verify")
async def verify_form(request: web.Request) -> web.Response:
    async with request.app[POOL].connection() as conn:
        await _limit(request, conn)
    return _page({})


@routes.get("/verify/{code}")
async def verify_link(request: web.Request) -> web.Response:
    """The short link's page: the form, bound to the report the link names. The code
    alone confirms nothing (the hash does), so an unknown code shows the form too."""
    code = request.match_info["code"]
    async with request.app[POOL].connection() as conn:
        await _limit(request, conn)
    return _page({"code": code if CODE_RE.match(code) else ""})


@routes.post("/verify")
async def verify_check(request: web.Request) -> web.Response:
    async with request.app[POOL].connection() as conn:
        await _limit(request, conn)
    if request.content_type == "multipart/form-data":
        form = await _multipart(request)
    else:
        form = {k: v for k, v in (await form_of(request)).items() if isinstance(v, str)}
    code = form.get("code", "")
    code = code if CODE_RE.match(code) else ""
    typed = form.get("sha256", "")
    sha = form.get("file") or (parse_sha256(typed[:MAX_FIELD]) if typed else None)
    if sha is None or not SHA256_RE.match(sha):
        error = "sha256: 64 characters, 0-9 and a-f (or upload the PDF file)"
        return _page({"code": code, "error": error}, status=422)
    async with request.app[POOL].connection() as conn:
        row = await seal_store.by_sha256(conn, sha)
    if row is None or (code and row.code != code):
        refused = (
            "This file is not a report this server sealed: no report with this SHA-256 "
            "checksum was recorded. The file was changed (even one reading or one byte), "
            "or it is not a report of this system. Ask the operator to render it again."
        )
        if code and row is not None:
            refused = "This checksum is not the one of the report this link names."
        return _page({"code": code, "refused": refused}, status=404)
    confirmed = {
        "site": row.site_name,
        "period": f"{row.period_from.isoformat()} – {row.period_to.isoformat()}",
        "rendered_at": row.rendered_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
    }
    return _page({"confirmed": confirmed})


def setup(app: web.Application) -> None:
    """The verification page's routes, and the dashboard's security headers on every
    answer under /verify (errors included)."""
    app.router.add_routes(routes)

    async def headers(request: web.Request, response: web.StreamResponse) -> None:
        if request.path == "/verify" or request.path.startswith("/verify/"):
            for name, value in SECURITY_HEADERS.items():
                response.headers.setdefault(name, value)

    app.on_response_prepare.append(headers)
