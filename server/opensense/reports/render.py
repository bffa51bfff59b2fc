"""The `haccp_monthly` template: ReportData -> PDF bytes, with ReportLab.

ReportLab was picked by tools/bench/report (docs/reports.md has the figures): the
same monthly document rendered ~7x faster than WeasyPrint with a third of its memory.
Charts are ReportLab's own vector graphics (no matplotlib).

Reproducible bytes: ReportLab's invariant mode (no random document id, no
timestamps in the content) and the document's creation/modification dates set to
the end of the period, so the same inputs give byte-identical PDFs. Fonts: DejaVu
Sans (Debian fonts-dejavu-core), embedded as a subset so °C, ä, š, č render
everywhere. Every printed string comes from catalogue.py.
"""

from __future__ import annotations

import io
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from html import escape
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from reportlab.graphics.shapes import Drawing, Line, Polygon, PolyLine, Rect, String
from reportlab.lib import colors
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import ParagraphStyle
from reportlab.lib.units import mm
from reportlab.lib.utils import ImageReader, TimeStamp
from reportlab.pdfbase import pdfmetrics
from reportlab.pdfbase.ttfonts import TTFont
from reportlab.pdfgen.canvas import Canvas
from reportlab.platypus import (
    CondPageBreak,
    Image,
    KeepTogether,
    PageBreak,
    Paragraph,
    SimpleDocTemplate,
    Spacer,
    Table,
    TableStyle,
)

from . import data as rd
from . import seal_pdf  # the verification hook (issue 18 item 4): seal_pdf.py
from .catalogue import LANGUAGES, num, t

# Gaps listed per channel; the rest are counted with their total duration. A channel
# whose device cadence is set wrong has a gap between every two readings: thousands.
MAX_GAPS_LISTED = 50
MAX_ZOOMS = 40  # zoom charts per report; the excursion log lists every excursion
FONT_DIRS = (Path("/usr/share/fonts/truetype/dejavu"),)
FONT, FONT_BOLD = "DejaVuSans", "DejaVuSans-Bold"


class FontMissing(RuntimeError):
    pass


def _register_fonts() -> None:
    if FONT in pdfmetrics.getRegisteredFontNames():
        return
    for d in FONT_DIRS:
        if (d / f"{FONT}.ttf").exists():
            pdfmetrics.registerFont(TTFont(FONT, str(d / f"{FONT}.ttf")))
            pdfmetrics.registerFont(TTFont(FONT_BOLD, str(d / f"{FONT_BOLD}.ttf")))
            return
    raise FontMissing(
        "DejaVu Sans not found in /usr/share/fonts/truetype/dejavu: install Debian's "
        "fonts-dejavu-core (reports embed it so °C, ä, š, č render)"
    )


def _styles() -> dict[str, ParagraphStyle]:
    base = ParagraphStyle("body", fontName=FONT, fontSize=9, leading=12)
    return {
        "body": base,
        "small": ParagraphStyle("small", parent=base, fontSize=7.5, leading=9.5),
        "cell": ParagraphStyle("cell", parent=base, fontSize=7, leading=8.5),
        "title": ParagraphStyle("title", parent=base, fontName=FONT_BOLD, fontSize=18, leading=24),
        "h1": ParagraphStyle(
            "h1",
            parent=base,
            fontName=FONT_BOLD,
            fontSize=13,
            leading=17,
            spaceBefore=8,
            spaceAfter=4,
        ),
        "h2": ParagraphStyle(
            "h2", parent=base, fontName=FONT_BOLD, fontSize=10.5, leading=14, spaceBefore=6
        ),
    }


def _fixed_canvas(epoch: float) -> type[Canvas]:
    """A canvas whose document dates are `epoch` (the period's end), not now."""

    class FixedCanvas(Canvas):
        def __init__(self, *a: Any, **kw: Any) -> None:
            kw["invariant"] = 1
            kw["initialFontName"] = FONT  # not Helvetica: every font in the file is embedded
            super().__init__(*a, **kw)
            ts = TimeStamp(invariant=1)
            ts.t = epoch
            ts.lt = time.gmtime(epoch)
            ts.YMDhms = tuple(ts.lt)[:6]
            self._doc._timeStamp = ts

    return FixedCanvas


