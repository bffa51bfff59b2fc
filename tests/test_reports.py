"""Compliance reports (issue 18 part one): the pure report data, the haccp_monthly
PDF, and a month loaded from PostgreSQL and rendered by the CLI.

Every number asserted is recomputed here from the inputs, by a plain loop of the
test's own, never by calling the code under test a second time."""

from __future__ import annotations

import asyncio
import io
import os
import re
import shutil
import statistics
import subprocess
from datetime import UTC, date, datetime
from decimal import Decimal, getcontext
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
import pytest
from pypdf import PdfReader

from opensense.reports import catalogue
from opensense.reports import data as rd
from opensense.reports.render import render_pdf

from .fixtures.server import make_world

BERLIN = ZoneInfo("Europe/Berlin")
ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("OPENSENSE_ARTIFACTS", ROOT / "tests" / ".artifacts")) / "reports"


def epoch(y: int, mo: int, d: int, h: int = 0, mi: int = 0, tz: ZoneInfo = BERLIN) -> float:
    return datetime(y, mo, d, h, mi, tzinfo=tz).timestamp()


def series(
    start: float, end: float, step: float, value: Any, skip: Any = None
) -> tuple[list[float], list[float]]:
    ts, vals = [], []
    t = start
    k = 0
    while t < end:
        if not (skip and skip(t)):
            ts.append(t)
            vals.append(float(value(k, t)))
        t += step
        k += 1
    return ts, vals


def channel(ts: list[float], vals: list[float], ok=(0.0, 5.0), **kw: Any) -> rd.ChannelInput:
    base: dict[str, Any] = dict(
        id="chn_a", name="Kühlraum š č", device="node1", unit="°C", cadence_s=60,
        thresholds=(rd.Threshold(None, *ok),),
    )  # fmt: skip
    base.update(kw)
    return rd.ChannelInput(ts=ts, values=vals, **base)


def report_input(
    chans: list[rd.ChannelInput], p_from: date, p_to: date, **kw: Any
) -> rd.ReportInput:
    return rd.ReportInput(
        "site_x", "Café Ä", "Hauptstraße 1, Berlin", "Europe/Berlin", p_from, p_to, chans, **kw
    )


# --- pure data ----------------------------------------------------------------------


def test_daily_stats_and_hours_in_range_recomputed() -> None:
    start, end = epoch(2026, 11, 1), epoch(2026, 11, 3)
    # a reading a minute, a 10-minute silence on day 1, values 3.0..6.9 cycling
    ts, vals = series(start, end, 60, lambda k, t: 3 + (k % 40) / 10,
                      skip=lambda t: epoch(2026, 11, 1, 10) <= t < epoch(2026, 11, 1, 10, 10))  # fmt: skip
    d = rd.compute(report_input([channel(ts, vals)], date(2026, 11, 1), date(2026, 11, 2)))
    c = d.channels[0]
    assert [x.day for x in c.days] == [date(2026, 11, 1), date(2026, 11, 2)]
    for day in c.days:
        lo = datetime.combine(day.day, datetime.min.time(), BERLIN).timestamp()
        hi = lo + 86400
        mine = [(t, v) for t, v in zip(ts, vals, strict=True) if lo <= t < hi]
        assert day.n == len(mine)
        assert day.vmin == min(v for _, v in mine) and day.vmax == max(v for _, v in mine)
        assert day.vmean == pytest.approx(statistics.fmean(v for _, v in mine))
        # each reading stands until the next one, at most two cadences (120 s)
        in_range = with_data = 0.0
        for t, v in mine:
            nxt = ts[ts.index(t) + 1] if ts.index(t) + 1 < len(ts) else end
            cover = min(nxt - t, 120, end - t)
            with_data += cover
            in_range += cover if 0 <= v <= 5 else 0
        assert day.hours_in_range == pytest.approx(in_range / 3600)
        assert day.hours_with_data == pytest.approx(with_data / 3600)
    # 09:59 to 10:10 is silent (11 min): the 09:59 reading stands for 2 of them
    assert c.days[0].hours_with_data == pytest.approx(24 - 9 / 60)
    assert c.days[1].hours_with_data == pytest.approx(24)


