"""Compliance reports (docs/reports.md): the templates (build.py), the asynchronous
reports API and its renderer, and the monthly schedule (schedule.py, a job)."""

from __future__ import annotations

from aiohttp import web

from ..status.components import register_feature

register_feature("reports")  # the status page's "Report rendering" component


def setup(app: web.Application) -> None:
    """The renderer (claims queued reports) and the reports API."""
    # imported here, not at the top: a module of the package (api/keys.py imports
    # runner.py) must stay importable without the HTTP layer, which needs api/keys.py
    from .ctx import reports_ctx
    from .routes import routes

    app.cleanup_ctx.append(reports_ctx)
    app.router.add_routes(routes)
