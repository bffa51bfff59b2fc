"""Alarms: the rule engine, events, escalation and notifications (docs/alarms.md)."""

from __future__ import annotations

from aiohttp import web


def setup(app: web.Application) -> None:
    """The alarm loops (evaluator, sender) and the alarm API."""
    # imported here, not at the top: a module of the package (api/keys.py imports
    # some) must stay importable without the HTTP layer, which needs api/keys.py
    from .routes import routes
    from .tasks import alarms_ctx

    app.cleanup_ctx.append(alarms_ctx)
    app.router.add_routes(routes)
