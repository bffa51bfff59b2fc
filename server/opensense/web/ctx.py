"""The dashboard's context: the sign-in mailer, and the refusal to start a production
server that could only write sign-in links to its log (web/mail.py)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from aiohttp import web

from ..api.keys import CONFIG, LOGIN_MAILER
from .mail import LOG_MARK, LoginMailer, link_in_log_refused

log = logging.getLogger(__name__)


async def web_ctx(app: web.Application) -> AsyncIterator[None]:
    cfg = app[CONFIG]
    why = link_in_log_refused(cfg)
    if why:
        raise RuntimeError(why)
    if not cfg.smtp_host:
        log.warning("no SMTP host: sign-in links go to this log, marked %s", LOG_MARK)
    mailer = LoginMailer(cfg)
    app[LOGIN_MAILER] = mailer
    yield
    await mailer.close()