def test_dst_month_has_its_real_length() -> None:
    # Europe/Berlin leaves summer time on 2026-10-25: October has 745 hours
    start, end = rd.period_bounds(date(2026, 10, 1), date(2026, 10, 31), "Europe/Berlin")
    assert (end - start) / 3600 == 745
    ts, vals = series(start, end, 60, lambda k, t: 4.0)
    d = rd.compute(report_input([channel(ts, vals)], date(2026, 10, 1), date(2026, 10, 31)))
    c = d.channels[0]
    assert len(c.days) == 31 and d.hours == 745
    dst = c.days[24]
    assert dst.day == date(2026, 10, 25) and dst.hours == 25 and dst.n == 25 * 60
    assert dst.hours_in_range == pytest.approx(25)
    assert all(x.hours == 24 for x in c.days if x.day != date(2026, 10, 25))
    assert c.hours_in_range == pytest.approx(745) and c.uptime == pytest.approx(1)
    # and March: 743 hours
    s, e = rd.period_bounds(date(2026, 3, 1), date(2026, 3, 31), "Europe/Berlin")
    assert (e - s) / 3600 == 743


def test_gaps_longer_than_two_cadences_with_the_period_edges() -> None:
    start, end = epoch(2026, 11, 1), epoch(2026, 11, 2)
    ts = [start + 300, start + 360, start + 480, start + 661, end - 121]
    d = rd.compute(
        report_input([channel(ts, [4.0] * len(ts))], date(2026, 11, 1), date(2026, 11, 1))
    )
    gaps = [(g.start, g.end) for g in d.channels[0].gaps]
    # 300 s from the start: a gap; 120 s exactly: not one; 181 s: a gap; 121 s before the end: a gap
    assert gaps == [
        (start, start + 300),
        (start + 480, start + 661),
        (start + 661, end - 121),
        (end - 121, end),
    ]


def test_mean_kinetic_temperature_worked_example() -> None:
    # Worked example, 20 °C and 30 °C weighted alike, ΔH = 83.144 kJ/mol, R = 8.314:
    # ΔH/R = 10000.481 K; exp(-10000.481/293.15) = 1.5297e-15, exp(-10000.481/303.15) =
    # 4.7255e-15; mean 3.1276e-15; -ln(mean) = 33.3985; 10000.481/33.3985 = 299.41 K = 26.26 °C
    getcontext().prec = 40
    k = Decimal(83144) / Decimal("8.314")
    mean = sum((-k / (Decimal(c) + Decimal("273.15"))).exp() for c in (20, 30)) / 2
    expected = float(k / -mean.ln() - Decimal("273.15"))
    assert expected == pytest.approx(26.26, abs=0.005)
    assert rd.mean_kinetic_temperature([20.0, 30.0]) == pytest.approx(expected, abs=1e-9)
    assert rd.mean_kinetic_temperature([5.0] * 1000) == pytest.approx(5.0)
    # MKT weighs warm readings more than the arithmetic mean does
    assert rd.mean_kinetic_temperature([2.0, 4.0, 6.0, 8.0]) == pytest.approx(5.3021, abs=1e-4)
    assert rd.mean_kinetic_temperature([20.0, 30.0], delta_h=100_000) > expected
    assert rd.mean_kinetic_temperature([]) is None


