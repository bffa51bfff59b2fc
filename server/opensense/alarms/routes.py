"""Alarm and notification API: events (ack/clear with a corrective-action note),
rules, recompute, recipients, Telegram linking and its webhook, escalation,
silences, the test alarm, the outbound log.

Every configuration change here writes an audit_log row in the transaction of the
change (`_audit`; actor = the API token id, docs/audit.md). The test alarm changes
nothing and writes none (its sends are in outbound_log)."""

from __future__ import annotations

import html
import secrets
from datetime import datetime, timedelta
from typing import Any

from aiohttp import web
from psycopg import AsyncConnection
from psycopg.types.json import Jsonb

from .. import audit, ratelimit
from ..api import auth
from ..api.body import json_object
from ..api.jsonutil import response
from ..api.keys import ALARMS_HTTP as HTTP
from ..api.keys import CONFIG, POOL
from ..devices.store import channel_row, get_site
from ..errors import ApiError
from . import dispatch, egress, engine, evaluator, outbox, paths, person, rule_kinds, store
from .lifecycle import Change, transition
from .person import text as _text

routes = web.RouteTableDef()

# the configuration changes' signature (add_rule, add_target, ...: below)
Conn = AsyncConnection[Any]
Body = dict[str, Any]
Who = str | None  # the actor; None: the API token

LINK_TTL = timedelta(minutes=30)


def _plain(v: Any) -> Any:
    """A value as the audit trail stores it."""
    if isinstance(v, Jsonb):
        return v.obj
    if isinstance(v, datetime):
        return audit.trail.iso(v)
    return v


async def _audit(
    conn: AsyncConnection[Any],
    request: web.Request,
    acc: str,
    action: str,
    subject: str | None,
    data: dict[str, Any],
    actor: str | None = None,
) -> None:
    """One audit row for a configuration change, inside the change's transaction."""
    await audit.record(
        conn,
        account_id=acc,
        actor=actor or auth.actor(request),
        action=action,
        subject=subject,
        data={k: _plain(v) for k, v in data.items()},
        at=request.app[CONFIG].clock(),
    )


async def write_limit(request: web.Request, conn: AsyncConnection[Any], acc: str) -> None:
    """Alarm configuration writes (recipients, rules, escalation, silences) per account
    and minute: counted before the body is read, refused 429 with Retry-After."""
    cfg = request.app[CONFIG]
    await ratelimit.hit(
        conn, f"alarm_write:{acc}", cfg.alarm_write_rate_per_min, 60, cfg.clock(),
        "Alarm configuration changes",
    )  # fmt: skip


def _ts(v: Any, key: str) -> datetime:
    if not isinstance(v, str):
        raise ApiError("invalid_request", f"{key} must be an RFC 3339 time")
    try:
        t = datetime.fromisoformat(v.replace("Z", "+00:00"))
    except ValueError:
        raise ApiError("invalid_request", f"{key} must be an RFC 3339 time") from None
    if t.tzinfo is None:
        raise ApiError("invalid_request", f"{key} needs a UTC offset (e.g. Z)")
    return t


# --- events -----------------------------------------------------------------------------


@routes.get("/v1/events")
async def list_events(request: web.Request) -> web.Response:
    q = request.query
    state = q.get("state")
    if state is not None and state not in ("open", "alarm", "acknowledged", "cleared"):
        raise ApiError("invalid_request", "state must be open, alarm, acknowledged or cleared")
    try:
        limit = min(max(int(q.get("limit", "100")), 1), 1000)
    except ValueError:
        raise ApiError("invalid_request", "limit must be an integer") from None
    async with request.app[POOL].connection() as conn:
        acc = await auth.account(request, conn)
        return response({"data": await store.events(conn, acc, state, q.get("channel_id"), limit)})


async def _event(conn: AsyncConnection[Any], acc: str, event_id: str) -> dict[str, Any]:
    ev = await store.event(conn, acc, event_id)
    if ev is None:
        raise ApiError("event_not_found", f"no event {event_id[:40]!r} in this account")
    return ev


@routes.get("/v1/events/{event_id}")
async def get_event(request: web.Request) -> web.Response:
    async with request.app[POOL].connection() as conn:
        acc = await auth.account(request, conn)
        return response(await _event(conn, acc, request.match_info["event_id"]))