class _Fmt:
    def __init__(self, lang: str, tz: str) -> None:
        self.lang, self.tz = lang, ZoneInfo(tz)

    def when(self, epoch: float | None) -> str:
        if epoch is None:
            return t(self.lang, "dash")
        return datetime.fromtimestamp(epoch, UTC).astimezone(self.tz).strftime("%Y-%m-%d %H:%M")

    def duration(self, s: float) -> str:
        m = round(s / 60)
        h, m = divmod(m, 60)
        return (
            f"{h} {t(self.lang, 'unit_h')} {m:02d} {t(self.lang, 'unit_min')}"
            if h
            else f"{m} {t(self.lang, 'unit_min')}"
        )

    def limits(self, th: rd.Threshold | None) -> str:
        if th is None or (th.ok_min is None and th.ok_max is None):
            return t(self.lang, "no_limits")
        lo = num(self.lang, th.ok_min) if th.ok_min is not None else "…"
        hi = num(self.lang, th.ok_max) if th.ok_max is not None else "…"
        return f"{lo} … {hi}"


_HEAD = ParagraphStyle("head", fontName=FONT_BOLD, fontSize=7, leading=8.5)


def _table(rows: list[list[Any]], widths: list[float], *, header: bool = True) -> Table:
    if header:  # header cells wrap: German headings are longer than the English
        rows = [
            [Paragraph(escape(h), _HEAD) if isinstance(h, str) else h for h in rows[0]],
            *rows[1:],
        ]
    tb = Table(rows, colWidths=widths, repeatRows=1 if header else 0)
    style = [
        ("FONT", (0, 0), (-1, -1), FONT, 7),
        ("GRID", (0, 0), (-1, -1), 0.25, colors.HexColor("#999999")),
        ("VALIGN", (0, 0), (-1, -1), "TOP"),
        ("TOPPADDING", (0, 0), (-1, -1), 1.5),
        ("BOTTOMPADDING", (0, 0), (-1, -1), 1.5),
    ]
    if header:
        style += [
            ("FONT", (0, 0), (-1, 0), FONT_BOLD, 7),
            ("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#e8e8e8")),
        ]
    tb.setStyle(TableStyle(style))
    return tb


def _band_chart(
    points: list[tuple[float, float, float]],
    t0: float,
    t1: float,
    width_s: float,
    ths: Any,
    unit: str,
    ticks: Sequence[tuple[float, str]],
    size: tuple[float, float],
    shade: tuple[float, float] | None = None,
) -> Drawing:
    """A (bucket start, min, max) band from t0 to t1, limits dashed (each from when it
    applied), labelled x ticks; `shade`: an interval drawn behind (an excursion)."""
    width, height = size
    dr = Drawing(width, height)
    left, bottom, right, top = 28.0, 14.0, width - 4, height - 4
    w, h = right - left, top - bottom
    ths = list(ths)
    ys = [v for _, lo, hi in points for v in (lo, hi)]
    ys += [v for th in ths for v in (th.ok_min, th.ok_max) if v is not None]
    ymin, ymax = (min(ys), max(ys)) if ys else (0.0, 1.0)
    pad = (ymax - ymin) * 0.08 or 1.0
    ymin, ymax = ymin - pad, ymax + pad
    span = (t1 - t0) or 1.0

    def x(tt: float) -> float:
        return left + (min(max(tt, t0), t1) - t0) / span * w

    def y(v: float) -> float:
        return bottom + (v - ymin) / (ymax - ymin) * h

    if shade is not None:
        dr.add(
            Rect(x(shade[0]), bottom, x(shade[1]) - x(shade[0]), h,
                 fillColor=colors.HexColor("#fde0dd"), strokeColor=None)
        )  # fmt: skip
    dr.add(Rect(left, bottom, w, h, fillColor=None, strokeColor=colors.grey, strokeWidth=0.4))
    for tt, label in ticks:
        dr.add(Line(x(tt), bottom, x(tt), bottom - 2, strokeColor=colors.grey, strokeWidth=0.3))
        if label:
            dr.add(String(x(tt) + 1, 3, label, fontName=FONT, fontSize=5.5))
    for frac in (0.0, 0.5, 1.0):
        v = ymin + pad + (ymax - ymin - 2 * pad) * frac
        dr.add(String(2, y(v) - 2, num("en", v).rjust(5), fontName=FONT, fontSize=5.5))
        dr.add(Line(left - 2, y(v), left, y(v), strokeColor=colors.grey, strokeWidth=0.3))
    dr.add(String(left + 3, top - 8, unit, fontName=FONT, fontSize=6))
    # the band, in runs of consecutive buckets: a gap stays empty
    runs: list[list[tuple[float, float, float]]] = []
    for pt in points:
        if runs and pt[0] - runs[-1][-1][0] <= width_s:
            runs[-1].append(pt)
        else:
            runs.append([pt])
    for run in runs:
        end_x = x(run[-1][0] + width_s)
        upper = [(x(b), y(mx)) for b, _, mx in run] + [(end_x, y(run[-1][2]))]
        lower = [(x(b), y(mn)) for b, mn, _ in run] + [(end_x, y(run[-1][1]))]
        pts = [v for p in upper + lower[::-1] for v in p]
        dr.add(
            Polygon(
                pts,
                fillColor=colors.HexColor("#9ecae1"),
                strokeColor=colors.HexColor("#3182bd"),
                strokeWidth=0.3,
            )
        )
    for k, th in enumerate(ths):
        a = t0 if th.since is None else max(th.since, t0)
        nxt = ths[k + 1].since if k + 1 < len(ths) else None
        b = t1 if nxt is None else min(nxt, t1)
        for lim in (th.ok_min, th.ok_max):
            if lim is not None and b > a:
                dr.add(
                    PolyLine(
                        [x(a), y(lim), x(b), y(lim)],
                        strokeColor=colors.red,
                        strokeWidth=0.6,
                        strokeDashArray=[3, 2],
                    )
                )
    return dr


