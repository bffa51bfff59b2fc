"""A report the inspector can verify (issue 18 item 4, docs/reports.md "Verification").

`sealed_render` is the one build function for a sealed report (the CLI's, and the
report API's): it takes a signed checkpoint of the account's audit trail
(audit/publish.py `publish_account`, which verifies the trail first), renders the
PDF with that checkpoint, the rendering time and a short link with its QR code to
the public verification page printed (reports/seal_pdf.py), hashes the bytes
(SHA-256), and in one transaction writes the hash to the audit trail (action
`report.rendered`) and what the PDF printed to `report_seals` (migration 0021), so
`render_again` gives the same bytes from the same readings.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, date, datetime
from typing import Any

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from .. import audit
from ..audit.publish import AuditPlaces, Diverged, SigningKeyError, publish_account
from ..audit.trail import iso
from ..errors import ApiError
from ..settings import Config
from . import seal_store
from .catalogue import LANGUAGES
from .seal_pdf import Seal
from .seal_store import CODE_RE

ACTION = "report.rendered"


class SealError(RuntimeError):
    """No signed checkpoint could be taken (no signing key, or an audit trail that does
    not verify): a report is never sealed without one."""


def new_code() -> str:
    """16 characters of base32 (80 random bits): short enough to type, never guessed."""
    return base64.b32encode(secrets.token_bytes(10)).decode().lower()


def link(public_url: str, code: str) -> str:
    return f"{public_url.rstrip('/')}/verify/{code}"


def _check(template: str, language: str) -> None:
    from .templates import TEMPLATES

    if template not in TEMPLATES:
        raise ApiError(
            "invalid_request",
            f"template: unknown {template[:40]!r}; known: {', '.join(TEMPLATES)}",
        )
    if language not in LANGUAGES:
        raise ApiError(
            "invalid_request",
            f"language: unknown {language[:10]!r}; known: {', '.join(LANGUAGES)}",
        )


def render_bytes(template: str, inp: Any, language: str, seal: Seal | None) -> bytes:
    """The template's PDF of `inp` (CPU-bound: callers run it in a thread)."""
    from .templates import TEMPLATES

    _check(template, language)
    return TEMPLATES[template].render(inp, language, seal=seal)


async def _load(
    conn: AsyncConnection[Any], template: str, site: str, first: date, last: date, acc: str
) -> Any:
    from .templates import TEMPLATES

    return await TEMPLATES[template].load(conn, site, first, last, account_id=acc)


async def sealed_render(
    db: AsyncConnectionPool[Any] | AsyncConnection[Any],
    *,
    account_id: str,
    site_id: str,
    template: str,
    period_from: date,
    period_to: date,
    language: str,
    now: datetime,
    config: Config,
    actor: str = "system",
) -> tuple[bytes, Seal]:
    """Render the site's period sealed: (the PDF's bytes, its Seal with `sha256`).
    `db`: the server's pool, or one connection (the CLI's). Raises ApiError (unknown
    template or language, another account's site) or SealError (no signing key, or
    an audit trail that does not verify)."""
    _check(template, language)
    async with _connection(db) as conn:
        inp = await _load(conn, template, site_id, period_from, period_to, account_id)
        try:
            note = await publish_account(conn, AuditPlaces.from_config(config), account_id)
        except (Diverged, SigningKeyError) as exc:
            raise SealError(f"cannot seal the report: {exc}") from exc
        code = new_code()
        seal = Seal(code, link(config.public_url, code), now.astimezone(UTC), note)
        pdf = await asyncio.to_thread(render_bytes, template, inp, language, seal)
        sha = hashlib.sha256(pdf).hexdigest()
        async with conn.transaction():
            row = await audit.record(
                conn,
                account_id=account_id,
                actor=actor,
                action=ACTION,
                subject=code,
                data={
                    "site": site_id,
                    "template": template,
                    "period": {"from": period_from.isoformat(), "to": period_to.isoformat()},
                    "language": language,
                    "rendered_at": iso(seal.rendered_at),
                    "sha256": sha,
                    "checkpoint": {
                        "origin": seal.origin,
                        "size": seal.tree_size,
                        "root": seal.root_hash,
                    },
                },
                at=now,
            )
            await seal_store.insert(
                conn,
                seal_store.SealRow(
                    code=code,
                    link=seal.link,
                    account_id=account_id,
                    site_id=site_id,
                    site_name=inp.site_name,
                    template=template,
                    period_from=period_from,
                    period_to=period_to,
                    language=language,
                    rendered_at=seal.rendered_at,
                    checkpoint=note,
                    sha256=sha,
                    audit_id=row.id,
                ),
            )
        return pdf, replace(seal, sha256=sha)


@asynccontextmanager
async def _connection(
    db: AsyncConnectionPool[Any] | AsyncConnection[Any],
) -> AsyncIterator[AsyncConnection[Any]]:
    if isinstance(db, AsyncConnection):
        yield db
    else:
        async with db.connection() as conn:
            yield conn


async def render_again(conn: AsyncConnection[Any], code: str) -> tuple[bytes, Seal]:
    """The sealed report `code` rendered again under its stored seal: the same bytes
    (and `Seal.sha256` the recorded hash) as long as the readings are the same. A
    changed reading gives other bytes, whose hash the verification page refuses."""
    row = await seal_store.by_code(conn, code) if CODE_RE.match(code) else None
    if row is None:
        raise ApiError("not_found", f"no sealed report {code[:40]!r}")
    inp = await _load(
        conn, row.template, row.site_id, row.period_from, row.period_to, row.account_id
    )
    # the name printed at rendering, even if the site was renamed since
    inp = replace(inp, site_name=row.site_name)
    seal = Seal(row.code, row.link, row.rendered_at, row.checkpoint)
    pdf = await asyncio.to_thread(render_bytes, row.template, inp, row.language, seal)
    return pdf, replace(seal, sha256=row.sha256)