def test_excursions_peak_duration_and_threshold_changes() -> None:
    start, end = epoch(2026, 11, 1), epoch(2026, 11, 3)
    warm = (epoch(2026, 11, 1, 12), epoch(2026, 11, 1, 12, 40))

    def value(k: int, t: float) -> float:
        return 8.0 + (t - warm[0]) / 600 if warm[0] <= t < warm[1] else 3.0

    ts, vals = series(start, end, 60, value)
    change = epoch(2026, 11, 2, 6)
    ths = (rd.Threshold(None, 0.0, 5.0), rd.Threshold(change, 0.0, 2.5, who="tok_abc"))
    ex1 = rd.Excursion("evt_1", "chn_a", "range", "alarm", warm[0], warm[0] + 900, warm[1], 8.5,
                       acknowledged_at=warm[0] + 1200, acknowledged_by="tok_ops", ack_note="door left open",
                       ack_action="closed the door", cleared_by="system")  # fmt: skip
    ex2 = rd.Excursion("evt_2", "chn_a", "range", "alarm", change, change + 900, None, 3.0)
    ex3 = rd.Excursion(
        "evt_3", "chn_a", "delta", "alarm", warm[0], warm[0] + 60, warm[0] + 600, 1.2
    )
    d = rd.compute(
        report_input(
            [channel(ts, vals, thresholds=ths)],
            date(2026, 11, 1),
            date(2026, 11, 2),
            excursions=[ex2, ex3, ex1],
        )
    )
    r1, r3, r2 = d.excursions
    assert r3.excursion.id == "evt_3" and r3.peak == 1.2  # not a range: the event's own value
    assert r1.excursion.id == "evt_1" and r1.closed == warm[1] and r1.duration_s == 2400
    # peak: the worst reading from its start to its close (not the event's stored 8.5)
    assert r1.peak == pytest.approx(
        max(v for t, v in zip(ts, vals, strict=True) if warm[0] <= t <= warm[1])
    )
    assert r1.peak == pytest.approx(8.0 + 39 * 60 / 600)
    assert r2.closed is None and r2.duration_s == end - change
    assert [(x.at, x.ok_max, x.who) for x in d.threshold_changes] == [(change, 2.5, "tok_abc")]
    # after the change, 3.0 is out of range: day 2 is in range only until 06:00
    assert d.channels[0].days[1].hours_in_range == pytest.approx(6)
    assert d.channels[0].days[0].hours_in_range == pytest.approx(24 - 40 / 60)


# --- the PDF ------------------------------------------------------------------------


def small_month(**kw: Any) -> rd.ReportInput:
    start, end = epoch(2026, 11, 1), epoch(2026, 11, 4)
    ts, vals = series(start, end, 300, lambda k, t: 3 + (k % 12) / 10)
    ex = rd.Excursion("evt_9", "chn_a", "range", "alarm", start + 7200, start + 8100, start + 9000, 7.5,
                      acknowledged_at=start + 8400, acknowledged_by="Jürgen Šimek", ack_note="Tür offen gelassen")  # fmt: skip
    return report_input(
        [channel(ts, vals, cadence_s=300)],
        date(2026, 11, 1),
        date(2026, 11, 3),
        excursions=[ex],
        **kw,
    )


def pdf_text(pdf: bytes) -> str:
    return "\n".join(p.extract_text() for p in PdfReader(io.BytesIO(pdf)).pages)


def test_same_inputs_give_the_same_bytes_and_a_changed_reading_does_not() -> None:
    a = render_pdf(rd.compute(small_month()))
    assert a == render_pdf(rd.compute(small_month()))
    changed = small_month()
    vals = list(changed.channels[0].values)
    vals[100] += 0.1
    other = rd.ReportInput(
        **{
            **changed.__dict__,
            "channels": [rd.ChannelInput(**{**changed.channels[0].__dict__, "values": vals})],
        }
    )
    assert render_pdf(rd.compute(other)) != a
    meta = PdfReader(io.BytesIO(a)).metadata
    assert meta is not None and meta.creation_date is not None
    # the document's date is the period's end (local midnight after 2026-11-03), not now
    assert meta.creation_date.replace(tzinfo=UTC) == datetime(2026, 11, 3, 23, 0, tzinfo=UTC)


