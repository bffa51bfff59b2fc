"""The `server_room_uptime` template: how available a server room's monitoring was,
and how long it ran above its limits, over a period (usually a month).

The same inputs and figures as haccp_monthly (reports/load.py, reports/data.py):
- a channel's **data coverage** is the share of the period covered by readings (a
  reading stands until the next, for at most two cadences);
- a **device's availability** is its best-covered channel's coverage (a device's
  channels report together: one message carries them all);
- the **site's availability** is the mean of its devices' availabilities;
- **hours above / below limits**: covered hours whose reading was above the upper /
  below the lower limit in force at its time;
- **device outages**: `device_offline` events (more than 2 cadences without a
  message, docs/alarms.md) overlapping the period, with their duration in it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape
from typing import Any

from reportlab.lib.units import mm
from reportlab.platypus import Paragraph, Spacer

from . import data as rd
from .catalogue import LANGUAGES, num, t
from .render import CONTENT_WIDTH, _Fmt, _register_fonts, _styles, _table, build, cover, last_page
from .seal_pdf import Seal


@dataclass(frozen=True)
class DeviceUptime:
    device: str
    channels: int
    availability: float  # 0..1
    outages: int  # device_offline events overlapping the period
    outage_s: float  # their duration within the period


def devices(d: rd.ReportData) -> list[DeviceUptime]:
    by: dict[str, list[rd.ChannelReport]] = {}
    for c in d.channels:
        by.setdefault(c.channel.device, []).append(c)
    out = []
    for name, cs in by.items():
        ids = {c.channel.id for c in cs}
        off = [
            x
            for x in d.excursions
            if x.excursion.kind == "device_offline" and x.excursion.channel_id in ids
        ]
        inside = [
            min(x.closed if x.closed is not None else d.end, d.end) - max(x.opened, d.start)
            for x in off
        ]
        out.append(
            DeviceUptime(
                name,
                len(cs),
                max(c.uptime for c in cs),
                len(off),
                math.fsum(max(0, s) for s in inside),
            )
        )
    return out


def site_availability(devs: Sequence[DeviceUptime]) -> float | None:
    return math.fsum(x.availability for x in devs) / len(devs) if devs else None


def render_uptime(d: rd.ReportData, language: str = "en", seal: Seal | None = None) -> bytes:
    """The server_room_uptime PDF of `d`; the same data and language give the same bytes."""
    if language not in LANGUAGES:
        raise ValueError(f"unknown language {language!r}; known: {', '.join(LANGUAGES)}")
    _register_fonts()
    L, st, full, inp = language, _styles(), CONTENT_WIDTH, d.input
    f = _Fmt(L, inp.timezone)
    period = f"{inp.period_from.isoformat()} – {inp.period_to.isoformat()}"
    devs = devices(d)
    avail = site_availability(devs)
    story = cover(
        L,
        t(L, "uptime_title"),
        inp.logo,
        [
            [t(L, "site"), Paragraph(escape(inp.site_name), st["cell"])],
            [t(L, "address"), Paragraph(escape(inp.address or t(L, "dash")), st["cell"])],
            [
                t(L, "period"),
                t(
                    L,
                    "period_value",
                    start=inp.period_from.isoformat(),
                    end=inp.period_to.isoformat(),
                    hours=num(L, d.hours, 0),
                    tz=inp.timezone,
                ),
            ],  # fmt: skip
            [
                t(L, "site_availability"),
                f"{num(L, avail * 100, 2)} %" if avail is not None else t(L, "dash"),
            ],  # fmt: skip
            [t(L, "channels"), str(len(d.channels))],
        ],
        None if d.has_data else t(L, "no_data_period"),
        seal=seal,
    )
    story += [
        Paragraph(escape(t(L, "devices")), st["h1"]),
        Paragraph(escape(t(L, "uptime_rule")), st["small"]),
        Spacer(1, 2 * mm),
    ]
    rows: list[list[Any]] = [
        [t(L, "device"), t(L, "channels"), t(L, "availability"), t(L, "outages"),
         t(L, "duration")]
    ]  # fmt: skip
    for x in devs:
        rows.append(
            [Paragraph(escape(x.device), st["cell"]), str(x.channels),
             f"{num(L, x.availability * 100, 2)} %", str(x.outages), f.duration(x.outage_s)]
        )  # fmt: skip
    story.append(_table(rows, [full * 0.3, full * 0.14, full * 0.2, full * 0.14, full * 0.22]))
    story += [Spacer(1, 4 * mm), Paragraph(escape(t(L, "channels")), st["h1"])]
    rows = [
        [t(L, "channel"), t(L, "uptime"), t(L, "gaps"), t(L, "longest_gap"),
         t(L, "hours_above"), t(L, "hours_below"), t(L, "max")]
    ]  # fmt: skip
    for c in d.channels:
        longest = max((g.seconds for g in c.gaps), default=0.0)
        rows.append(
            [Paragraph(escape(c.channel.name), st["cell"]), f"{num(L, c.uptime * 100, 2)} %",
             str(len(c.gaps)), f.duration(longest), num(L, c.hours_above, 2),
             num(L, c.hours_below, 2), f"{num(L, c.vmax)} {c.channel.unit}"]
        )  # fmt: skip
    story.append(_table(rows, [full * 0.22] + [full * 0.13] * 6))
    if not d.channels:
        story.append(Paragraph(escape(t(L, "no_data_period")), st["body"]))
    story += last_page(seal, L, inp.site_name, period)
    return build(L, t(L, "uptime_title"), inp.site_name, period, d.end, story, seal)