def _chart(c: rd.ChannelReport, d: rd.ReportData, width: float, height: float) -> Drawing:
    """Hourly min/max band over the period, limits dashed, a tick per day."""
    days = c.days
    step = 1 if len(days) <= 10 else 7 if len(days) > 62 else 2
    ticks, tt = [], d.start
    for k, day in enumerate(days):
        ticks.append((tt, day.day.strftime("%d.%m.") if k % step == 0 else ""))
        tt += day.hours * 3600
    return _band_chart(
        c.chart, d.start, d.end, rd.CHART_BUCKET_S, c.channel.thresholds, c.channel.unit,
        ticks, (width, height),
    )  # fmt: skip


def _zoom_chart(x: rd.ExcursionRow, ch: rd.ChannelInput, tz: ZoneInfo, width: float) -> Drawing:
    """One excursion from an hour before to an hour after, the excursion shaded."""
    t0, t1 = x.zoom_from, x.zoom_to
    span = t1 - t0
    step = next((s for s in (900, 1800, 3600, 7200, 21600, 43200, 86400) if span / s <= 8), 172800)
    first = t0 - t0 % step + step
    ticks = [
        (tt, datetime.fromtimestamp(tt, tz).strftime("%d. %H:%M"))
        for tt in range(int(first), int(t1), step)
    ]
    width_s = (x.zoom[1][0] - x.zoom[0][0]) if len(x.zoom) > 1 else float(ch.cadence_s)
    shade = (x.opened, x.closed if x.closed is not None else t1)
    return _band_chart(
        x.zoom, t0, t1, width_s, ch.thresholds, ch.unit, ticks, (width, 30 * mm), shade
    )


def _note_args(lang: str, note: rd.Note) -> dict[str, str]:
    x = note.text
    if note.what == "threshold":
        lo = num(lang, float(x["lo"])) if x["lo"] else "…"
        hi = num(lang, float(x["hi"])) if x["hi"] else "…"
        return {"limits": f"{lo} … {hi}", "who": x["who"] or t(lang, "dash")}
    return dict(x)


LOGO_MAX_BYTES = 256 * 1024  # a logo is a small PNG or JPEG
LOGO_MAX_PX = 2000  # per side
LOGO_BOX = (45 * mm, 18 * mm)  # drawn within this box, keeping its aspect