def test_fonts_embedded_and_special_characters_render() -> None:
    pdf = render_pdf(rd.compute(small_month()))
    text = pdf_text(pdf)
    for s in ("°C", "Kühlraum š č", "Café Ä", "Hauptstraße", "Jürgen Šimek", "Tür offen gelassen"):
        assert s in text, s
    used = set()
    for page in PdfReader(io.BytesIO(pdf)).pages:
        content = page.get_contents().get_data()  # type: ignore[union-attr]
        # the fonts that show text: a Tf followed by Tj/TJ before the next Tf or ET
        # (ReportLab selects Helvetica at the start of each drawing and sets no glyph)
        showing = {
            m.group(1).decode()
            for m in re.finditer(
                rb"(/[\w+]+) [\d.]+ Tf(.*?)(?=/[\w+]+ [\d.]+ Tf|ET)", content, re.S
            )
            if b"Tj" in m.group(2) or b"TJ" in m.group(2)
        }
        fonts = page["/Resources"]["/Font"]
        for name in showing:
            desc = fonts[name].get_object()
            used.add(str(desc["/BaseFont"]))
            assert "/FontFile2" in desc["/FontDescriptor"].get_object(), desc  # embedded TrueType
    assert used == {"/AAAAAA+DejaVuSans", "/AAAAAA+DejaVuSans-Bold"}


def test_german_render_uses_the_german_catalogue() -> None:
    d = rd.compute(small_month())
    de = pdf_text(render_pdf(d, language="de"))
    en = pdf_text(render_pdf(d, language="en"))
    for key in ("title", "excursion_log", "health", "verify", "signatures", "printed_name"):
        assert catalogue.DE[key] in de and catalogue.DE[key] not in en, key
        assert catalogue.EN[key] in en
    assert "So prüfen Sie diesen Bericht" in de
    c = d.channels[0]
    assert f"Min. {catalogue.num('de', c.vmin)}" in de and "," in catalogue.num("de", c.vmean)


def test_catalogue_languages_have_the_same_keys() -> None:
    assert set(catalogue.DE) == set(catalogue.EN)
    for key, text in catalogue.EN.items():
        assert set(_fields(text)) == set(_fields(catalogue.DE[key])), key


def _fields(text: str) -> list[str]:
    import string

    return [f for _, f, _, _ in string.Formatter().parse(text) if f]


def test_a_channel_with_thousands_of_gaps_lists_the_first_and_counts_the_rest() -> None:
    # a device whose cadence is set to 60 s but that reports every 5 minutes
    inp = small_month()
    ch = rd.ChannelInput(**{**inp.channels[0].__dict__, "cadence_s": 60})
    d = rd.compute(rd.ReportInput(**{**inp.__dict__, "channels": [ch]}))
    gaps = d.channels[0].gaps
    # every silence between readings, and the last reading to the period's end
    assert len(gaps) == len(ch.ts) and gaps[-1].end == d.end
    pdf = render_pdf(d)
    text = pdf_text(pdf)
    assert len(PdfReader(io.BytesIO(pdf)).pages) < 10
    rest = gaps[50:]
    minutes = round(sum(g.seconds for g in rest) / 60)
    assert re.search(
        rf"… and {len(rest)} more gaps\s+{minutes // 60} h {minutes % 60:02d} min", text
    )


def test_an_unsealed_render_is_a_draft_on_every_page_and_cannot_be_verified() -> None:
    # sealed reports: tests/test_report_verify.py
    pages = PdfReader(io.BytesIO(render_pdf(rd.compute(small_month())))).pages
    assert all("DRAFT · not sealed, cannot be verified" in p.extract_text() for p in pages)
    last = " ".join(pages[-1].extract_text().split())
    assert "How to check this report" in last and "cannot be verified yet" in last
    assert "SHA" not in last and "http" not in last


# --- from the database, through the CLI ---------------------------------------------


