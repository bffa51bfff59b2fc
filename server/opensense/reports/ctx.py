"""The renderer of a serving process (reports/runner.py), started with the app."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from aiohttp import web

from .. import aio
from ..api.keys import CONFIG, POOL, REPORTS
from .runner import Renderer


async def reports_ctx(app: web.Application) -> AsyncIterator[None]:
    cfg = app[CONFIG]
    renderer = Renderer(app[POOL], cfg)
    app[REPORTS] = renderer
    # OPENSENSE_REPORT_WORKERS=0: this process queues and serves files, renders no queue
    task = asyncio.create_task(renderer.loop()) if cfg.report_workers > 0 else None
    yield
    await aio.cancel(task)
