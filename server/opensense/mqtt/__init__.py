"""MQTT: the embedded broker, the external-broker consumer, topics and ACLs, the CA."""

from __future__ import annotations

from aiohttp import web


def setup(app: web.Application) -> None:
    """The MQTT side (embedded broker, external consumer or none, and the token
    revocation listener) and EMQX's HTTP auth hooks."""
    # imported here, not at the top: a module of the package (api/keys.py imports
    # some) must stay importable without the HTTP layer, which needs api/keys.py
    from ..api.keys import CONFIG
    from ..workers import WORKER, is_leader, relay_ctx
    from .ctx import mqtt_ctx
    from .emqx import routes

    app.cleanup_ctx.append(mqtt_ctx)
    if app[CONFIG].mqtt == "embedded" and WORKER in app and is_leader(app):
        # the leader of several workers: their broker calls come to its broker
        app.cleanup_ctx.append(relay_ctx)
    app.router.add_routes(routes)