async def _fixture_month(dsn: str, config: Any) -> dict[str, Any]:
    """Two channels on one site (Europe/Berlin): November 2026 at one reading every
    5 minutes with a warm spell and a gap on one, a threshold change, an acknowledged
    excursion; an empty second site."""
    from psycopg_pool import AsyncConnectionPool

    from opensense.alarms import evaluator
    from opensense.alarms.lifecycle import Change, transition
    from opensense.audit import trail
    from opensense.devices import store as service
    from opensense.storage import write

    w = await make_world(dsn, config, ("fridge01",))
    dev = w.device_ids["fridge01"]
    start, end = epoch(2026, 11, 1), epoch(2026, 12, 1)
    warm = (epoch(2026, 11, 10, 14), epoch(2026, 11, 10, 15, 30))
    gap = (epoch(2026, 11, 20, 3), epoch(2026, 11, 20, 5))
    change = datetime(2026, 11, 15, 9, tzinfo=UTC)
    offset_at = datetime(2026, 11, 5, 9, tzinfo=UTC)
    out: dict[str, Any] = {"site": w.site, "warm": warm, "gap": gap, "start": start, "end": end}
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        async with conn.transaction():
            await conn.execute("UPDATE devices SET cadence_s = 300 WHERE id = %s", (dev,))
            chans = []
            for label in ("a", "b", "c"):
                cur = await conn.execute(
                    "INSERT INTO channels (id, sensor_id, account_id, device_id, kind, label, unit, name)"
                    " VALUES (%s, %s, %s, %s, 'temperature', %s, '°C', %s) RETURNING id, num",
                    (
                        f"chn_t{label}{w.site[-6:]}",
                        f"snr_t{label}{w.site[-6:]}",
                        w.account,
                        dev,
                        label,
                        f"Kühlzelle {label}",
                    ),
                )
                chans.append(await cur.fetchone())
            (ca, na), (cb, nb), _silent = chans  # c: a channel that sent nothing this month
            rule = f"rul_t{w.site[-6:]}"
            await conn.execute(
                "INSERT INTO rules (id, channel_id, kind, params, grace_min, created_at)"
                " VALUES (%s, %s, 'range', '{\"ok_min\": 0, \"ok_max\": 6}', 15, '2026-10-01')",
                (rule, ca),
            )
            await trail.record(conn, account_id=w.account, actor="cli:chef", action="rule.update", subject=rule,
                               data={"channel_id": ca, "params": {"from": {"ok_min": 0, "ok_max": 5}, "to": {"ok_min": 0, "ok_max": 6}}},
                               at=change)  # fmt: skip
            rows = []
            readings: dict[int, list[tuple[float, float]]] = {na: [], nb: []}
            for num, base in ((na, 3.0), (nb, 4.0)):
                t, k = start, 0
                while t < end:
                    if not (num == na and gap[0] < t < gap[1]):
                        v = 9.0 if (num == na and warm[0] <= t < warm[1]) else base + (k % 7) / 10
                        if num == na and t == warm[0] + 1800:
                            v = 10.5
                        rows.append((num, datetime.fromtimestamp(t, UTC), v))
                        readings[num].append((t, v))
                    t += 300
                    k += 1
            await write.insert_readings(
                conn, rows, now=datetime(2026, 12, 2, tzinfo=UTC), compact_after_days=400
            )
            # calibration: one offset from before the month, one set during it
            for at, off in ((datetime(2026, 10, 1, tzinfo=UTC), 0.3), (offset_at, -0.5)):
                await conn.execute(
                    'INSERT INTO channel_offsets (channel_id, "offset", effective_from)'
                    " VALUES (%s, %s, %s)",
                    (ca, off, at),
                )
            empty = await service.create_site(
                conn,
                w.account,
                {"name": "Leer", "vertical": "chilled_storage", "timezone": "Europe/Berlin"},
            )
    # the alarm engine judges the month (the warm spell's 10.5 comes after the alarm
    # opened: the event's worst value must count it, issue 18 item 5); a person
    # acknowledges the event with a note
    now = datetime(2026, 12, 2, tzinfo=UTC)
    async with AsyncConnectionPool(dsn, min_size=1, max_size=2, open=False) as pool:
        while (await evaluator.evaluate_dirty(pool, now, budget_s=60)).channels:
            pass
        async with pool.connection() as conn, conn.transaction():
            cur = await conn.execute("SELECT id, value FROM events WHERE channel_id = %s", (ca,))
            [(event_id, event_value)] = await cur.fetchall()
            await transition(
                conn,
                Change("ack", datetime.fromtimestamp(warm[0] + 1500, UTC), now,
                       account_id=w.account, event_id=event_id, actor="tok_kitchen",
                       note={"note": "Lieferung zu lange offen", "action": "Ware umgelagert"}),
            )  # fmt: skip
    out.update(
        readings={"a": readings[na], "b": readings[nb]},
        empty=empty["id"],
        change=change.timestamp(),
        event_value=event_value,
        offset_at=offset_at.timestamp(),
    )
    return out


