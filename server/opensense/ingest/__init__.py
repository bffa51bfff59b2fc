"""Ingest: the doors a reading comes in by (HTTP JSON, Shelly GET, LoRaWAN webhook)."""

from __future__ import annotations

from aiohttp import web


def setup(app: web.Application) -> None:
    """The doors' routes (the writer they share is the app's: opensense/app.py)."""
    # imported here, not at the top: a module of the package (api/keys.py imports
    # some) must stay importable without the HTTP layer, which needs api/keys.py
    from .routes import routes

    app.router.add_routes(routes)
