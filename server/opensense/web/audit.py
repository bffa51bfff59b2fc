"""The audit page (docs/dashboard.md, "Audit"): the account's trail, newest first, a
page at a time; the state of its verification (the scheduled `audit_verify` job, and
a check of this account's chain and checkpoints on request); and the latest signed
checkpoint published for it (origin, tree size, root hash, when). Every role sees it;
nothing here changes the trail."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web
from psycopg import AsyncConnection

from .. import ratelimit
from ..api.keys import CONFIG, POOL
from ..audit import store as audit_store
from ..audit import verify
from ..audit.note import Checkpoint, NoteError
from ..audit.publish import AuditPlaces
from . import alarm_store as views
from .forms import posted
from .session import render, signed_in
from .store import User

routes = web.RouteTableDef()

DATA_MAX = 300  # characters of a row's data shown in the list
DATA_FULL_MAX = 20_000  # characters of a cut row's data shown when it is opened
VERIFY_PER_HOUR = 12  # "verify now" per account: it reads the whole trail


def checkpoint(places: AuditPlaces, acc: str) -> dict[str, Any]:
    """The account's latest published checkpoint, checked against the verifier key."""
    path = audit_store.Directory(places.publish_dir).account_dir(acc) / "checkpoint"
    if not path.exists():
        return {"state": "none"}
    verifier = places.verifier()
    if verifier is None:
        return {"state": "unverifiable"}
    try:
        cp = Checkpoint.parse(verifier.open(path.read_text(encoding="utf-8")))
    except (NoteError, OSError, UnicodeDecodeError, ValueError) as exc:
        return {"state": "bad", "why": str(exc)[:300]}
    return {
        "state": "ok",
        "origin": cp.origin,
        "size": cp.size,
        "root": base64.b64encode(cp.root).decode(),
        "when": views.when(_mtime(path)),
    }


def _mtime(path: Path) -> datetime:
    return datetime.fromtimestamp(path.stat().st_mtime, UTC)


def _data(v: Any) -> tuple[str, str | None]:
    """(the row's data as shown in the list, the whole of it when that is cut): an
    acknowledgement's cause and actions come after its note and must stay readable."""
    s = json.dumps(v, ensure_ascii=False, sort_keys=True, default=str)
    if len(s) <= DATA_MAX:
        return s, None
    full = s if len(s) <= DATA_FULL_MAX else s[: DATA_FULL_MAX - 1] + "…"
    return s[: DATA_MAX - 1] + "…", full


def _before(request: web.Request) -> int | None:
    raw = request.query.get("before", "")
    return int(raw) if raw.isdigit() and len(raw) <= 18 else None


async def _ctx(
    request: web.Request, conn: AsyncConnection[Any], user: User, before: int | None
) -> dict[str, Any]:
    acc = user.account_id
    rows = await views.audit_page(conn, acc, before)
    more = len(rows) > views.PAGE
    rows = rows[: views.PAGE]
    emails = await views.user_emails(conn, acc)
    job = await views.audit_job(conn)
    return {
        "rows": [
            {
                **r,
                "when": views.when(r["at"]),
                "who": emails.get(r["actor"], r["actor"]),
                **dict(zip(("data", "full"), _data(r["data"]), strict=True)),
            }
            for r in rows
        ],  # fmt: skip
        "older": rows[-1]["seq"] if more and rows else None,
        "newest": before is not None,
        "job": None
        if job is None or job["last_status"] is None
        else {
            "ok": job["last_status"] == "ok",
            "when": views.when(job["last_run_at"]),
        },  # fmt: skip
        "checkpoint": checkpoint(AuditPlaces.from_config(request.app[CONFIG]), acc),
        "report": None,
    }


@routes.get("/audit")
async def audit_page(request: web.Request) -> web.Response:
    async with request.app[POOL].connection() as conn:
        user = await signed_in(request, conn)
        ctx = await _ctx(request, conn, user, _before(request))
    return render(request, user, "audit.html", ctx)


@routes.post("/audit/verify")
async def verify_now(request: web.Request) -> web.Response:
    """This account's chain, tree and published checkpoints, checked now (as
    `opensense audit verify --account`); its problems name only this account's rows."""
    cfg = request.app[CONFIG]
    async with request.app[POOL].connection() as conn:
        user, _ = await posted(request, conn, "viewer")
        acc = user.account_id
        await ratelimit.hit(
            conn, f"audit_verify:{acc}", VERIFY_PER_HOUR, 3600, cfg.clock(), "Verifying the trail"
        )
        places = AuditPlaces.from_config(cfg)
        directory = audit_store.Directory(places.publish_dir)
        rep = await verify.verify(conn, directory, places.verifier(), account=acc)
        ctx = await _ctx(request, conn, user, None)
    ctx["report"] = {
        "ok": rep.ok,
        "rows": rep.rows,
        "checkpoints": rep.checkpoints,
        "problems": rep.problems[:50],
        "notes": rep.notes,
        "when": views.when(cfg.clock()),
    }
    return render(request, user, "audit.html", ctx)
