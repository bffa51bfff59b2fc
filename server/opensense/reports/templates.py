"""The report templates, declared once as data: name -> how to load its inputs from
the database and how to render them (docs/reports.md lists every template; a test
checks it does).

A caller (the CLI, the reports API) looks a template up and runs

    inp = await TEMPLATES[name].load(conn, site_id, first, last, account_id=acc, logo=logo)
    pdf = TEMPLATES[name].render(inp, language, seal=None)  # a seal: reports/verify.py

`load` raises ApiError(site_not_found) for another account's site and ValueError
for a period the template does not take; `render` computes the figures (pure) and
renders the PDF, the same inputs giving the same bytes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from . import annual, load, uptime
from . import data as rd
from . import render as monthly
from .seal_pdf import Seal


@dataclass(frozen=True)
class Template:
    name: str
    doc: str
    # (conn, site_id, first day, last day, *, account_id, logo) -> the template's input
    load: Callable[..., Awaitable[Any]]
    # (input, language, seal=None) -> PDF bytes; without a seal a DRAFT (reports/verify.py)
    render: Callable[..., bytes]
    max_days: int  # the longest period it takes, in days (both ends inclusive)


def _haccp_monthly(inp: rd.ReportInput, language: str = "en", seal: Seal | None = None) -> bytes:
    return monthly.render_pdf(rd.compute(inp), language, seal)


def _haccp_annual(inp: annual.AnnualInput, language: str = "en", seal: Seal | None = None) -> bytes:
    return annual.render_annual(annual.compute_annual(inp), language, seal)


def _server_room_uptime(
    inp: rd.ReportInput, language: str = "en", seal: Seal | None = None
) -> bytes:
    return uptime.render_uptime(rd.compute(inp), language, seal)


TEMPLATES: dict[str, Template] = {
    tp.name: tp
    for tp in (
        Template(
            "haccp_monthly",
            "HACCP monthly report from the raw readings: daily figures, charts, the "
            "excursion log with zoom charts, sensor health, calibration, threshold changes.",
            load.load_month,
            _haccp_monthly,
            31,
        ),
        Template(
            "haccp_annual",
            "HACCP annual report from the 1-hour rollups: per channel and month min, mean, "
            "max, hours in range, excursions and their duration.",
            annual.load_year,
            _haccp_annual,
            366 + 31,
        ),
        Template(
            "server_room_uptime",
            "Server room: availability of devices and channels, gaps, hours above and "
            "below limits, device outages.",
            load.load_month,
            _server_room_uptime,
            31,
        ),
    )
}
