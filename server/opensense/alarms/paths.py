"""The notification paths, declared in `PATHS` at the end. Each send returns an `Outcome`; none raises for a
delivery failure (the dispatcher decides retry, drop or give up from it).

- Telegram Bot API (base URL configurable, so tests and self-hosted Bot API
  servers work): sendMessage with an inline "Acknowledge" button whose callback
  data is `ack:<event id>`; answerCallbackQuery answers the button press.
- Email over SMTP with aiosmtplib (Postmark or any relay).
- Webhooks signed as docs/product.md#notifications says: `X-OpenSense-Signature: t=<epoch>,v1=<base64
  HMAC-SHA256(secret, t + "." + body)>`, `X-OpenSense-Delivery-Id`. A webhook is a
  tenant's URL: it is checked and resolved at every send (egress.py), the connection
  goes to the checked address only, redirects are not followed, and only the status
  code is kept (the remote answer never comes back to the tenant).

An Outcome's `scope` says whose failure a retry is: `path` (the relay or the Bot API
cannot be reached: every account's messages fail) or `recipient` (this recipient's
mail domain or webhook endpoint): the status page counts the latter as a service
failure only when it spans accounts (docs/status.md).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.message import EmailMessage
from typing import Any

import aiohttp
import aiosmtplib
from yarl import URL

from ..settings import Config
from . import egress

TIMEOUT = aiohttp.ClientTimeout(total=10)


@dataclass(frozen=True)
class Outcome:
    status: str  # ok | retry | dropped | invalid (never sendable as stored: quarantined now)
    code: int | None = None
    error: str | None = None
    retry_after: float | None = None
    scope: str = "path"  # a retry's cause: path (service-wide) | recipient (this one's side)
    internal: bool = False  # an unexpected exception (given up on sooner)


def header_text(s: str) -> str:
    """A mail header from stored text: control characters (CR/LF) become spaces, so a
    name saved before names were checked cannot break (or inject into) the header."""
    return "".join(" " if ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F else c for c in s)


def sign(secret: str, t: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), str(t).encode() + b"." + body, hashlib.sha256).digest()
    return f"t={t},v1={base64.b64encode(mac).decode()}"


def verify(secret: str, header: str, body: bytes, now: int, tolerance: int = 300) -> bool:
    """The receiver's check (documented for integrators; the tests use it)."""
    try:
        parts = dict(p.split("=", 1) for p in header.split(","))
        t = int(parts["t"])
    except (ValueError, KeyError):
        return False
    if abs(now - t) > tolerance:
        return False
    return hmac.compare_digest(sign(secret, t, body), f"t={t},v1={parts.get('v1', '')}")


def _http_outcome(status: int, headers: Any, text: str) -> Outcome:
    if 200 <= status < 300:
        return Outcome("ok", status)
    if status == 429:
        try:
            ra = float(headers.get("Retry-After", "30"))
        except ValueError:
            ra = 30.0
        return Outcome("retry", status, text[:300], retry_after=ra)
    if 400 <= status < 500:
        return Outcome("dropped", status, text[:300])
    return Outcome("retry", status, text[:300])


async def telegram_call(
    session: aiohttp.ClientSession, cfg: Config, method: str, payload: dict[str, Any]
) -> Outcome:
    if not cfg.telegram_bot_token:
        return Outcome("dropped", None, "no Telegram bot token configured")
    url = f"{cfg.telegram_api_base.rstrip('/')}/bot{cfg.telegram_bot_token}/{method}"
    try:
        async with session.post(url, json=payload, timeout=TIMEOUT) as r:
            text = await r.text()
            if r.status == 429:  # Bot API: {"parameters": {"retry_after": n}}
                try:
                    ra = float(json.loads(text)["parameters"]["retry_after"])
                except (ValueError, KeyError, TypeError):
                    ra = 10.0
                return Outcome("retry", 429, text[:300], retry_after=ra)
            return _http_outcome(r.status, r.headers, text)
    except (aiohttp.ClientError, TimeoutError) as exc:
        # the bot token is part of the URL: never into the outbound log
        text = f"{type(exc).__name__}: {exc}".replace(cfg.telegram_bot_token, "<bot-token>")
        return Outcome("retry", None, text[:300])


async def send_telegram(
    session: aiohttp.ClientSession, cfg: Config, chat_id: str, msg: dict[str, Any]
) -> Outcome:
    payload: dict[str, Any] = {"chat_id": chat_id, "text": msg["text"]}
    event_id = (msg.get("data") or {}).get("event_id")
    if msg.get("ackable") and event_id:
        payload["reply_markup"] = {
            "inline_keyboard": [[{"text": "Acknowledge", "callback_data": f"ack:{event_id}"}]]
        }
    return await telegram_call(session, cfg, "sendMessage", payload)


