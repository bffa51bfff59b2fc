"""Sign-in mail: the code and the link, sent through the alarms' SMTP sender
(alarms/paths.py send_email, OPENSENSE_SMTP_*). Without an SMTP host (the demo) the
link goes to the server log, marked so it stands out.

Sending runs as a task of its own, after the answer: the answer to /auth/login and
/v1/auth/request takes the same time whether or not the email is a user's."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from ..alarms.paths import send_email
from ..settings import Config

log = logging.getLogger(__name__)

LOG_MARK = "*** SIGN-IN LINK (no SMTP host: not mailed) ***"


def link_url(cfg: Config, link: str) -> str:
    return f"{cfg.public_url.rstrip('/')}/auth/link?t={link}"


def mail_text(code: str, url: str) -> str:
    return (
        "Your OpenSense sign-in code is\n\n"
        f"    {code}\n\n"
        f"or open this link to sign in:\n{url}\n\n"
        "Code and link work once, for 10 minutes; asking for a new one voids this one.\n"
        "If you did not ask to sign in, ignore this email.\n"
    )


def link_in_log_refused(cfg: Config) -> str | None:
    """Why this server must not start, or None: a production server (public URL over
    TLS) with no SMTP host would leave its users unable to sign in, unless told."""
    if cfg.smtp_host or not cfg.public_url.startswith("https://") or cfg.login_link_in_log:
        return None
    return (
        "OPENSENSE_SMTP_HOST is empty on a server reached over https "
        f"({cfg.public_url}): sign-in links could only go to the server log. "
        "Configure SMTP, or set OPENSENSE_LOGIN_LINK_IN_LOG=true to run that way on purpose."
    )


@dataclass
class LoginMailer:
    """The sign-in mails in flight, awaited or cancelled when the app stops."""

    cfg: Config
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def send(self, to: str, code: str, link: str) -> None:
        task = asyncio.create_task(self._send(to, code, link))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _send(self, to: str, code: str, link: str) -> None:
        url = link_url(self.cfg, link)
        if not self.cfg.smtp_host:
            log.warning("%s for %s: %s (code %s)", LOG_MARK, to, url, code)
            return
        msg = {
            "kind": "login",
            "subject": "Your OpenSense sign-in code",
            "text": mail_text(code, url),
        }
        outcome = await send_email(self.cfg, to, msg)
        if outcome.status != "ok":
            log.warning("sign-in mail to %s not sent: %s %s", to, outcome.status, outcome.error)

    async def close(self) -> None:
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=10)
        for t in set(self.tasks):
            t.cancel()