def check_logo(blob: bytes) -> tuple[int, int]:
    """The logo's size in pixels; ValueError saying why it is refused."""
    if len(blob) > LOGO_MAX_BYTES:
        raise ValueError(f"the logo is {len(blob):,} bytes; at most {LOGO_MAX_BYTES:,}")
    if not (blob.startswith(b"\x89PNG\r\n\x1a\n") or blob.startswith(b"\xff\xd8\xff")):
        raise ValueError("the logo must be a PNG or JPEG file")
    try:
        w, h = ImageReader(io.BytesIO(blob)).getSize()
    except Exception as exc:  # noqa: BLE001 - any decoder error: an unreadable image
        raise ValueError(f"the logo cannot be read as an image: {exc}") from None
    if not (0 < w <= LOGO_MAX_PX and 0 < h <= LOGO_MAX_PX):
        raise ValueError(f"the logo is {w}x{h} pixels; at most {LOGO_MAX_PX} a side")
    return int(w), int(h)


def _logo(blob: bytes) -> Image:
    w, h = check_logo(blob)
    scale = min(LOGO_BOX[0] / w, LOGO_BOX[1] / h)
    img = Image(io.BytesIO(blob), width=w * scale, height=h * scale)
    img.hAlign = "LEFT"
    return img


CONTENT_WIDTH = A4[0] - 32 * mm  # the page less its 16 mm margins


def build(
    lang: str,
    title: str,
    site: str,
    period: str,
    end: float,
    story: list[Any],
    seal: seal_pdf.Seal | None = None,
) -> bytes:
    """The story as an A4 PDF: margins, the footer on every page (with the seal's
    short link, or DRAFT without a seal), the document's dates fixed at `end`
    (reproducible bytes). Every template ends here."""
    buf = io.BytesIO()
    doc = SimpleDocTemplate(
        buf,
        pagesize=A4,
        leftMargin=16 * mm,
        rightMargin=16 * mm,
        topMargin=16 * mm,
        bottomMargin=16 * mm,
        title=title,
        author="OpenSense",
        subject=f"{site} {period}",
        creator="OpenSense",
        invariant=1,
    )

    def footer(canvas: Canvas, _doc: Any) -> None:
        canvas.saveState()
        canvas.setFont(FONT, 7)
        canvas.drawString(
            16 * mm,
            9 * mm,
            t(lang, "footer", site=site, period=period, page=canvas.getPageNumber()),
        )
        canvas.restoreState()
        seal_pdf.page_mark(canvas, seal, lang, FONT, FONT_BOLD)  # verification hook

    doc.build(story, onFirstPage=footer, onLaterPages=footer, canvasmaker=_fixed_canvas(end))
    return buf.getvalue()


def facts(lang: str, inp: Any, hours: float) -> list[list[Any]]:
    """The cover's site, address and period rows (`inp`: any template's input)."""
    cell = _styles()["cell"]
    period = t(
        lang, "period_value", start=inp.period_from.isoformat(), end=inp.period_to.isoformat(),
        hours=num(lang, hours, 0), tz=inp.timezone,
    )  # fmt: skip
    return [
        [t(lang, "site"), Paragraph(escape(inp.site_name), cell)],
        [t(lang, "address"), Paragraph(escape(inp.address or t(lang, "dash")), cell)],
        [t(lang, "period"), period],
    ]


