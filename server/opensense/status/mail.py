"""The incident mailer: sends incident_mail rows through the incident SMTP path
(OPENSENSE_INCIDENT_SMTP_URL, OPENSENSE_INCIDENT_MAIL_FROM), configured apart from the
app's notification mail so that it can point at infrastructure independent of the
service (docs/product.md#incident-classes: mailed from infrastructure independent of the service).

Rows are claimed with FOR UPDATE SKIP LOCKED (any number of processes), sent, and
marked; a failure is retried with backoff (30 s doubling, at most an hour). The
outbox lives in the database, so a restart loses no notice.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import timedelta
from email.message import EmailMessage
from urllib.parse import parse_qs, unquote, urlsplit

import aiosmtplib
from psycopg_pool import AsyncConnectionPool

from ..settings import Config

log = logging.getLogger(__name__)
BATCH = 20


@dataclass(frozen=True)
class SmtpPath:
    host: str
    port: int
    username: str | None
    password: str | None
    use_tls: bool  # smtps:// (implicit TLS)
    start_tls: bool | None  # smtp://…?starttls=1; None: when offered

    @classmethod
    def parse(cls, url: str) -> SmtpPath:
        u = urlsplit(url)
        if u.scheme not in ("smtp", "smtps") or not u.hostname:
            raise ValueError(
                "OPENSENSE_INCIDENT_SMTP_URL must look like smtp[s]://[user:password@]host[:port]"
            )
        q = parse_qs(u.query)
        st = q.get("starttls", [""])[0].lower()
        return cls(
            host=u.hostname,
            port=u.port or (465 if u.scheme == "smtps" else 25),
            username=unquote(u.username) if u.username else None,
            password=unquote(u.password) if u.password else None,
            use_tls=u.scheme == "smtps",
            start_tls=True
            if st in ("1", "true", "yes")
            else False
            if st in ("0", "false", "no")
            else None,
        )


async def send_due(pool: AsyncConnectionPool, cfg: Config, path: SmtpPath) -> int:
    """Send what is due now; returns how many were sent."""
    now = cfg.clock()
    sent = 0
    async with pool.connection() as conn, conn.transaction():
        cur = await conn.execute(
            "SELECT id, to_addr, subject, body, attempts FROM incident_mail"
            " WHERE sent_at IS NULL AND next_try_at <= %s ORDER BY id LIMIT %s"
            " FOR UPDATE SKIP LOCKED",
            (now, BATCH),
        )
        rows = await cur.fetchall()
        for mid, to, subject, body, attempts in rows:
            msg = EmailMessage()
            msg["From"] = cfg.incident_mail_from
            msg["To"] = to
            msg["Subject"] = subject
            msg["Message-ID"] = f"<incident-mail-{mid}@{cfg.incident_mail_from.split('@')[-1]}>"
            msg.set_content(body)
            try:
                await aiosmtplib.send(
                    msg,
                    hostname=path.host,
                    port=path.port,
                    username=path.username,
                    password=path.password,
                    use_tls=path.use_tls,
                    start_tls=path.start_tls,
                    timeout=20,
                )
            except Exception as exc:
                wait = min(timedelta(hours=1), timedelta(seconds=30) * 2**attempts)
                await conn.execute(
                    "UPDATE incident_mail SET attempts = attempts + 1, last_error = %s,"
                    " next_try_at = %s WHERE id = %s",
                    (repr(exc)[:500], now + wait, mid),
                )
                log.warning("incident mail %s to %s failed: %r", mid, to, exc)
                continue
            await conn.execute(
                "UPDATE incident_mail SET attempts = attempts + 1, sent_at = %s,"
                " last_error = NULL WHERE id = %s",
                (now, mid),
            )
            sent += 1
    return sent


async def run(pool: AsyncConnectionPool, cfg: Config, every: float = 5.0) -> None:
    if not cfg.incident_smtp_url:
        log.warning(
            "OPENSENSE_INCIDENT_SMTP_URL is empty: incident notices stay queued in incident_mail"
        )
        return
    path = SmtpPath.parse(cfg.incident_smtp_url)
    while True:
        try:
            while await send_due(pool, cfg, path) == BATCH:
                pass
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("incident mailer pass failed")
        await asyncio.sleep(every)