def _cli(dsn: str, *args: str) -> int:
    from opensense import cli

    os.environ["OPENSENSE_DATABASE_URL"] = dsn
    try:
        return cli.main(["report", "render", "--draft", *args])
    finally:
        del os.environ["OPENSENSE_DATABASE_URL"]


def _png(pdf: Path, name: str) -> list[Path]:
    """Pages as PNG test artifacts (pdftoppm, Debian poppler-utils) for a person to look at."""
    if shutil.which("pdftoppm") is None:
        return []
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in ARTIFACTS.glob(f"{name}-*.png"):  # a longer render of an earlier run
        old.unlink()
    subprocess.run(["pdftoppm", "-r", "70", "-png", str(pdf), str(ARTIFACTS / name)], check=True)
    return sorted(ARTIFACTS.glob(f"{name}-*.png"))


@pytest.mark.db
async def test_month_from_the_database_rendered_by_the_cli(
    new_database: Any, config: Any, tmp_path: Path
) -> None:
    # a database of its own: a past month of readings in the shared one would be
    # compacted by other tests' compaction runs (test_storage counts what it moves)
    dsn = new_database()
    m = await _fixture_month(dsn, config)
    out = tmp_path / "nov.pdf"
    assert (
        await asyncio.to_thread(
            _cli, dsn, "--site", m["site"], "--month", "2026-11", "--out", str(out)
        )
        == 0
    )
    pages = [p.extract_text() for p in PdfReader(out).pages]
    text = "\n".join(pages)
    n = len(m["readings"]["a"]) + len(m["readings"]["b"])
    assert "720 h, time zone Europe/Berlin" in text and f"Readings\n{n:,}\n" in text
    # every day's row of channel a, recomputed from the fixture's readings
    a = m["readings"]["a"]
    for k in range(30):
        lo = epoch(2026, 11, 1) + k * 86400
        vs = [v for t, v in a if lo <= t < lo + 86400]
        row = f"{date(2026, 11, 1 + k)}\n24\n{len(vs)}\n{min(vs):.1f}\n{statistics.fmean(vs):.1f}\n{max(vs):.1f}\n"
        assert row in text, row
    # the excursion: opened, closed (after the 15-min clear delay), duration, peak from
    # the readings — 10.5, the reading after the alarm opened — and the event's own
    # recorded worst value is the same (issue 18 item 5), its note
    warm = m["warm"]
    when = lambda x: datetime.fromtimestamp(x, BERLIN).strftime("%Y-%m-%d %H:%M")  # noqa: E731
    assert m["event_value"] == 10.5 == max(v for t, v in a if warm[0] <= t <= warm[1] + 900)
    log = next(p for p in pages if "Excursion log" in p)
    assert f"{when(warm[0])}\n{when(warm[1] + 900)}\n1 h 45 min\n10.5\n" in log
    # its zoom chart, captioned with the same peak
    assert f"Kühlzelle a: {when(warm[0])} – {when(warm[1] + 900)}, peak 10.5 °C" in " ".join(
        text.split()
    )
    # the calibration record: the offset in force at the start, the change in the month,
    # and the change as a footnote of its day in the daily table
    assert (
        f"{when(datetime(2026, 10, 1, tzinfo=UTC).timestamp())}\n+0.30 °C\nin force at period start"
        in text
    )
    assert f"{when(m['offset_at'])}\n-0.50 °C\nchanged in period" in text
    assert f"{when(m['offset_at'])}: calibration offset set to -0.50" in text
    assert f"{when(m['change'])}: limits changed to 0.0 … 6.0 by cli:chef" in text
    flat = " ".join(log.split())  # the note column wraps its lines
    assert "Acknowledged by tok_kitchen at " + when(warm[0] + 1500) in flat
    assert "Lieferung zu lange offen" in flat and "Ware umgelagert" in flat
    # the gap, and the threshold change with who made it
    health = next(p for p in pages if "Sensor health" in p)
    gap_from = max(t for t, _ in a if t <= m["gap"][0])
    gap_to = min(t for t, _ in a if t >= m["gap"][1])
    minutes = round((gap_to - gap_from) / 60)
    assert f"{when(gap_from)}\n{when(gap_to)}\n{minutes // 60} h {minutes % 60:02d} min" in health
    assert f"{when(m['change'])}\n0.0 … 6.0\ncli:chef" in text
    # the first half of the month ran at 0..5, so the warm spell (9.0, 10.5) was out of range
    pngs = _png(out, "haccp_monthly_en")
    # German render of the same month
    out_de = tmp_path / "nov_de.pdf"
    assert (
        await asyncio.to_thread(
            _cli,
            dsn,
            "--site",
            m["site"],
            "--month",
            "2026-11",
            "--out",
            str(out_de),
            "--language",
            "de",
        )
        == 0
    )
    de = "\n".join(p.extract_text() for p in PdfReader(out_de).pages)
    _png(out_de, "haccp_monthly_de")
    assert "Abweichungsprotokoll" in de and "Quittiert von tok_kitchen" in de
    # the other templates from the same database: the annual one from the 1-hour
    # rollups (November alone), the server-room one from the readings
    for name in ("haccp_annual", "server_room_uptime"):
        out_t = tmp_path / f"{name}.pdf"
        args = ("--site", m["site"], "--from", "2026-11", "--to", "2026-11", "--template", name)
        assert await asyncio.to_thread(_cli, dsn, *args, "--out", str(out_t)) == 0
        _png(out_t, f"{name}_db")
        t_text = "\n".join(p.extract_text() for p in PdfReader(out_t).pages)
        if name == "haccp_annual":
            vs = [v for _, v in a]
            row = f"2026-11\n720\n{len(vs):,}\n{min(vs):.1f}\n{statistics.fmean(vs):.1f}\n{max(vs):.1f}\n"
            assert row in t_text and "1\n1.8 h" in t_text  # the excursion, 1 h 45 min
        else:
            assert "fridge01\n3\n" in t_text  # one device, three channels
    # the same month again: the same bytes
    again = tmp_path / "again.pdf"
    assert (
        await asyncio.to_thread(
            _cli, dsn, "--site", m["site"], "--month", "2026-11", "--out", str(again)
        )
        == 0
    )
    assert again.read_bytes() == out.read_bytes()
    # a site without data: the report says so instead of failing
    empty = tmp_path / "empty.pdf"
    assert (
        await asyncio.to_thread(
            _cli, dsn, "--site", m["empty"], "--month", "2026-11", "--out", str(empty)
        )
        == 0
    )
    assert (
        "No readings were recorded at this site in this period."
        in PdfReader(empty).pages[0].extract_text()
    )
    _png(empty, "haccp_monthly_empty")
    if shutil.which("pdftoppm"):
        assert pngs and all(p.stat().st_size > 1000 for p in pngs)
    # a channel without readings says so on its page, and is one gap over the month
    silent = next(p for p in pages if "Kühlzelle c" in p and "Device" in p)
    assert "No readings from this channel in this period." in silent
    assert f"{when(m['start'])}\n{when(m['end'])}\n720 h 00 min" in health
    # another account's site is not found (the API will pass the caller's account)
    from opensense.errors import ApiError
    from opensense.reports.load import load_month

    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        with pytest.raises(ApiError) as err:
            await load_month(
                conn, m["site"], date(2026, 11, 1), date(2026, 11, 30), account_id="acc_other"
            )
        assert err.value.code == "site_not_found"
    # an unknown site is an error, not an empty report
    assert (
        await asyncio.to_thread(
            _cli, dsn, "--site", "site_nope", "--month", "2026-11", "--out", str(tmp_path / "x.pdf")
        )
        == 1
    )