def cover(
    lang: str,
    title: str,
    logo: bytes | None,
    rows: list[list[Any]],
    no_data: str | None,
    seal: seal_pdf.Seal | None = None,
) -> list[Any]:
    """A template's first page: logo, title, the facts table, `no_data` when the
    period holds nothing, the seal (checkpoint, link and QR code; or DRAFT), and the
    signature lines (printed name, role, date, signature) for two people."""
    L, st, full = lang, _styles(), CONTENT_WIDTH
    story: list[Any] = [_logo(logo), Spacer(1, 3 * mm)] if logo is not None else []
    story += [
        Paragraph(escape(title), st["title"]),
        Spacer(1, 6 * mm),
        _table(rows, [35 * mm, full - 35 * mm], header=False),
        Spacer(1, 4 * mm),
    ]
    if no_data is not None:
        story.append(Paragraph(escape(no_data), st["h2"]))
    story += [
        Spacer(1, 6 * mm),
        *seal_pdf.cover(seal, L, st, full),  # verification hook
        Paragraph(escape(t(L, "signatures")), st["h2"]),
        Paragraph(escape(t(L, "sign_intro")), st["body"]),
        Spacer(1, 2 * mm),
    ]
    sig = _table(
        [
            [t(L, "printed_name"), t(L, "role"), t(L, "date"), t(L, "signature")],
            ["", "", "", ""],
            ["", "", "", ""],
        ],
        [full * 0.3, full * 0.22, full * 0.16, full * 0.32],
    )
    sig.setStyle(
        TableStyle(
            [
                ("ROWBACKGROUNDS", (0, 1), (-1, -1), [colors.white]),
                ("TOPPADDING", (0, 1), (-1, -1), 18),
            ]
        )
    )
    return [*story, sig, PageBreak()]


def last_page(seal: seal_pdf.Seal | None, lang: str, site: str, period: str) -> list[Any]:
    """Every template's last page: how to check the report (verification hook)."""
    return [PageBreak(), *seal_pdf.last_page(seal, lang, _styles(), CONTENT_WIDTH, site, period)]


