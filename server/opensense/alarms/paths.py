"""The three dispatch paths. Each send returns an `Outcome`; none raises for a
delivery failure (the dispatcher decides retry, drop or give up from it).

- Telegram Bot API (base URL configurable, so tests and self-hosted Bot API
  servers work): sendMessage with an inline "Acknowledge" button whose callback
  data is `ack:<event id>`; answerCallbackQuery answers the button press.
- Email over SMTP with aiosmtplib (Postmark or any relay).
- Webhooks signed as PRODUCT.md says: `X-OpenSense-Signature: t=<epoch>,v1=<base64
  HMAC-SHA256(secret, t + "." + body)>`, `X-OpenSense-Delivery-Id`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import dataclass
from datetime import datetime
from email.message import EmailMessage
from typing import Any

import aiohttp
import aiosmtplib

from ..settings import Config

TIMEOUT = aiohttp.ClientTimeout(total=10)


@dataclass(frozen=True)
class Outcome:
    status: str  # ok | retry | dropped
    code: int | None = None
    error: str | None = None
    retry_after: float | None = None


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
    cfg: Config, to: str, msg: dict[str, Any], token: str | None = None
) -> Outcome:
    if not cfg.smtp_host:
        return Outcome("dropped", None, "no SMTP host configured")
    em = EmailMessage()
    em["From"] = cfg.mail_from
    em["To"] = to
    em["Subject"] = msg["subject"]
    text = msg["text"]
    if token and msg["kind"] != "verify":  # every alarm email can stop them (RFC 8058)
        url = f"{cfg.public_url.rstrip('/')}/v1/unsubscribe?token={token}"
        em["List-Unsubscribe"] = f"<{url}>"
        text += f"\n\nStop these emails: {url}"
    em.set_content(text)
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
        return Outcome("dropped", 550, str(exc)[:300])
    except aiosmtplib.SMTPResponseException as exc:
        status = "dropped" if 500 <= exc.code < 600 else "retry"
        return Outcome(status, exc.code, exc.message[:300])
    except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
        return Outcome("retry", None, f"{type(exc).__name__}: {exc}"[:300])


async def send_webhook(
    session: aiohttp.ClientSession,
    url: str,
    secret: str,
    delivery_id: str,
    msg: dict[str, Any],
    now: datetime,
) -> Outcome:
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
    try:
        async with session.post(url, data=body, headers=headers, timeout=TIMEOUT) as r:
            return _http_outcome(r.status, r.headers, await r.text())
    except (aiohttp.ClientError, TimeoutError) as exc:
        return Outcome("retry", None, f"{type(exc).__name__}: {exc}"[:300])
