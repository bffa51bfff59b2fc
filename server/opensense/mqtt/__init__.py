"""MQTT: the embedded broker, the external-broker consumer, topics and ACLs, the CA."""

from __future__ import annotations

from aiohttp import web


def setup(app: web.Application) -> None:
    """The MQTT side (embedded broker, external consumer or none, and the token
    revocation listener) and EMQX's HTTP auth hooks."""
    # imported here, not at the top: a module of the package (api/keys.py imports
    # some) must stay importable without the HTTP layer, which needs api/keys.py
    from .ctx import mqtt_ctx
    from .emqx import routes

    app.cleanup_ctx.append(mqtt_ctx)
    app.router.add_routes(routes)
