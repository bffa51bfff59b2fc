"""What a sealed report prints (issue 18 item 4), for reports/render.py's hook.

A sealed report carries, on its cover and on its last page, the signed checkpoint
of the account's audit trail taken when it was rendered (origin, tree size, root
hash), the rendering time, and a short link with its QR code to the public
verification page (reports/verify_routes.py); each page's footer names the link.
A report rendered without a seal is a draft: "DRAFT" across every page and in each
footer, and its last page says it cannot be verified.

Pure: a `Seal` in, ReportLab flowables and canvas drawing out. The seal is made by
reports/verify.py `sealed_render`, which also hashes the bytes and records them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from html import escape
from typing import Any

from reportlab.graphics.barcode.qr import QrCodeWidget
from reportlab.graphics.shapes import Drawing
from reportlab.lib import colors
from reportlab.lib.styles import ParagraphStyle
from reportlab.lib.units import mm
from reportlab.pdfgen.canvas import Canvas
from reportlab.platypus import KeepTogether, Paragraph, Spacer, Table, TableStyle

from .catalogue import t

QR_LEVEL = "M"  # 15 % of the symbol may be damaged (a creased or stained print)


@dataclass(frozen=True)
class Seal:
    """What a sealed report prints, and what re-renders it to the same bytes."""

    code: str  # the short link's part: <public url>/verify/<code>
    link: str
    rendered_at: datetime  # UTC
    checkpoint: str  # the signed note of the account's audit trail at rendering
    sha256: str = ""  # the PDF's, known only after rendering (sealed_render sets it)

    def _body(self) -> list[str]:
        return self.checkpoint.split("\n")

    @property
    def origin(self) -> str:
        return self._body()[0]

    @property
    def tree_size(self) -> int:
        return int(self._body()[1])

    @property
    def root_hash(self) -> str:
        """Base64, as the checkpoint writes it."""
        return self._body()[2]

    def when(self) -> str:
        return self.rendered_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def qr(value: str, size: float) -> Drawing:
    """The QR code of `value` as a vector drawing `size` points square."""
    w = QrCodeWidget(value, barLevel=QR_LEVEL)
    x0, y0, x1, y1 = w.getBounds()
    d = Drawing(size, size, transform=[size / (x1 - x0), 0, 0, size / (y1 - y0), 0, 0])
    d.add(w)
    return d


def _facts(seal: Seal, lang: str, cell: ParagraphStyle, width: float) -> Table:
    rows = [
        [t(lang, "seal_rendered"), seal.when()],
        [t(lang, "seal_origin"), Paragraph(escape(seal.origin), cell)],
        [t(lang, "seal_size"), str(seal.tree_size)],
        [t(lang, "seal_root"), Paragraph(escape(seal.root_hash), cell)],
        [t(lang, "seal_link"), Paragraph(escape(seal.link), cell)],
    ]
    tb = Table(rows, colWidths=[width * 0.3, width * 0.7])
    tb.setStyle(
        TableStyle(
            [
                ("FONT", (0, 0), (-1, -1), cell.fontName, 7),
                ("VALIGN", (0, 0), (-1, -1), "TOP"),
                ("TOPPADDING", (0, 0), (-1, -1), 1),
                ("BOTTOMPADDING", (0, 0), (-1, -1), 1),
            ]
        )
    )
    return tb


def cover(
    seal: Seal | None, lang: str, styles: dict[str, ParagraphStyle], width: float
) -> list[Any]:
    """The cover's verification block: the seal's facts beside its QR code, or for a
    draft one line saying it is not sealed."""
    if seal is None:
        return [Paragraph(escape(t(lang, "draft_cover")), styles["h2"]), Spacer(1, 4 * mm)]
    side = 30 * mm
    block = Table(
        [[_facts(seal, lang, styles["cell"], width - side - 6 * mm), qr(seal.link, side)]],
        colWidths=[width - side - 4 * mm, side + 4 * mm],
    )
    block.setStyle(
        TableStyle(
            [
                ("VALIGN", (0, 0), (-1, -1), "TOP"),
                ("BOX", (0, 0), (-1, -1), 0.4, colors.HexColor("#999999")),
            ]
        )
    )
    return [
        KeepTogether(
            [
                Paragraph(escape(t(lang, "seal_heading")), styles["h2"]),
                Paragraph(escape(t(lang, "seal_intro")), styles["small"]),
                Spacer(1, 1.5 * mm),
                block,
            ]
        ),
        Spacer(1, 4 * mm),
    ]


def page_mark(canvas: Canvas, seal: Seal | None, lang: str, font: str, bold: str) -> None:
    """On every page, in the footer's line: the verification link, or DRAFT across
    the page and in the footer."""
    width, _height = canvas._pagesize
    canvas.saveState()
    if seal is None:
        canvas.setFont(bold, 7)
        canvas.drawRightString(width - 16 * mm, 9 * mm, t(lang, "draft_footer"))
        canvas.setFillColor(colors.Color(0.85, 0.85, 0.85))
        canvas.setFont(bold, 110)
        canvas.translate(width / 2, _height / 2)
        canvas.rotate(45)
        canvas.drawCentredString(0, -35, t(lang, "draft_mark"))
    else:
        canvas.setFont(font, 7)
        canvas.drawRightString(width - 16 * mm, 9 * mm, t(lang, "seal_footer", link=seal.link))
    canvas.restoreState()


def last_page(
    seal: Seal | None,
    lang: str,
    styles: dict[str, ParagraphStyle],
    width: float,
    site: str,
    period: str,
) -> list[Any]:
    """The last page, "How to check this report", in plain words: how (the link or
    QR code, or SHA-256 of the file entered there), what a match proves, and what it
    does not. A draft's says it cannot be verified."""
    out: list[Any] = [Paragraph(escape(t(lang, "verify")), styles["h1"])]
    if seal is None:
        return out + [
            Paragraph(escape(t(lang, "verify_body")), styles["body"]),
            Spacer(1, 3 * mm),
            Paragraph(escape(t(lang, "verify_originals")), styles["body"]),
        ]
    body = styles["body"]
    out += [
        Paragraph(escape(t(lang, "verify_sealed")), body),
        Spacer(1, 3 * mm),
        Paragraph(escape(t(lang, "verify_how")), styles["h2"]),
        Paragraph(escape(t(lang, "verify_step_link", link=seal.link)), body),
        Spacer(1, 1.5 * mm),
        Paragraph(escape(t(lang, "verify_step_hash")), body),
        Spacer(1, 1.5 * mm),
        qr(seal.link, 40 * mm),
        Paragraph(escape(t(lang, "verify_proves_heading")), styles["h2"]),
        Paragraph(
            escape(t(lang, "verify_proves", site=site, period=period, when=seal.when())), body
        ),
        Paragraph(escape(t(lang, "verify_not_heading")), styles["h2"]),
        Paragraph(escape(t(lang, "verify_not")), body),
        Spacer(1, 3 * mm),
        Paragraph(escape(t(lang, "verify_originals")), body),
        Paragraph(escape(t(lang, "verify_checkpoint")), styles["h2"]),
        Paragraph(escape(t(lang, "verify_checkpoint_body")), styles["small"]),
        Spacer(1, 1.5 * mm),
        _facts(seal, lang, styles["cell"], width),
        Spacer(1, 1.5 * mm),
        Paragraph(
            "<br/>".join(escape(line) for line in seal.checkpoint.rstrip("\n").split("\n")),
            styles["cell"],
        ),
    ]
    return out