@routes.post("/v1/events/{event_id}/ack")
async def ack_event(request: web.Request) -> web.Response:
    return await _by_a_person(request, "ack")


@routes.post("/v1/events/{event_id}/clear")
async def clear_event(request: web.Request) -> web.Response:
    """A person closes an event (e.g. the fridge was emptied and switched off). The
    rule starts afresh: still out of range, it opens a new alarm after grace."""
    return await _by_a_person(request, "clear")


async def _by_a_person(request: web.Request, what: str) -> web.Response:
    """An ack or a clear: who (`by`) and the corrective-action note from the body, the
    token that sent it as `via` (alarms/person.py, shared with the dashboard)."""
    cfg = request.app[CONFIG]
    async with request.app[POOL].connection() as conn:
        acc = await auth.account(request, conn, read=False)
        body = await json_object(request)
        by = _text(body, "by", required=True, limit=200)
        ev = await person.step(
            conn, what, acc, request.match_info["event_id"], str(by), person.note(body),
            auth.actor(request), cfg.clock(),
        )  # fmt: skip
        return response(await _event(conn, acc, ev["id"]))


# --- rules -------------------------------------------------------------------------------


def rule_fields(body: dict[str, Any], kind: str, partial: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "params" in body or not partial:
        params = body.get("params", {})
        if not isinstance(params, dict):
            raise ApiError("invalid_request", "params must be an object")
        why = engine.check_params(kind, params)
        if why:
            raise ApiError("invalid_rule", why)
        out["params"] = Jsonb(params)
    for key, lo in (("grace_min", 0), ("clear_min", 0), ("renotify_min", 1)):
        if key in body:
            v = body[key]
            if v is None and key != "grace_min":
                out[key] = None
                continue
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= 7 * 24 * 60:
                raise ApiError("invalid_rule", f"{key} must be whole minutes, {lo}..10080")
            out[key] = v
    if "severity" in body:
        if body["severity"] not in engine.SEVERITIES:
            raise ApiError("invalid_rule", "severity must be warning or alarm")
        out["severity"] = body["severity"]
    if "enabled" in body:
        if not isinstance(body["enabled"], bool):
            raise ApiError("invalid_rule", "enabled must be true or false")
        out["enabled"] = body["enabled"]
    if "windows" in body:
        ws = body["windows"]
        if not isinstance(ws, list) or len(ws) > 20:
            raise ApiError("invalid_rule", "windows must be a list (at most 20)")
        for w in ws:
            why = engine.check_window(w)
            if why is None and isinstance(w.get("params"), dict):
                why = engine.check_params(kind, {**body.get("params", {}), **w["params"]})
            if why:
                raise ApiError("invalid_rule", why)
        out["windows"] = Jsonb(ws)
    return out


@routes.post("/v1/channels/{channel_id}/rules")
async def create_rule(request: web.Request) -> web.Response:
    async with request.app[POOL].connection() as conn:
        acc = await auth.account(request, conn, read=False)
        await write_limit(request, conn, acc)
        ch = await channel_row(conn, acc, request.match_info["channel_id"])
        body = await json_object(request)
        return response(await add_rule(conn, request, acc, ch, body), status=201)


# The configuration changes below (add_rule, change_rule, ...) are the API's and the
# dashboard's (web/rules.py, web/notify.py): the same checks, messages and audit rows.
# The caller has found the account (and counted write_limit); `actor` None is the
# API token (auth.actor), the dashboard passes its signed-in user.


async def add_rule(
    conn: AsyncConnection[Any],
    request: web.Request,
    acc: str,
    ch: dict[str, Any],
    body: dict[str, Any],
    actor: str | None = None,
) -> dict[str, Any]:
    """A new rule on channel `ch` (a row of this account's) from a JSON-like body."""
    kind = body.get("kind")
    if kind not in engine.RULE_KINDS:
        raise ApiError("invalid_rule", f"kind must be one of {', '.join(engine.RULE_KINDS)}")
    f = rule_fields(body, kind, partial=False)
    other_of = rule_kinds.behaviour(kind).other_channel
    if other_of is not None:  # the other channel must be one of this account's
        await channel_row(conn, acc, other_of(f["params"].obj))
    async with conn.transaction():
        row = await store.insert_rule(conn, ch["id"], kind, f)
        await _audit(
            conn, request, acc, "rule.create", row["id"],
            {"channel_id": ch["id"], "kind": kind, **f}, actor,
        )  # fmt: skip
    return row


async def rule_of(conn: AsyncConnection[Any], acc: str, rule_id: str) -> dict[str, Any]:
    row = await store.rule(conn, acc, rule_id)
    if row is None:
        raise ApiError("rule_not_found", f"no rule {rule_id[:40]!r} in this account")
    return row


@routes.patch("/v1/rules/{rule_id}")
async def patch_rule(request: web.Request) -> web.Response:
    async with request.app[POOL].connection() as conn:
        acc = await auth.account(request, conn, read=False)
        await write_limit(request, conn, acc)
        rule = await rule_of(conn, acc, request.match_info["rule_id"])
        body = await json_object(request)
        await change_rule(conn, request, acc, rule, body)
        return response(await rule_of(conn, acc, rule["id"]))


async def change_rule(
    conn: AsyncConnection[Any],
    request: web.Request,
    acc: str,
    rule: dict[str, Any],
    body: dict[str, Any],
    actor: str | None = None,
) -> None:
    """The fields of `body` set on `rule` (a row of this account's, rule_of)."""
    if "kind" in body and body["kind"] != rule["kind"]:
        raise ApiError("invalid_rule", "a rule's kind cannot change; make a new rule")
    f = rule_fields(body, rule["kind"], partial=True)
    async with conn.transaction():
        await store.update_rule(conn, rule["id"], f)
        changed = {
            k: {"from": rule[k], "to": _plain(v)} for k, v in f.items() if rule[k] != _plain(v)
        }
        if changed:
            await _audit(
                conn, request, acc, "rule.update", rule["id"],
                {"channel_id": rule["channel_id"], **changed}, actor,
            )  # fmt: skip


@routes.delete("/v1/rules/{rule_id}")
async def delete_rule(request: web.Request) -> web.Response:
    """Rules are disabled, not deleted: their events keep pointing at them."""
    async with request.app[POOL].connection() as conn:
        acc = await auth.account(request, conn, read=False)
        await write_limit(request, conn, acc)
        rule = await rule_of(conn, acc, request.match_info["rule_id"])
        async with conn.transaction():
            await store.disable_rule(conn, rule["id"])
            await _audit(
                conn, request, acc, "rule.delete", rule["id"],
                {"channel_id": rule["channel_id"], "kind": rule["kind"], "was_enabled": rule["enabled"]},
            )  # fmt: skip
        return response(await rule_of(conn, acc, rule["id"]))


@routes.get("/v1/channels/{channel_id}/alarm-state")
async def alarm_state(request: web.Request) -> web.Response:
    async with request.app[POOL].connection() as conn:
        acc = await auth.account(request, conn)
        ch = await channel_row(conn, acc, request.match_info["channel_id"])
        row = await store.alarm_state(conn, ch["id"]) or {
            "status": "no_data",
            "last_ts": None,
            "due_at": None,
        }
        rules = {k: v.get("status") for k, v in (row.get("rules") or {}).items()}
        return response(
            {
                "channel_id": ch["id"],
                "status": row["status"],
                "last_ts": row["last_ts"],
                "due_at": row["due_at"],
                "rules": rules,
                "open_events": row.get("events") or {},
            }
        )


@routes.post("/v1/channels/{channel_id}/recompute")
async def recompute(request: web.Request) -> web.Response:
    async with request.app[POOL].connection() as conn:
        acc = await auth.account(request, conn, read=False)
        ch = await recompute_channel(conn, request, acc, request.match_info["channel_id"])
    return response({"channel_id": ch["id"], "status": "queued", "hours": 24}, status=202)


async def recompute_channel(
    conn: AsyncConnection[Any],
    request: web.Request,
    acc: str,
    channel_id: str,
    actor: str | None = None,
) -> dict[str, Any]:
    """Replay the channel's last 24 h; the channel's row."""
    cfg = request.app[CONFIG]
    # a replay reads 24 h of readings and rewrites the channel's state: per hour
    await ratelimit.hit(
        conn, f"recompute:{acc}", cfg.recompute_per_hour, 3600, cfg.clock(), "Recompute"
    )
    ch = await channel_row(conn, acc, channel_id)
    num = await store.channel_num(conn, ch["id"])
    async with conn.transaction():
        await evaluator.recompute(conn, num, cfg.clock())
        await _audit(conn, request, acc, "channel.recompute", ch["id"], {"hours": 24}, actor)
    return ch


# --- recipients ---------------------------------------------------------------------------


def _roles(v: Any) -> list[str]:
    if v is None:
        return []
    if not isinstance(v, list) or any(r not in outbox.ROLES for r in v):
        raise ApiError("invalid_request", f"roles must be a list of {', '.join(outbox.ROLES)}")
    return list(dict.fromkeys(v))


async def _site_or_none(conn: AsyncConnection[Any], acc: str, site_id: Any) -> str | None:
    if site_id is None:
        return None
    if not isinstance(site_id, str):
        raise ApiError("invalid_request", "site_id must be a site id")
    return str((await get_site(conn, acc, site_id))["id"])


@routes.get("/v1/targets")
async def list_targets(request: web.Request) -> web.Response:
    async with request.app[POOL].connection() as conn:
        acc = await auth.account(request, conn)
        return response({"data": await store.targets(conn, acc)})


@routes.post("/v1/targets")
async def create_target(request: web.Request) -> web.Response:
    """An email recipient or a webhook (Telegram chats link themselves with a code).
    A webhook's signing secret is shown once, in this answer. Addresses and names are
    checked here (no CR/LF, a valid host), and a webhook's host is resolved: private
    addresses are refused unless OPENSENSE_WEBHOOK_ALLOW_PRIVATE (the sender checks
    again at every send)."""
    async with request.app[POOL].connection() as conn:
        acc = await auth.account(request, conn, read=False)
        await write_limit(request, conn, acc)
        body = await json_object(request)
        return response(await add_target(conn, request, acc, body), status=201)


async def add_target(
    conn: Conn, request: web.Request, acc: str, body: Body, actor: Who = None
) -> Body:
    """The new recipient's row; a webhook's with its `secret` (shown once)."""
    cfg = request.app[CONFIG]
    path = body.get("path")
    address = (_text(body, "address", required=True, limit=500) or "").strip()
    np = paths.PATHS.get(path) if isinstance(path, str) else None
    if np is None or np.check is None:
        raise ApiError("invalid_request", _paths_hint())
    why = await np.check(cfg, address)
    if why:
        raise ApiError("invalid_request", why)
    secret = np.secret() if np.secret else None
    token = secrets.token_urlsafe(24) if np.verify else None
    site = await _site_or_none(conn, acc, body.get("site_id"))
    name = _text(body, "name", limit=200) or ""
    if egress.line_problem(name, "name"):
        raise ApiError("invalid_request", "name may not contain line breaks or control characters")
    roles = _roles(body.get("roles"))
    async with conn.transaction():
        if not await store.room_for_target(conn, acc, cfg.targets_max):
            raise ApiError(
                "conflict",
                f"this account has {cfg.targets_max} recipients already (the most it may "
                "have); remove one first",
            )
        row = await store.insert_target(
            conn, acc, site, np.name, address, name, roles, secret, token
        )
        if row is None:
            raise ApiError("conflict", f"{address!r} is a {path} recipient already")
        await _audit(
            conn, request, acc, "target.create", row["id"],
            {"path": path, "address": row["address"], "name": name, "site_id": site,
             "roles": roles}, actor,
        )  # fmt: skip
        if token:  # double opt-in: the address confirms itself before any alarm goes
            await outbox.put(
                conn, account_id=acc, target_id=row["id"], event_id=None, kind="verify",
                key=f"verify:{row['id']}", payload=_verify_mail(request, token),
                due=cfg.clock(),
            )  # fmt: skip
    if secret:
        row["secret"] = secret
    return row


def _paths_hint() -> str:
    """e.g. "path must be email or webhook (link Telegram with POST /v1/telegram/link)"."""
    made = [p.name for p in paths.PATHS.values() if p.check is not None]
    links = [p.link for p in paths.PATHS.values() if p.check is None and p.link]
    return f"path must be {' or '.join(made)}" + (f" ({'; '.join(links)})" if links else "")


def _verify_mail(request: web.Request, token: str) -> dict[str, Any]:
    base = request.app[CONFIG].public_url.rstrip("/")
    return {
        "kind": "verify",
        "subject": "[OpenSense] Confirm alarm emails to this address",
        "text": "Someone added this address to receive OpenSense alarms (fridge and freezer "
        f"temperatures). To receive them, confirm: {base}/v1/targets/verify?token={token}\n"
        "If this was not you, ignore this message: nothing will be sent.",
        "data": {},
        "ackable": False,
    }


# The two links in mail (confirm, unsubscribe) change something, so a GET only shows a
# page with a button and the POST does it: mail scanners and link previews fetch every
# link with GET. The unsubscribe POST is also RFC 8058's one-click
# (`List-Unsubscribe=One-Click`, from the mail client). The pages are plain HTML from
# one tiny template (no JavaScript); every value in them is HTML-escaped.
PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex">
<title>{title}</title></head>
<body><h1>{title}</h1>{body}</body></html>
"""
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; form-action 'self'; frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",  # the token is in the URL
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
}
TOKEN_ACTIONS = {  # the statement each does: store.TOKEN_UPDATES
    "verify": {
        "audit": "target.verify",
        "title": "Confirm alarm emails",
        "ask": "Send OpenSense alarm emails to {address}?",
        "button": "Yes, send alarms to this address",
        "done": "Confirmed: {address} will receive OpenSense alarm emails.",
    },
    "unsubscribe": {
        "audit": "target.unsubscribe",
        "title": "Stop alarm emails",
        "ask": "Stop OpenSense alarm emails to {address}? The account's owner is told.",
        "button": "Unsubscribe",
        "done": "Unsubscribed: {address} will receive no more OpenSense alarm emails.",
    },
}


def _page(title: str, body: str, status: int = 200) -> web.Response:
    return web.Response(
        text=PAGE.format(title=html.escape(title), body=body),
        status=status,
        content_type="text/html",
        headers=PAGE_HEADERS,
    )


def _token(request: web.Request) -> str:
    token = request.query.get("token", "")
    if not 16 <= len(token) <= 64:
        raise ApiError("target_not_found", "this link is not valid (no such recipient)")
    return token


async def _token_page(request: web.Request, action: str) -> web.Response:
    """GET: the question and a button; changes nothing."""
    token = _token(request)
    a = TOKEN_ACTIONS[action]
    async with request.app[POOL].connection() as conn:
        address = await store.address_of_token(conn, token)
    if address is None:
        raise ApiError("target_not_found", "this link is not valid (no such recipient)")
    esc = html.escape
    body = (
        f"<p>{esc(a['ask'].format(address=address))}</p>"
        f'<form method="post" action="?token={esc(token)}">'
        '<input type="hidden" name="List-Unsubscribe" value="One-Click">'
        f'<button type="submit">{esc(a["button"])}</button></form>'
    )
    return _page(a["title"], body)


async def _token_post(request: web.Request, action: str) -> web.Response:
    """POST (the page's button, or RFC 8058 one-click): do it, audit it; a recipient
    leaving is told to the account's owner (an email to the account's address through
    the outbox, logged in the outbound log like every send)."""
    token = _token(request)
    a = TOKEN_ACTIONS[action]
    cfg = request.app[CONFIG]
    async with request.app[POOL].connection() as conn:
        async with conn.transaction():
            t = await store.use_token(conn, action, token)
            if t is None:
                raise ApiError("target_not_found", "this link is not valid (no such recipient)")
            address, acc, tid = t.address, t.account_id, t.id
            # the link in the mail is the proof: the address itself is the actor
            await _audit(
                conn, request, acc, a["audit"], tid, {"path": "email", "address": address},
                actor=f"email:{address}",
            )  # fmt: skip
            if action == "unsubscribe":
                await _tell_owner(conn, acc, tid, address, cfg.clock())
    return _page(a["title"], f"<p>{html.escape(a['done'].format(address=address))}</p>")


async def _tell_owner(
    conn: AsyncConnection[Any], acc: str, tid: str, address: str, now: datetime
) -> None:
    owner = await store.account_email(conn, acc)
    if not owner:
        return
    text = (
        f"{address} unsubscribed from OpenSense alarm emails at "
        f"{now.isoformat(timespec='minutes')} (with the link in an alarm email). It will "
        "receive no more alarms. If that was a mistake, add the address again under "
        "Notifications (it confirms itself by email)."
    )
    await outbox.put(
        conn, account_id=acc, target_id=tid, event_id=None, kind="recipient_left",
        key=f"recipient_left:{tid}",
        payload={"kind": "recipient_left", "subject": "[OpenSense] An alarm recipient left",
                 "text": text, "data": {"target_id": tid}, "ackable": False, "to": owner},
        due=now,
    )  # fmt: skip


@routes.get("/v1/targets/verify")
async def verify_page(request: web.Request) -> web.Response:
    """The link in the confirmation email (no login: the token is the proof)."""
    return await _token_page(request, "verify")


@routes.post("/v1/targets/verify")
async def verify_target(request: web.Request) -> web.Response:
    return await _token_post(request, "verify")


@routes.get("/v1/unsubscribe")
async def unsubscribe_page(request: web.Request) -> web.Response:
    """The link in every alarm email (List-Unsubscribe)."""
    return await _token_page(request, "unsubscribe")


@routes.post("/v1/unsubscribe")
async def unsubscribe(request: web.Request) -> web.Response:
    return await _token_post(request, "unsubscribe")


@routes.delete("/v1/targets/{target_id}")
async def delete_target(request: web.Request) -> web.Response:
    async with request.app[POOL].connection() as conn:
        acc = await auth.account(request, conn, read=False)
        await write_limit(request, conn, acc)
        await remove_target(conn, request, acc, request.match_info["target_id"])
        return response({"id": request.match_info["target_id"], "deleted": True})


async def remove_target(
    conn: AsyncConnection[Any],
    request: web.Request,
    acc: str,
    target_id: str,
    actor: str | None = None,
) -> None:
    async with conn.transaction():
        gone = await store.delete_target(conn, acc, target_id)
        if gone is None:
            raise ApiError("target_not_found", "no such recipient in this account")
        await _audit(
            conn, request, acc, "target.delete", gone.id,
            {"path": gone.path, "address": gone.address, "site_id": gone.site_id}, actor,
        )  # fmt: skip


# --- Telegram ------------------------------------------------------------------------------


@routes.post("/v1/telegram/link")
async def telegram_link(request: web.Request) -> web.Response:
    """A one-time code; send `/start <code>` to the bot from the chat or group."""
    async with request.app[POOL].connection() as conn:
        acc = await auth.account(request, conn, read=False)
        await write_limit(request, conn, acc)
        body = await json_object(request)
        return response(await telegram_code(conn, request, acc, body), status=201)


async def telegram_code(
    conn: Conn, request: web.Request, acc: str, body: Body, actor: Who = None
) -> Body:
    """A one-time link code for a chat: {code, expires_at, send}."""
    cfg = request.app[CONFIG]
    site = await _site_or_none(conn, acc, body.get("site_id"))
    code = secrets.token_hex(4).upper()
    expires = cfg.clock() + LINK_TTL
    roles = _roles(body.get("roles"))
    async with conn.transaction():
        await store.insert_link_code(conn, code, acc, site, roles, expires)
        # the code is a one-time secret: the row names what it grants, not the code
        await _audit(
            conn, request, acc, "telegram.link_code", None,
            {"site_id": site, "roles": roles, "expires_at": expires}, actor,
        )  # fmt: skip
    return {"code": code, "expires_at": expires, "send": f"/start {code}"}


@routes.post("/v1/telegram/webhook")
async def telegram_webhook(request: web.Request) -> web.Response:
    """Updates from the Bot API (setWebhook with secret_token): `/start <code>` links a
    chat; an "Acknowledge" button press (callback_query `ack:<event>`) acknowledges."""
    cfg = request.app[CONFIG]
    if not cfg.telegram_webhook_secret:
        raise ApiError("not_found", "the Telegram webhook is not configured")
    given = request.headers.get("X-Telegram-Bot-Api-Secret-Token", "")
    if not secrets.compare_digest(given, cfg.telegram_webhook_secret):
        raise ApiError("forbidden", "wrong X-Telegram-Bot-Api-Secret-Token")
    update = await json_object(request)
    session = request.app[HTTP]
    now = cfg.clock()
    msg = update.get("message")
    if isinstance(msg, dict) and isinstance(msg.get("text"), str):
        text = msg["text"].strip()
        chat = _dict(msg.get("chat"))
        if text.startswith("/start") and isinstance(chat.get("id"), int | str):
            sender = _dict(msg.get("from"))
            reply = await _link_chat(request, str(chat["id"]), text.split()[1:], now, sender)
            await paths.telegram_call(
                session, cfg, "sendMessage", {"chat_id": chat["id"], "text": reply}
            )
    cq = update.get("callback_query")
    if isinstance(cq, dict) and isinstance(cq.get("data"), str) and "id" in cq:
        answer = await _ack_from_chat(request, cq, now)
        await paths.telegram_call(
            session, cfg, "answerCallbackQuery", {"callback_query_id": cq["id"], "text": answer}
        )
    return response({"ok": True})


def _dict(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _telegram_user(user: dict[str, Any]) -> str:
    return "telegram:" + str(user.get("username") or user.get("first_name") or user.get("id"))


async def _link_chat(
    request: web.Request, chat_id: str, args: list[str], now: datetime, sender: dict[str, Any]
) -> str:
    if not args:
        return "Send /start <code>; get a code in OpenSense under Notifications."
    async with request.app[POOL].connection() as conn, conn.transaction():
        link = await store.use_link_code(conn, args[0].upper(), now)
        if link is None:
            return "That code is unknown, used or expired; ask OpenSense for a new one."
        cap = request.app[CONFIG].targets_max
        if not await store.room_for_target(conn, link.account_id, cap):
            return f"This OpenSense account has {cap} recipients already; remove one first."
        made = await store.insert_chat(conn, link, chat_id)
        if made is not None:  # a chat linked again with a new code changes nothing
            await _audit(
                conn, request, link.account_id, "target.create", made,
                {"path": "telegram", "address": chat_id, "site_id": link.site_id,
                 "roles": link.roles},
                actor=_telegram_user(sender) if sender else f"telegram:chat:{chat_id}",
            )  # fmt: skip
    return "Linked: this chat will get OpenSense alarms."


async def _ack_from_chat(request: web.Request, cq: dict[str, Any], now: datetime) -> str:
    data = cq["data"]
    if not data.startswith("ack:"):
        return "Unknown button."
    chat_id = str(_dict(_dict(cq.get("message")).get("chat")).get("id", ""))
    who = _telegram_user(_dict(cq.get("from")))
    async with request.app[POOL].connection() as conn, conn.transaction():
        acc = await store.chat_event_account(conn, data[4:], chat_id)
        if acc is None:
            return "This chat may not acknowledge that alarm."
        try:
            await transition(
                conn,
                Change("ack", now, now, account_id=acc, event_id=data[4:], actor=who,
                       note={"note": "acknowledged from Telegram"}, via=f"telegram:chat:{chat_id}"),
            )  # fmt: skip
        except ApiError as err:
            return err.message
    return "Acknowledged. Add the corrective action in OpenSense."


# --- escalation, silences, test alarm, outbound log ----------------------------------------


@routes.get("/v1/sites/{site_id}/escalation")
async def get_escalation(request: web.Request) -> web.Response:
    async with request.app[POOL].connection() as conn:
        acc = await auth.account(request, conn)
        site = await get_site(conn, acc, request.match_info["site_id"])
        steps = await store.escalation_steps(conn, site["id"])
        return response(
            {"site_id": site["id"], "steps": outbox.DEFAULT_STEPS if steps is None else steps}
        )


@routes.put("/v1/sites/{site_id}/escalation")
async def put_escalation(request: web.Request) -> web.Response:
    async with request.app[POOL].connection() as conn:
        acc = await auth.account(request, conn, read=False)
        await write_limit(request, conn, acc)
        site = await get_site(conn, acc, request.match_info["site_id"])
        body = await json_object(request)
        steps = await set_escalation(conn, request, acc, site["id"], body)
        return response({"site_id": site["id"], "steps": steps})


async def set_escalation(
    conn: AsyncConnection[Any],
    request: web.Request,
    acc: str,
    site_id: str,
    body: dict[str, Any],
    actor: str | None = None,
) -> list[Any]:
    """The steps of `body` as site `site_id`'s (a site of this account's, get_site)."""
    steps = body.get("steps")
    if not isinstance(steps, list) or not 1 <= len(steps) <= 10:
        raise ApiError("invalid_request", "steps must be a list of 1..10 steps")
    for s in steps:
        d = s.get("delay_min") if isinstance(s, dict) else None
        to = s.get("to") if isinstance(s, dict) else None
        if isinstance(d, bool) or not isinstance(d, int) or not 0 <= d <= 24 * 60:
            raise ApiError("invalid_request", "each step needs delay_min, 0..1440")
        if not (
            to in outbox.STEP_TARGETS
            or (isinstance(to, list) and all(isinstance(x, str) for x in to))
        ):
            raise ApiError(
                "invalid_request", "a step's to is on_shift, manager, everyone or a list of recipient ids"
            )  # fmt: skip
    async with conn.transaction():
        old = await store.escalation_steps(conn, site_id, lock=True)
        await store.put_escalation(conn, site_id, steps)
        await _audit(
            conn, request, acc, "escalation.update", site_id, {"from": old, "to": steps}, actor
        )
    return steps


@routes.get("/v1/silences")
async def list_silences(request: web.Request) -> web.Response:
    async with request.app[POOL].connection() as conn:
        acc = await auth.account(request, conn)
        return response({"data": await store.silences(conn, acc)})


@routes.post("/v1/silences")
async def create_silence(request: web.Request) -> web.Response:
    """Notifications only: the alarm still opens, shows and is reported."""
    async with request.app[POOL].connection() as conn:
        acc = await auth.account(request, conn, read=False)
        await write_limit(request, conn, acc)
        body = await json_object(request)
        return response(await add_silence(conn, request, acc, body), status=201)


async def add_silence(
    conn: Conn, request: web.Request, acc: str, body: Body, actor: Who = None
) -> Body:
    start, end = _ts(body.get("from"), "from"), _ts(body.get("to"), "to")
    if end <= start:
        raise ApiError("invalid_request", "to must be after from")
    reason = _text(body, "reason", required=True, limit=500)
    site = await _site_or_none(conn, acc, body.get("site_id"))
    chan = None
    if body.get("channel_id") is not None:
        chan = (await channel_row(conn, acc, str(body["channel_id"])))["id"]
    async with conn.transaction():
        row = await store.insert_silence(conn, acc, site, chan, start, end, reason)
        await _audit(
            conn, request, acc, "silence.create", row["id"],
            {"site_id": site, "channel_id": chan, "from": start, "to": end, "reason": reason},
            actor,
        )  # fmt: skip
    return row


@routes.post("/v1/notifications/test")
async def test_alarm(request: web.Request) -> web.Response:
    cfg = request.app[CONFIG]
    async with request.app[POOL].connection() as conn:
        acc = await auth.account(request, conn, read=False)
        # every press sends to every recipient at once: per hour, before anything is read
        await ratelimit.hit(
            conn, f"test_alarm:{acc}", cfg.test_alarm_per_hour, 3600, cfg.clock(), "The test alarm"
        )
        body = await json_object(request)
    by = _text(body, "by", limit=200) or "the API"
    if egress.line_problem(by, "by"):
        raise ApiError("invalid_request", "by may not contain line breaks or control characters")
    results = await dispatch.send_test(
        request.app[POOL], request.app[CONFIG], request.app[HTTP], acc, by
    )
    return response({"results": results})


@routes.get("/v1/outbound-log")
async def outbound_log(request: web.Request) -> web.Response:
    try:
        limit = min(max(int(request.query.get("limit", "100")), 1), 1000)
    except ValueError:
        raise ApiError("invalid_request", "limit must be an integer") from None
    async with request.app[POOL].connection() as conn:
        acc = await auth.account(request, conn)
        return response({"data": await store.outbound_log(conn, acc, limit)})
