"""Accounts, sites, devices, channels and their tokens."""

from __future__ import annotations

from aiohttp import web


def setup(app: web.Application) -> None:
    """The management API of accounts, sites, devices, channels and tokens."""
    # imported here, not at the top: a module of the package (api/keys.py imports
    # some) must stay importable without the HTTP layer, which needs api/keys.py
    from .routes import routes

    app.router.add_routes(routes)