def render_pdf(d: rd.ReportData, language: str = "en", seal: seal_pdf.Seal | None = None) -> bytes:
    """The haccp_monthly PDF of `d`; the same data, language and seal give the same
    bytes. `seal` (reports/verify.py sealed_render): printed on the cover, each
    footer and the last page; without one the PDF is a DRAFT on every page."""
    if language not in LANGUAGES:
        raise ValueError(f"unknown language {language!r}; known: {', '.join(LANGUAGES)}")
    _register_fonts()
    L = language
    st = _styles()
    f = _Fmt(L, d.input.timezone)
    inp = d.input
    period = f"{inp.period_from.isoformat()} – {inp.period_to.isoformat()}"
    full = CONTENT_WIDTH
    story: list[Any] = []
    # --- cover
    n_total = sum(c.n for c in d.channels)
    story += cover(
        L,
        t(L, "title"),
        inp.logo,
        [
            *facts(L, inp, d.hours),
            [t(L, "channels"), str(len(d.channels))],
            [t(L, "readings"), num(L, n_total, 0)],
            [t(L, "excursions"), str(len(d.excursions))],
        ],
        None if d.has_data else t(L, "no_data_period"),
        seal=seal,
    )
    # --- one section per channel: summary, chart, daily table
    for c in d.channels:
        ch = c.channel
        th_now = rd._threshold_at(ch.thresholds, d.start)
        block: list[Any] = [
            Paragraph(escape(t(L, "channel_heading", name=ch.name)), st["h1"]),
            Paragraph(
                escape(
                    t(
                        L,
                        "channel_meta",
                        device=ch.device,
                        unit=ch.unit,
                        cadence=ch.cadence_s,
                        limits=f.limits(th_now),
                    )
                ),
                st["small"],
            ),
        ]
        if c.n == 0:
            block.append(Paragraph(escape(t(L, "no_data_channel")), st["h2"]))
        else:
            block.append(
                Paragraph(
                    escape(
                        t(
                            L,
                            "summary",
                            vmin=num(L, c.vmin),
                            vmean=num(L, c.vmean),
                            vmax=num(L, c.vmax),
                            unit=ch.unit,
                            in_range=num(L, c.hours_in_range),
                            hours=num(L, d.hours, 0),
                            uptime=num(L, c.uptime * 100),
                        )
                    ),
                    st["small"],
                )
            )
            if c.mkt_c is not None:
                block.append(
                    Paragraph(
                        escape(
                            t(
                                L,
                                "mkt",
                                mkt=num(L, c.mkt_c, 2),
                                dh=num(L, inp.mkt_delta_h / 1000, 3),
                                n=num(L, c.n, 0),
                            )
                        ),
                        st["small"],
                    )
                )
            block += [
                Spacer(1, 2 * mm),
                _chart(c, d, full, 42 * mm),
                Paragraph(escape(t(L, "chart_caption")), st["small"]),
            ]
        story.append(KeepTogether(block))
        rows: list[list[Any]] = [
            [
                t(L, "day"),
                t(L, "hours"),
                t(L, "n"),
                t(L, "min"),
                t(L, "mean"),
                t(L, "max"),
                t(L, "in_range"),
                t(L, "notes_col"),
            ]
        ]
        marks: dict[str, list[str]] = {}
        for k, note in enumerate(c.notes, 1):
            on = datetime.fromtimestamp(note.at, UTC).astimezone(f.tz).date().isoformat()
            marks.setdefault(on, []).append(f"[{k}]")
        for day in c.days:
            rows.append(
                [
                    day.day.isoformat(),
                    num(L, day.hours, 0),
                    num(L, day.n, 0),
                    num(L, day.vmin),
                    num(L, day.vmean),
                    num(L, day.vmax),
                    num(L, day.hours_in_range),
                    " ".join(marks.get(day.day.isoformat(), [])),
                ]
            )
        story += [Spacer(1, 2 * mm), _table(rows, [full * 0.13] + [full * 0.124] * 7)]
        for k, note in enumerate(c.notes, 1):
            text = t(L, f"note_{note.what}", when=f.when(note.at), **_note_args(L, note))
            story.append(Paragraph(escape(f"[{k}] {text}"), st["small"]))
        story.append(PageBreak())
    # --- excursion log
    story.append(Paragraph(escape(t(L, "excursion_log")), st["h1"]))
    if not d.excursions:
        story.append(Paragraph(escape(t(L, "no_excursions")), st["body"]))
    else:
        rows = [
            [
                t(L, "channel"),
                t(L, "opened"),
                t(L, "closed"),
                t(L, "duration"),
                t(L, "peak"),
                t(L, "ack"),
            ]
        ]
        for x in d.excursions:
            e = x.excursion
            notes = []
            if e.acknowledged_at is not None:
                notes.append(
                    t(L, "ack_by", who=e.acknowledged_by or "?", when=f.when(e.acknowledged_at))
                )
            else:
                notes.append(t(L, "not_acked"))
            for key, val in (
                ("cause", e.ack_cause),
                ("action", e.ack_action),
                ("product", e.ack_product),
                ("note", e.ack_note),
            ):
                if val:
                    notes.append(f"{t(L, key)}: {val}")
            if e.cleared_by:
                notes.append(
                    t(L, "cleared_by", who=e.cleared_by)
                    + (f": {e.clear_note}" if e.clear_note else "")
                )
            rows.append(
                [
                    Paragraph(escape(x.channel_name), st["cell"]),
                    f.when(x.opened),
                    f.when(x.closed)
                    if x.closed is not None
                    else Paragraph(escape(t(L, "still_open")), st["cell"]),
                    f.duration(x.duration_s),
                    num(L, x.peak),
                    Paragraph("<br/>".join(escape(n) for n in notes), st["cell"]),
                ]
            )
        story.append(
            _table(
                rows,
                [full * 0.13, full * 0.15, full * 0.15, full * 0.1, full * 0.12, full * 0.35],
            )
        )
    # --- a zoom chart per excursion
    by_id = {c.channel.id: c.channel for c in d.channels}
    zooms = [x for x in d.excursions if x.zoom and x.excursion.channel_id in by_id]
    if zooms:
        story += [CondPageBreak(60 * mm), Paragraph(escape(t(L, "zooms")), st["h1"])]
    for x in zooms[:MAX_ZOOMS]:
        caption = t(
            L, "zoom_caption", channel=x.channel_name, opened=f.when(x.opened),
            closed=f.when(x.closed) if x.closed is not None else t(L, "still_open"),
            peak=num(L, x.peak), unit=by_id[x.excursion.channel_id].unit,
        )  # fmt: skip
        story.append(
            KeepTogether(
                [
                    Paragraph(escape(caption), st["small"]),
                    _zoom_chart(x, by_id[x.excursion.channel_id], f.tz, full),
                    Spacer(1, 2 * mm),
                ]
            )
        )
    if len(zooms) > MAX_ZOOMS:
        story.append(Paragraph(escape(t(L, "more_zooms", n=len(zooms) - MAX_ZOOMS)), st["body"]))
    # --- sensor health and gaps
    story += [
        CondPageBreak(40 * mm),
        Paragraph(escape(t(L, "health")), st["h1"]),
        Paragraph(escape(t(L, "gap_rule")), st["small"]),
        Spacer(1, 2 * mm),
    ]
    if not d.channels:  # a site without channels: nothing to list, say so
        story.append(Paragraph(escape(t(L, "no_data_period")), st["body"]))
    else:
        rows = [[t(L, "channel"), t(L, "uptime"), t(L, "gaps")]]
        for c in d.channels:
            rows.append(
                [
                    Paragraph(escape(c.channel.name), st["cell"]),
                    f"{num(L, c.uptime * 100)} %",
                    str(len(c.gaps)),
                ]
            )
        story.append(_table(rows, [full * 0.5, full * 0.25, full * 0.25]))
    gap_rows: list[list[Any]] = [
        [t(L, "channel"), t(L, "gap_from"), t(L, "gap_to"), t(L, "duration")]
    ]
    for c in d.channels:
        for g in c.gaps[:MAX_GAPS_LISTED]:
            gap_rows.append(
                [
                    Paragraph(escape(c.channel.name), st["cell"]),
                    f.when(g.start),
                    f.when(g.end),
                    f.duration(g.seconds),
                ]
            )
        if len(c.gaps) > MAX_GAPS_LISTED:
            rest = c.gaps[MAX_GAPS_LISTED:]
            gap_rows.append(
                [
                    Paragraph(escape(c.channel.name), st["cell"]),
                    Paragraph(escape(t(L, "more_gaps", n=len(rest))), st["cell"]),
                    "",
                    f.duration(sum(g.seconds for g in rest)),
                ]
            )
    story += [Spacer(1, 3 * mm), Paragraph(escape(t(L, "gaps")), st["h2"])]
    if len(gap_rows) == 1:
        story.append(Paragraph(escape(t(L, "no_gaps")), st["body"]))
    else:
        story.append(_table(gap_rows, [full * 0.34, full * 0.22, full * 0.22, full * 0.22]))
    # --- threshold changes
    story += [CondPageBreak(30 * mm), Paragraph(escape(t(L, "thresholds")), st["h1"])]
    if not d.threshold_changes:
        story.append(Paragraph(escape(t(L, "no_threshold_changes")), st["body"]))
    else:
        rows = [[t(L, "channel"), t(L, "at"), t(L, "new_limits"), t(L, "by")]]
        for tc in d.threshold_changes:
            rows.append(
                [
                    Paragraph(escape(tc.channel_name), st["cell"]),
                    f.when(tc.at),
                    f.limits(rd.Threshold(tc.at, tc.ok_min, tc.ok_max)),
                    Paragraph(escape(tc.who or t(L, "dash")), st["cell"]),
                ]
            )
        story.append(_table(rows, [full * 0.3, full * 0.2, full * 0.2, full * 0.3]))
    # --- calibration record
    story += [
        CondPageBreak(30 * mm),
        Paragraph(escape(t(L, "calibration")), st["h1"]),
        Paragraph(escape(t(L, "calibration_intro")), st["small"]),
        Spacer(1, 2 * mm),
    ]
    cal: list[list[Any]] = [[t(L, "channel"), t(L, "since"), t(L, "offset"), t(L, "in_force")]]
    for c in d.channels:
        offs = c.channel.offsets
        current = max((k for k, o in enumerate(offs) if o.since < d.start), default=None)
        for k, o in enumerate(offs):
            if k < (current or 0):
                continue  # before the one in force at the period's start
            cal.append(
                [
                    Paragraph(escape(c.channel.name), st["cell"]),
                    f.when(o.since),
                    f"{o.offset:+.2f} {c.channel.unit}",
                    t(L, "at_start") if k == current else t(L, "changed_in_period"),
                ]
            )
    if len(cal) == 1:
        story.append(Paragraph(escape(t(L, "no_calibration")), st["body"]))
    else:
        story.append(_table(cal, [full * 0.34, full * 0.22, full * 0.16, full * 0.28]))
    story += last_page(seal, L, inp.site_name, period)
    return build(L, t(L, "title"), inp.site_name, period, d.end, story, seal)
