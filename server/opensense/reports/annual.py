"""The `haccp_annual` template: up to 13 months per channel, for the annual inspection.

Built from the 1-hour rollups (`rollup_1h`: min, max, sum and count per channel and
UTC hour), never from raw readings: a year of 20 channels is 175,200 rollup rows
instead of ten million readings, and rollups outlive raw retention (5 years). Why
hours rather than the 1-day rollups: `rollup_1d` holds UTC days, which straddle the
site's local midnight (Europe/Berlin: by one or two hours), so a local month could
not be cut out of them; a whole-hour time zone's months are whole UTC hours.

Per channel and local month (the site's time zone; the months' real lengths, DST
included): min, mean (sum / count of the readings), max, hours with data (hours
with at least one reading), hours in range (hours whose minimum and maximum both lie
within the limits in force at the hour's start: an hour that touched a limit is not
counted, so the figure never flatters), and the excursions overlapping the month
with their total duration inside it. A total row covers the whole period.
"""

from __future__ import annotations

import math
from array import array
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from html import escape
from typing import Any
from zoneinfo import ZoneInfo

from psycopg import AsyncConnection
from reportlab.lib.units import mm
from reportlab.platypus import Paragraph, Spacer

from ..storage import rollups
from . import data as rd
from . import load
from .catalogue import LANGUAGES, num, t
from .render import CONTENT_WIDTH, _register_fonts, _styles, _table, build, cover, facts, last_page
from .seal_pdf import Seal

MAX_MONTHS = 13


@dataclass(frozen=True)
class HourlyChannel:
    """A channel's 1-hour rollups over the period, in parallel arrays."""

    id: str
    name: str
    device: str
    unit: str
    ts: Sequence[float]  # the hour's start, epoch s, ascending
    vmin: Sequence[float]
    vmax: Sequence[float]
    vsum: Sequence[float]
    n: Sequence[int]
    thresholds: Sequence[rd.Threshold] = ()


@dataclass(frozen=True)
class AnnualInput:
    site_id: str
    site_name: str
    address: str
    timezone: str
    period_from: date
    period_to: date  # inclusive
    channels: Sequence[HourlyChannel]
    excursions: Sequence[rd.Excursion] = ()
    logo: bytes | None = None


@dataclass(frozen=True)
class MonthRow:
    month: date  # its first day (or the period's first day)
    hours: float  # its real length within the period
    n: int
    vmin: float | None
    vmean: float | None
    vmax: float | None
    hours_with_data: float
    hours_in_range: float
    excursions: int
    excursion_s: float


@dataclass(frozen=True)
class AnnualChannel:
    channel: HourlyChannel
    months: list[MonthRow]
    total: MonthRow


@dataclass(frozen=True)
class AnnualData:
    input: AnnualInput
    start: float
    end: float
    channels: list[AnnualChannel]

    @property
    def hours(self) -> float:
        return (self.end - self.start) / 3600


def months_of(period_from: date, period_to: date, tz: str) -> list[tuple[date, float, float]]:
    """(label day, start, end) of each local month the period touches, clipped to it."""
    z = ZoneInfo(tz)
    out = []
    first = period_from
    while first <= period_to:
        nxt = (first.replace(day=1) + timedelta(days=32)).replace(day=1)
        last = min(nxt - timedelta(days=1), period_to)
        out.append(
            (first, rd.local_midnight(first, z), rd.local_midnight(last + timedelta(days=1), z))
        )
        first = nxt
    return out


def _row(
    ch: HourlyChannel, label: date, a: float, b: float, exs: list[rd.Excursion], end: float
) -> MonthRow:
    idx = [i for i in range(bisect_left(ch.ts, a), bisect_left(ch.ts, b)) if ch.n[i] > 0]
    n = sum(ch.n[i] for i in idx)
    in_range = sum(
        1
        for i in idx
        if rd.in_range(th := rd._threshold_at(ch.thresholds, ch.ts[i]), ch.vmin[i])
        and rd.in_range(th, ch.vmax[i])
    )
    over = [
        max(0.0, min(e.cleared_at if e.cleared_at is not None else end, b) - max(e.started_at, a))
        for e in exs
    ]
    hit = [s for s, e in zip(over, exs, strict=True) if s > 0 or a <= e.started_at < b]
    return MonthRow(
        month=label,
        hours=(b - a) / 3600,
        n=n,
        vmin=min((ch.vmin[i] for i in idx), default=None),
        vmean=math.fsum(ch.vsum[i] for i in idx) / n if n else None,
        vmax=max((ch.vmax[i] for i in idx), default=None),
        hours_with_data=float(len(idx)),
        hours_in_range=float(in_range),
        excursions=len(hit),
        excursion_s=math.fsum(hit),
    )


