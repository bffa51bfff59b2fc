"""The report templates besides haccp_monthly (issue 18 item 3): haccp_annual from
1-hour rollups and server_room_uptime, each rendered from a fixture and read back
through the PDF's text, every number recomputed here by a loop of the test's own.
The templates' declaration (reports/templates.py TEMPLATES) is checked against the
docs and the CLI."""

from __future__ import annotations

import io
import math
import re
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from pypdf import PdfReader

from opensense.reports import annual, uptime
from opensense.reports import data as rd
from opensense.reports.templates import TEMPLATES, Template

from .test_reports import ARTIFACTS, _png, channel, epoch, report_input, series

BERLIN = ZoneInfo("Europe/Berlin")
ROOT = Path(__file__).resolve().parents[1]


def pdf_text(pdf: bytes) -> str:
    return "\n".join(p.extract_text() for p in PdfReader(io.BytesIO(pdf)).pages)


def save(pdf: bytes, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.pdf"
    path.write_bytes(pdf)
    _png(path, name)


@pytest.mark.db
def test_templates_are_declared_and_a_throwaway_one_is_caught_undocumented(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, new_database: Any
) -> None:
    from opensense import cli

    from .test_docs import undocumented_report_templates

    assert list(TEMPLATES) == ["haccp_monthly", "haccp_annual", "server_room_uptime"]
    assert undocumented_report_templates() == []
    for name, tpl in TEMPLATES.items():
        assert tpl.name == name and tpl.max_days >= 28
    # a template put into the table alone: the docs check names it, the CLI offers it
    rendered: list[Any] = []

    async def load(_conn: Any, site: str, first: date, last: date, **kw: Any) -> Any:
        return (site, first, last, kw)

    def render(inp: Any, language: str) -> bytes:
        rendered.append((inp, language))
        return b"%PDF-throwaway"

    monkeypatch.setitem(TEMPLATES, "throwaway", Template("throwaway", "", load, render, 31))
    assert undocumented_report_templates() == ["throwaway"]
    monkeypatch.setenv("OPENSENSE_DATABASE_URL", new_database())
    out = tmp_path / "t.pdf"
    argv = ["report", "render", "--site", "site_x", "--month", "2026-02", "--out", str(out)]
    assert cli.main([*argv, "--template", "throwaway", "--language", "de", "--draft"]) == 0
    assert out.read_bytes() == b"%PDF-throwaway"
    assert rendered == [
        (("site_x", date(2026, 2, 1), date(2026, 2, 28), {"account_id": None}), "de")
    ]
    with pytest.raises(SystemExit) as refused:  # argparse: not one of the choices
        cli.main([*argv, "--template", "nope"])
    assert refused.value.code == 2


# --- haccp_annual -----------------------------------------------------------------------


def _hourly_year() -> tuple[annual.AnnualInput, dict[str, Any]]:
    """2026 in Europe/Berlin as 1-hour rollups: 12 readings an hour, a daily cycle, a
    warm afternoon in July, three silent days in February, the upper limit lowered on
    1 June, an excursion in July and one across the end of August."""
    start, end = epoch(2026, 1, 1), epoch(2027, 1, 1)
    ts, vmin, vmax, vsum, n = [], [], [], [], []
    warm = (epoch(2026, 7, 14, 13), epoch(2026, 7, 14, 16))
    silent = (epoch(2026, 2, 10), epoch(2026, 2, 13))
    t = start
    while t < end:
        if not silent[0] <= t < silent[1]:
            k = int(t // 3600) % 24
            lo = 2.0 + k / 10
            hi = lo + (5.0 if warm[0] <= t < warm[1] else 0.6)
            ts.append(t)
            vmin.append(lo)
            vmax.append(hi)
            vsum.append((lo + hi) / 2 * 12)
            n.append(12)
        t += 3600
    change = epoch(2026, 6, 1)
    ths = (rd.Threshold(None, 0.0, 5.0), rd.Threshold(change, 0.0, 4.0, who="cli:chef"))
    ch = annual.HourlyChannel(
        "chn_a", "node1 · Kühlraum", "node1", "°C", ts, vmin, vmax, vsum, n, ths
    )
    exs = [
        rd.Excursion("evt_1", "chn_a", "range", "alarm", warm[0], warm[0] + 900, warm[1], 7.3),
        rd.Excursion(
            "evt_2",
            "chn_a",
            "range",
            "alarm",
            epoch(2026, 8, 31, 22),
            epoch(2026, 8, 31, 22, 15),
            epoch(2026, 9, 1, 2),
            4.4,
        ),  # fmt: skip
    ]
    inp = annual.AnnualInput("site_x", "Café Ä", "Hauptstraße 1", "Europe/Berlin",
                             date(2026, 1, 1), date(2026, 12, 31), [ch], exs)  # fmt: skip
    return inp, {"ts": ts, "vmin": vmin, "vmax": vmax, "vsum": vsum, "n": n, "ths": ths, "exs": exs}


def _fmt(v: float, digits: int = 1) -> str:
    return f"{v:,.{digits}f}"


def test_haccp_annual_months_recomputed_from_the_hourly_rollups() -> None:
    inp, raw = _hourly_year()
    d = annual.compute_annual(inp)
    pdf = annual.render_annual(d)
    assert pdf == annual.render_annual(annual.compute_annual(inp))  # reproducible
    text = pdf_text(pdf)
    save(pdf, "haccp_annual_en")
    assert "HACCP annual temperature report" in text and "8,760 h, time zone Europe/Berlin" in text
    lengths = {}
    for m in range(1, 13):
        a = datetime(2026, m, 1, tzinfo=BERLIN).timestamp()
        b = datetime(2026 + m // 12, m % 12 + 1, 1, tzinfo=BERLIN).timestamp()
        idx = [i for i, t in enumerate(raw["ts"]) if a <= t < b]
        count = sum(raw["n"][i] for i in idx)
        mean = math.fsum(raw["vsum"][i] for i in idx) / count  # exact: 3.45 sits on a rounding edge
        ok = 0
        for i in idx:  # the limit in force at the hour's start
            hi = 5.0 if raw["ts"][i] < epoch(2026, 6, 1) else 4.0
            ok += 0.0 <= raw["vmin"][i] <= hi and 0.0 <= raw["vmax"][i] <= hi
        exs, dur = 0, 0.0
        for e in raw["exs"]:
            inside = min(e.cleared_at, b) - max(e.started_at, a)
            if inside > 0:
                exs, dur = exs + 1, dur + inside
        hours = (b - a) / 3600
        lengths[m] = hours
        row = (
            f"2026-{m:02d}\n{hours:,.0f}\n{count:,}\n{_fmt(min(raw['vmin'][i] for i in idx))}\n"
            f"{_fmt(mean)}\n{_fmt(max(raw['vmax'][i] for i in idx))}\n{len(idx):,}\n{ok:,}\n"
            f"{exs}\n{_fmt(dur / 3600)} h"
        )
        assert row in text, row
    # a DST month has its real length; February lost its three silent days
    assert lengths[3] == 743 and lengths[10] == 745 and lengths[1] == 744
    assert d.channels[0].months[1].hours_with_data == 28 * 24 - 72
    # the excursion across the end of August counts in both months, 2 h in each
    aug, sep = d.channels[0].months[7], d.channels[0].months[8]
    assert (aug.excursions, aug.excursion_s, sep.excursions, sep.excursion_s) == (1, 7200, 1, 7200)
    total = d.channels[0].total
    assert total.excursions == 2 and total.n == sum(raw["n"]) and total.hours == 8760
    assert re.search(r"Total\n8,760\n" + f"{sum(raw['n']):,}", text)
    # German
    de = pdf_text(annual.render_annual(d, "de"))
    assert "HACCP-Jahresbericht Temperatur" in de and "Gesamt" in de


def test_haccp_annual_without_data_says_so() -> None:
    inp, _ = _hourly_year()
    empty = annual.AnnualInput(**{**inp.__dict__, "channels": [], "excursions": []})
    text = pdf_text(annual.render_annual(annual.compute_annual(empty)))
    assert "No readings were recorded at this site in this period." in text


# --- server_room_uptime -----------------------------------------------------------------


def _server_room() -> tuple[rd.ReportInput, dict[str, Any]]:
    """Three days, two racks: rack-a's intake runs hot for two hours and its probe is
    silent for three; rack-b is offline for six hours (a device_offline event)."""
    start, end = epoch(2026, 11, 1), epoch(2026, 11, 4)
    hot = (epoch(2026, 11, 1, 14), epoch(2026, 11, 1, 16))
    quiet = (epoch(2026, 11, 2, 3), epoch(2026, 11, 2, 6))
    off = (epoch(2026, 11, 3, 8), epoch(2026, 11, 3, 14))
    a_ts, a_v = series(start, end, 60, lambda k, t: 29.5 if hot[0] <= t < hot[1] else 22 + k % 5,
                       skip=lambda t: quiet[0] <= t < quiet[1])  # fmt: skip
    h_ts, h_v = series(start, end, 60, lambda k, t: 45.0)
    b_ts, b_v = series(start, end, 60, lambda k, t: 17.0 if k % 100 == 0 else 21.0,
                       skip=lambda t: off[0] <= t < off[1])  # fmt: skip
    chans = [
        channel(a_ts, a_v, ok=(18.0, 27.0), id="chn_at", name="rack-a · intake", device="rack-a"),
        channel(
            h_ts,
            h_v,
            ok=(20.0, 80.0),
            id="chn_ah",
            name="rack-a · humidity",
            device="rack-a",
            unit="%",
            kind="humidity",
        ),  # fmt: skip
        channel(b_ts, b_v, ok=(18.0, 27.0), id="chn_bt", name="rack-b · intake", device="rack-b"),
    ]
    ex = rd.Excursion("evt_off", "chn_bt", "device_offline", "alarm", off[0] - 60,
                      off[0] + 60, off[1], None)  # fmt: skip
    inp = report_input(chans, date(2026, 11, 1), date(2026, 11, 3), excursions=[ex])
    return inp, {"start": start, "end": end, "chans": chans, "off": (off[0] - 60, off[1])}


def _cover(ts: list[float], vs: list[float], end: float, keep: Any) -> float:
    """Seconds covered by readings for which keep(v) (each until the next, at most 120 s)."""
    total = 0.0
    for i, (t, v) in enumerate(zip(ts, vs, strict=True)):
        nxt = ts[i + 1] if i + 1 < len(ts) else end
        if keep(v):
            total += min(nxt - t, 120, end - t)
    return total


def test_server_room_uptime_recomputed() -> None:
    inp, raw = _server_room()
    d = rd.compute(inp)
    pdf = uptime.render_uptime(d)
    text = pdf_text(pdf)
    save(pdf, "server_room_uptime_en")
    start, end = raw["start"], raw["end"]
    span = end - start
    cov = {
        c.id: _cover(list(c.ts), list(c.values), end, lambda v: True) / span for c in raw["chans"]
    }
    avail = {"rack-a": max(cov["chn_at"], cov["chn_ah"]), "rack-b": cov["chn_bt"]}
    site = (avail["rack-a"] + avail["rack-b"]) / 2
    assert f"Availability\n{site * 100:.2f} %" in text
    assert f"rack-a\n2\n{avail['rack-a'] * 100:.2f} %\n0\n0 min" in text
    outage = raw["off"][1] - raw["off"][0]
    assert (
        f"rack-b\n1\n{avail['rack-b'] * 100:.2f} %\n1\n{int(outage // 3600)} h {int(outage % 3600 // 60):02d} min"
        in text
    )
    for c in raw["chans"]:
        lo, hi = c.thresholds[0].ok_min, c.thresholds[0].ok_max
        above = _cover(list(c.ts), list(c.values), end, lambda v, hi=hi: v > hi) / 3600
        below = _cover(list(c.ts), list(c.values), end, lambda v, lo=lo: v < lo) / 3600
        gaps = [
            (c.ts[i + 1] - c.ts[i]) for i in range(len(c.ts) - 1) if c.ts[i + 1] - c.ts[i] > 120
        ]
        longest = max(gaps, default=0.0)
        row = (
            f"{c.name}\n{cov[c.id] * 100:.2f} %\n{len(gaps)}\n"
            + (
                f"{int(longest // 3600)} h {int(longest % 3600 // 60):02d} min"
                if longest >= 3600
                else f"{round(longest / 60)} min"
            )
            + f"\n{above:.2f}\n{below:.2f}\n{max(c.values):.1f} {c.unit}"
        )
        assert row in text, row
    # the hot spell: two hours above 27 °C (the last hot reading stands for 60 s)
    assert d.channels[0].hours_above == 2.0
    assert math.isclose(
        d.channels[2].hours_below, sum(1 for v in raw["chans"][2].values if v < 18) * 60 / 3600
    )
    de = pdf_text(uptime.render_uptime(d, "de"))
    assert (
        "Verfügbarkeitsbericht Serverraum" in de and f"{site * 100:.2f} %".replace(".", ",") in de
    )


def test_templates_render_through_the_declaration() -> None:
    inp, _ = _server_room()
    for name in ("haccp_monthly", "server_room_uptime"):
        pdf = TEMPLATES[name].render(inp, "en")
        assert pdf.startswith(b"%PDF") and pdf == TEMPLATES[name].render(inp, "en")
    year, _ = _hourly_year()
    assert TEMPLATES["haccp_annual"].render(year, "de").startswith(b"%PDF")
    assert (date(2026, 12, 31) - date(2026, 1, 1)).days + 1 <= TEMPLATES["haccp_annual"].max_days
    assert timedelta(days=TEMPLATES["haccp_monthly"].max_days) == timedelta(days=31)


# --- haccp_monthly: MKT, DST, logo --------------------------------------------------------


def _png_bytes(w: int, h: int) -> bytes:
    """A w x h grey PNG, written with the standard library."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    raw = b"".join(b"\x00" + b"\x80" * w for _ in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def test_dst_month_mkt_with_its_inputs_and_a_logo_on_the_cover() -> None:
    from decimal import Decimal, getcontext

    from opensense.reports.render import LOGO_MAX_PX, check_logo, render_pdf

    # October 2026 in Europe/Berlin (745 h), a reading every 30 min, 2..8 °C
    start, end = rd.period_bounds(date(2026, 10, 1), date(2026, 10, 31), "Europe/Berlin")
    ts, vals = series(start, end, 1800, lambda k, t: 2 + (k % 13) / 2)
    logo = _png_bytes(120, 40)
    inp = report_input([channel(ts, vals, cadence_s=1800)], date(2026, 10, 1), date(2026, 10, 31),
                       logo=logo, mkt_delta_h=83_144.0)  # fmt: skip
    d = rd.compute(inp)
    pdf = render_pdf(d)
    text = pdf_text(pdf)
    assert "745 h, time zone Europe/Berlin" in text and f"Readings\n{745 * 2:,}\n" in text
    assert "2026-10-25\n25\n50\n" in text  # the DST day: 25 hours, 50 readings
    # MKT with its inputs and formula, the figure recomputed with Decimal
    getcontext().prec = 40
    k = Decimal(83144) / Decimal("8.314")
    mean = sum((-k / (Decimal(v) + Decimal("273.15"))).exp() for v in vals) / len(vals)
    mkt = float(k / -mean.ln() - Decimal("273.15"))
    flat = " ".join(text.split())
    assert (
        f"Mean kinetic temperature {mkt:.2f} °C (ΔH = 83.144 kJ/mol, R = 8.314 J/mol/K, "
        f"n = {len(vals):,} readings; T_k = (ΔH/R) / −ln(Σ exp(−ΔH/(R·T_i)) / n))"
    ) in flat
    # the logo is drawn on the first page only, as an image
    first = PdfReader(io.BytesIO(pdf)).pages[0]
    images = [o for o in first["/Resources"].get("/XObject", {}).values()
              if o.get_object()["/Subtype"] == "/Image"]  # fmt: skip
    assert len(images) == 1
    assert pdf == render_pdf(rd.compute(inp))  # the same logo, the same bytes
    save(pdf, "haccp_monthly_dst_logo")
    # a logo out of bounds, or not an image, is refused with the reason
    for bad, why in ((_png_bytes(LOGO_MAX_PX + 1, 2), "pixels"), (b"GIF89a....", "PNG or JPEG"),
                     (b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "cannot be read"),
                     (logo + b"\x00" * 300_000, "bytes")):  # fmt: skip
        try:
            check_logo(bad)
        except ValueError as exc:
            assert why in str(exc), exc
        else:
            raise AssertionError(f"accepted {bad[:12]!r}")


def test_cli_refuses_a_bad_period_logo_or_delta_h_before_reading_anything(tmp_path: Path) -> None:
    from opensense import cli

    def run(*args: str) -> int:
        return cli.main(
            ["report", "render", "--site", "site_x", "--out", str(tmp_path / "x.pdf"), *args]
        )

    assert run("--template", "haccp_monthly", "--from", "2026-01", "--to", "2026-03") == 2
    assert run("--template", "haccp_annual", "--from", "2025-01", "--to", "2026-03") == 2
    assert run("--template", "haccp_annual", "--from", "2026-03", "--to", "2026-01") == 2
    assert run("--month", "2026-11", "--mkt-delta-h", "5") == 2
    assert run("--template", "haccp_annual", "--month", "2026-11", "--mkt-delta-h", "100") == 2
    (tmp_path / "logo.gif").write_bytes(b"GIF89a")
    assert run("--month", "2026-11", "--logo", str(tmp_path / "logo.gif")) == 2
    assert run("--month", "2026-11", "--logo", str(tmp_path / "missing.png")) == 2
    assert not (tmp_path / "x.pdf").exists()