async def send_email(
    cfg: Config,
    to: str,
    msg: dict[str, Any],
    token: str | None = None,
    attachment: tuple[str, str, bytes] | None = None,
) -> Outcome:
    """`attachment`: (file name, MIME type, bytes), e.g. a report's PDF (reports/schedule.py)."""
    if not cfg.smtp_host:
        return Outcome("dropped", None, "no SMTP host configured")
    why = egress.email_problem(to)
    if why:
        return Outcome("invalid", None, f"not sendable: {why}")
    em = EmailMessage()
    em["From"] = cfg.mail_from
    em["To"] = to
    em["Subject"] = header_text(str(msg["subject"]))[:250]
    text = str(msg["text"])
    if token and msg["kind"] not in ("verify", "recipient_left"):
        # every alarm email can stop them; RFC 8058 one-click: the mail client POSTs
        # "List-Unsubscribe=One-Click" to the URL (a GET only shows a page with a button)
        url = f"{cfg.public_url.rstrip('/')}/v1/unsubscribe?token={token}"
        em["List-Unsubscribe"] = f"<{url}>"
        em["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
        text += f"\n\nStop these emails: {url}"
    em.set_content(text)
    if attachment is not None:
        name, mime, data = attachment
        main, _, sub = mime.partition("/")
        em.add_attachment(data, maintype=main, subtype=sub, filename=name)
    try:
        await aiosmtplib.send(
            em,
            hostname=cfg.smtp_host,
            port=cfg.smtp_port,
            username=cfg.smtp_user or None,
            password=cfg.smtp_password or None,
            use_tls=cfg.smtp_tls == "tls",
            start_tls=True if cfg.smtp_tls == "starttls" else False,
            timeout=10,
        )
        return Outcome("ok", 250)
    except aiosmtplib.SMTPRecipientsRefused as exc:
        # the relay refused this recipient: permanently (5xx, dropped) or for now (4xx:
        # greylisting, its domain failing): retried, counted as the recipient's failure
        codes = [e.code for e in exc.recipients]
        if codes and all(400 <= c < 500 for c in codes):
            return Outcome("retry", codes[0], str(exc)[:300], scope="recipient")
        return Outcome("dropped", codes[0] if codes else 550, str(exc)[:300])
    except aiosmtplib.SMTPResponseException as exc:
        status = "dropped" if 500 <= exc.code < 600 else "retry"
        return Outcome(status, exc.code, exc.message[:300])
    except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
        return Outcome("retry", None, f"{type(exc).__name__}: {exc}"[:300])


async def send_webhook(
    url: str,
    secret: str,
    delivery_id: str,
    msg: dict[str, Any],
    now: datetime,
    allow_private: bool = False,
) -> Outcome:
    why = egress.url_problem(url)
    if why:
        return Outcome("invalid", None, f"not sendable: {why}")
    u = URL(url)
    host = u.raw_host or ""
    try:
        addrs = await egress.resolve(host, u.port or 0, allow_private)
    except egress.Unresolved as exc:  # the tenant's DNS failing: its side, retried
        return Outcome("retry", None, str(exc)[:300], scope="recipient")
    except egress.Refused as exc:
        return Outcome("invalid", None, f"refused: {exc}"[:300])
    body = json.dumps(
        {
            "id": delivery_id,
            "type": msg["kind"],
            "created": int(now.timestamp()),
            "data": msg["data"],
        },
        separators=(",", ":"),
    ).encode()
    headers = {
        "Content-Type": "application/json",
        "X-OpenSense-Signature": sign(secret, int(now.timestamp()), body),
        "X-OpenSense-Delivery-Id": delivery_id,
    }
    connector = aiohttp.TCPConnector(
        resolver=egress.PinnedResolver(host, addrs), use_dns_cache=False, limit=1
    )
    try:
        async with (
            aiohttp.ClientSession(connector=connector, trust_env=False) as session,
            session.post(
                url, data=body, headers=headers, timeout=TIMEOUT, allow_redirects=False
            ) as r,
        ):
            status = r.status  # only the status: the answer's body is never read
            retry_after = r.headers.get("Retry-After", "")
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        # the exception's text, not the remote's: no answer content reaches the tenant
        return Outcome("retry", None, type(exc).__name__, scope="recipient")
    if 200 <= status < 300:
        return Outcome("ok", status)
    if 300 <= status < 400:
        return Outcome("dropped", status, f"HTTP {status}: redirects are not followed")
    if status == 429:
        try:
            ra = float(retry_after)
        except ValueError:
            ra = 30.0
        return Outcome("retry", status, "HTTP 429", retry_after=ra, scope="recipient")
    if 400 <= status < 500:
        return Outcome("dropped", status, f"HTTP {status}")
    return Outcome("retry", status, f"HTTP {status}", scope="recipient")


# --- the declared paths --------------------------------------------------------------
# A notification path is one `NotifyPath` in `PATHS`: dispatch, the outbox, the API,
# its OpenAPI enums and the status page's probes and components read this table and
# never name a path. Adding one is an entry plus its docs (docs/alarms.md, "Adding a
# notification path"; tests/test_extension_points.py adds a throwaway one).

TELEGRAM_GAP = timedelta(seconds=10)
EMAIL_PER_HOUR = 10


@dataclass(frozen=True)
class Send:
    """One message to one recipient, as a path's `send` gets it."""

    session: aiohttp.ClientSession
    cfg: Config
    address: str
    secret: str | None  # the path's signing secret, or (verify paths) the link token
    delivery_id: str
    msg: dict[str, Any]
    now: datetime


SendFn = Callable[[Send], Awaitable[Outcome]]
# Why an address cannot be added through POST /v1/targets (the API's message), or None.
AddressCheck = Callable[[Config, str], Awaitable[str | None]]
# When a recipient may next be sent to, from its `target_pacing` row (None: now).
Pacing = Callable[[Mapping[str, Any], datetime], datetime | None]


@dataclass(frozen=True)
class NotifyPath:
    name: str
    doc: str
    send: SendFn
    # People read it: escalation steps pick its recipients, several messages due
    # together become one grouped message, an alarm per channel is paced
    # (OPENSENSE_NOTIFY_CHANNEL_INTERVAL_S), and a path failing for everyone is an
    # incident told through the other paths. False: a machine (a webhook) that hears
    # every event at once, one message each, silences included.
    people: bool
    # Double opt-in: a recipient gets a link token (`notify_targets.token`) and a
    # confirmation message; nothing else goes to it before it confirms. The token is
    # what `send` gets as its secret (the unsubscribe link).
    verify: bool = False
    pacing: Pacing | None = None
    # A signing secret made when the recipient is added, shown once in that answer,
    # stored in `notify_targets.secret` and given to `send`.
    secret: Callable[[], str] | None = None
    # The address check of POST /v1/targets; None: not added there (`link` says how).
    check: AddressCheck | None = None
    link: str = ""


async def _send_telegram(s: Send) -> Outcome:
    return await send_telegram(s.session, s.cfg, s.address, s.msg)


async def _send_email(s: Send) -> Outcome:
    return await send_email(s.cfg, s.address, s.msg, s.secret)


async def _send_webhook(s: Send) -> Outcome:
    return await send_webhook(
        s.address, s.secret or "", s.delivery_id, s.msg, s.now, s.cfg.webhook_allow_private
    )


async def _check_email(_cfg: Config, address: str) -> str | None:
    why = egress.email_problem(address)
    return f"address must be an email address: {why}" if why else None


async def _check_webhook(cfg: Config, address: str) -> str | None:
    why = egress.url_problem(address)
    if why:
        return f"address must be an http(s) URL: {why}"
    u = URL(address)
    try:
        await egress.resolve(u.raw_host or "", u.port or 0, cfg.webhook_allow_private)
    except egress.Refused as exc:
        return f"address refused: {exc}"
    return None


def _telegram_pacing(p: Mapping[str, Any], now: datetime) -> datetime | None:
    """A chat gets at most one message per 10 s (the Bot API's per-chat limit)."""
    last = p["last_sent_at"]
    return last + TELEGRAM_GAP if last and now - last < TELEGRAM_GAP else None


def _email_pacing(p: Mapping[str, Any], now: datetime) -> datetime | None:
    """At most EMAIL_PER_HOUR messages an hour; the rest wait and go as one digest."""
    if now - p["window_start"] < timedelta(hours=1) and p["sent"] >= EMAIL_PER_HOUR:
        start: datetime = p["window_start"]
        return start + timedelta(hours=1)
    return None


def _webhook_secret() -> str:
    return "whsec_" + secrets.token_urlsafe(24)


PATHS: dict[str, NotifyPath] = {
    p.name: p
    for p in (
        NotifyPath(
            "telegram",
            "a Telegram chat or group (address: the chat id), with an Acknowledge button",
            _send_telegram,
            people=True,
            pacing=_telegram_pacing,
            link="link Telegram with POST /v1/telegram/link",
        ),
        NotifyPath(
            "email",
            "an email address over SMTP, confirmed by a link first",
            _send_email,
            people=True,
            verify=True,
            pacing=_email_pacing,
            check=_check_email,
        ),
        NotifyPath(
            "webhook",
            "a signed HTTPS POST to the tenant's URL",
            _send_webhook,
            people=False,
            secret=_webhook_secret,
            check=_check_webhook,
        ),
    )
}


def people_paths() -> list[str]:
    return [p.name for p in PATHS.values() if p.people]


def machine_paths() -> list[str]:
    return [p.name for p in PATHS.values() if not p.people]


def is_people(path: str) -> bool:
    p = PATHS.get(path)
    return p is not None and p.people
