"""The operator's dashboard: sign-in by magic link, users and roles, server-rendered
pages (docs/dashboard.md)."""

from __future__ import annotations

from aiohttp import web


def setup(app: web.Application) -> None:
    """Templates, the sign-in mailer's context, the pages and /v1/auth/request, and
    the security headers on every answer of those routes."""
    # imported here, not at the top: api/keys.py imports web.mail for a key's type,
    # and the HTTP layer imports api/keys.py (docs/architecture.md)
    import aiohttp_jinja2
    import jinja2

    from . import account, audit, channel, devices, live, notify, overview, reports, routes, rules
    from .ctx import web_ctx
    from .routes import SECURITY_HEADERS

    # every module of pages (each a RouteTableDef named `routes`): sign-in first
    pages = (routes, overview, live, channel, devices, reports, rules, notify, audit, account)

    aiohttp_jinja2.setup(
        app,
        loader=jinja2.PackageLoader("opensense.web", "templates"),
        autoescape=jinja2.select_autoescape(default=True),
        undefined=jinja2.StrictUndefined,
    )
    app.cleanup_ctx.append(web_ctx)
    app.cleanup_ctx.append(live.live_ctx)  # one LISTEN connection for the live streams
    app.on_shutdown.append(live.end_streams)
    for module in pages:
        app.router.add_routes(module.routes)
    paths = {r.path for m in pages for r in m.routes if isinstance(r, web.RouteDef)}

    async def security_headers(request: web.Request, response: web.StreamResponse) -> None:
        resource = request.match_info.route.resource
        if resource is not None and resource.canonical in paths:
            for name, value in SECURITY_HEADERS.items():
                response.headers.setdefault(name, value)

    app.on_response_prepare.append(security_headers)
