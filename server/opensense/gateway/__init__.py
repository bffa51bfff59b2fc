"""Site gateways: the server side of store-and-forward (issue 5; docs/gateway.md)."""

from __future__ import annotations

from aiohttp import web


def setup(app: web.Application) -> None:
    """The gateways' API and their sync long-poll (push)."""
    # imported here, not at the top: a module of the package (api/keys.py imports
    # some) must stay importable without the HTTP layer, which needs api/keys.py
    from . import push
    from .routes import routes

    app.router.add_routes(routes)
    push.setup(app)