def compute_annual(inp: AnnualInput) -> AnnualData:
    months = months_of(inp.period_from, inp.period_to, inp.timezone)
    start, end = months[0][1], months[-1][2]
    out = []
    for ch in inp.channels:
        exs = [
            e
            for e in inp.excursions
            if e.channel_id == ch.id
            and e.started_at < end
            and (e.cleared_at is None or e.cleared_at >= start)
        ]
        rows = [_row(ch, label, a, b, exs, end) for label, a, b in months]
        out.append(AnnualChannel(ch, rows, _row(ch, inp.period_from, start, end, exs, end)))
    return AnnualData(inp, start, end, out)


# --- loading ----------------------------------------------------------------------------


async def load_year(
    conn: AsyncConnection[Any], site_id: str, period_from: date, period_to: date, *,
    account_id: str | None = None, logo: bytes | None = None,
) -> AnnualInput:  # fmt: skip
    """The site's 1-hour rollups, thresholds and excursions over the period (at most
    MAX_MONTHS local months; ValueError beyond)."""
    if len(months_of(period_from, period_to, "UTC")) > MAX_MONTHS:
        raise ValueError(f"an annual report covers at most {MAX_MONTHS} months")
    site = await load.site(conn, site_id, account_id)
    start, end = rd.period_bounds(period_from, period_to, site.timezone)
    lo, hi = datetime.fromtimestamp(start, UTC), datetime.fromtimestamp(end, UTC)
    channels = []
    for c in await load.channels(conn, site_id):
        cur = await conn.execute(
            "SELECT extract(epoch FROM bucket)::float8, vmin, vmax, vsum, n"
            f" FROM ({rollups.buckets_sql('1h')}) b",
            rollups.buckets_params([c.num], lo, hi),
        )
        rows = await cur.fetchall()
        channels.append(
            HourlyChannel(
                id=c.id,
                name=c.name,
                device=c.device,
                unit=c.unit,
                ts=array("d", (r[0] for r in rows)),
                vmin=array("d", (r[1] for r in rows)),
                vmax=array("d", (r[2] for r in rows)),
                vsum=array("d", (r[3] for r in rows)),
                n=array("q", (r[4] for r in rows)),
                thresholds=await load._thresholds(conn, site.account_id, c.id, start, end),
            )
        )
    return AnnualInput(
        site_id=site_id,
        site_name=site.name,
        address=site.address,
        timezone=site.timezone,
        period_from=period_from,
        period_to=period_to,
        channels=channels,
        excursions=await load.excursions(conn, [c.id for c in channels], lo, hi),
        logo=logo,
    )


# --- rendering --------------------------------------------------------------------------


def render_annual(d: AnnualData, language: str = "en", seal: Seal | None = None) -> bytes:
    """The haccp_annual PDF of `d`; the same data and language give the same bytes."""
    if language not in LANGUAGES:
        raise ValueError(f"unknown language {language!r}; known: {', '.join(LANGUAGES)}")
    _register_fonts()
    L, st, full, inp = language, _styles(), CONTENT_WIDTH, d.input
    period = f"{inp.period_from.isoformat()} – {inp.period_to.isoformat()}"
    has_data = any(c.total.n for c in d.channels)
    story = cover(
        L,
        t(L, "annual_title"),
        inp.logo,
        [
            *facts(L, inp, d.hours),
            [t(L, "channels"), str(len(d.channels))],
            [t(L, "readings"), num(L, sum(c.total.n for c in d.channels), 0)],
            [t(L, "excursions"), str(sum(c.total.excursions for c in d.channels))],
        ],
        None if has_data else t(L, "no_data_period"),
        seal=seal,
    )
    story.append(Paragraph(escape(t(L, "annual_intro")), st["small"]))
    head = [t(L, k) for k in ("month", "hours", "n", "min", "mean", "max", "hours_data",
                              "in_range", "excursions", "duration")]  # fmt: skip
    widths = [full * w for w in (0.1, 0.08, 0.11, 0.08, 0.08, 0.08, 0.1, 0.1, 0.12, 0.12)]

    def cells(label: str, r: MonthRow) -> list[Any]:
        return [
            label, num(L, r.hours, 0), num(L, r.n, 0), num(L, r.vmin), num(L, r.vmean),
            num(L, r.vmax), num(L, r.hours_with_data, 0), num(L, r.hours_in_range, 0),
            str(r.excursions), num(L, r.excursion_s / 3600) + " " + t(L, "unit_h"),
        ]  # fmt: skip

    for c in d.channels:
        story += [
            Spacer(1, 4 * mm),
            Paragraph(escape(t(L, "channel_heading", name=c.channel.name)), st["h2"]),
            Paragraph(
                escape(t(L, "annual_meta", device=c.channel.device, unit=c.channel.unit)),
                st["small"],
            ),  # fmt: skip
        ]
        rows = [head] + [cells(r.month.strftime("%Y-%m"), r) for r in c.months]
        rows.append(cells(t(L, "total"), c.total))
        story.append(_table(rows, widths))
    if not d.channels:
        story.append(Paragraph(escape(t(L, "no_data_period")), st["body"]))
    story += last_page(seal, L, inp.site_name, period)
    return build(L, t(L, "annual_title"), inp.site_name, period, d.end, story, seal)
