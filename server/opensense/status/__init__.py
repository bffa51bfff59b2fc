"""Status page, health registry, self-watching, incidents and Prometheus metrics
(docs/status.md)."""

from __future__ import annotations

from aiohttp import web


def setup(app: web.Application) -> None:
    """The monitor and the incident mailer, the page, /metrics and the incident API;
    the whole of a status-only process (role `status`) besides the shared contexts."""
    # imported here, not at the top: a module of the package (api/keys.py imports
    # some) must stay importable without the HTTP layer, which needs api/keys.py
    from .ctx import status_ctx
    from .routes import routes

    app.cleanup_ctx.append(status_ctx)
    app.router.add_routes(routes)
