"""OpenSense report benchmark: the monthly document (20 channels x one reading a
minute for a 30-day month: a daily min/mean/max/hours-in-range table and one
overview chart per channel) rendered by each PDF engine candidate.

Each candidate runs in its own fresh process (so peak memory is that engine's
alone): the process builds the month's readings in float arrays, computes the report
data (opensense.reports.data, the same for every engine), then renders. Printed per
candidate: data time, render time, the process's peak RSS (ru_maxrss) before and
after rendering, PDF size, and ratios to the first candidate. Targets (issue 18):
monthly < 5 s and < 300 MB on 2 cores (data + render, whole process).

Candidates:
- reportlab: ReportLab platypus tables and reportlab.graphics drawings, invariant mode;
- weasyprint: the same document as HTML with inline SVG charts;
- haccp_monthly: the product's template (opensense.reports.render, ReportLab).

And the annual template, haccp_annual (opensense.reports.annual): 20 channels x
12 months of 1-hour rollups (8,760 a channel, what reports.annual.load_year reads),
its figures computed and rendered, in a fresh process the same way.

    tools/bench/report                  # the three candidates, full month
    tools/bench/report --quick          # 3 channels, 3 days (a smoke run)
    tools/bench/report --only reportlab
    tools/bench/report --dsn postgresql://postgres@127.0.0.1:5432/test   # also from the database

With --dsn (a PostgreSQL server's admin DSN), the same month is also put in a scratch
database on it (dropped after): one site, one device, 20 channels, the readings
packed by compaction as a closed month is in production, and `opensense report
render`'s path is timed end to end in a fresh process: reports.load.load_month
(readings through storage.read), compute, render. The read's CPU time is printed
beside it (on a shared machine the wall time is mostly waiting).

And the decoding of packed days alone (storage.packing.unpack, what a closed month's
read spends most of its CPU in), µs per reading, against the per-varint loop it
replaced (kept here as the baseline), in the same process: the month's channel-days
packed as the bench's readings (doubles, a steady cadence) and as a DS18B20 node's
(0.0625 °C steps, whole-second timestamps with a second of jitter: the decimal mode).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import resource
import subprocess
import sys
import time
from array import array
from datetime import date, timedelta
from html import escape
from typing import Any

from opensense.reports import data as rd

FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"


def make_input(channels: int, days: int) -> rd.ReportInput:
    p_from = date(2026, 11, 1)
    p_to = date(2026, 11, days)
    start, end = rd.period_bounds(p_from, p_to, "Europe/Berlin")
    chans = []
    for c in range(channels):
        ts = array("d")
        vals = array("d")
        t = start
        k = 0
        while t < end:
            if not (c == 0 and 2000 <= k < 2100):  # one gap
                ts.append(t)
                vals.append(3.5 + 1.2 * math.sin(k / 90 + c) + (6 if 5000 <= k < 5030 else 0))
            t += 60
            k += 1
        chans.append(
            rd.ChannelInput(
                id=f"chn_{c}",
                name=f"Cold room {c + 1}",
                device=f"node{c // 3}",
                unit="°C",
                cadence_s=60,
                ts=ts,
                values=vals,
                thresholds=(rd.Threshold(None, 0.0, 5.0),),
            )
        )
    return rd.ReportInput(
        "site_bench", "Bench site", "Teststraße 1", "Europe/Berlin", p_from, p_to, chans
    )


def _old_unpack(blob: bytes) -> tuple[list[int], list[float]]:
    """storage.packing.unpack as it was: a Python loop over every varint (the baseline),
    each read by packing._get, the one-varint reader it called then and still has."""
    import struct
    import zlib

    from opensense.storage.packing import _get as get

    buf = zlib.decompress(blob)
    n, pos = get(buf, 1)
    ts: list[int] = []
    prev = prev_delta = 0
    for i in range(n):
        d, pos = get(buf, pos)
        if i == 0:
            prev = d
        else:
            prev_delta += d
            prev += prev_delta
        ts.append(prev)
    mode = buf[pos]
    pos += 1
    values: list[float] = []
    if mode == 1:
        f = 10 ** buf[pos]
        pos += 1
        last = 0
        for _ in range(n):
            d, pos = get(buf, pos)
            last += d
            values.append(last / f)
    else:
        for _ in range(n):
            values.append(struct.unpack_from("<d", buf, pos)[0])
            pos += 8
    return ts, values


def decode_figures(channels: int, days: int) -> None:
    """Print µs per reading of packing.unpack against _old_unpack over the month's
    channel-days, both kinds of day; checks both decode the same."""
    import random

    from opensense.storage import packing

    inp = make_input(channels, days)
    rnd = random.Random(1)
    kinds: dict[str, list[bytes]] = {"bench readings (doubles)": [], "DS18B20 node (decimal)": []}
    for ch in inp.channels:
        for d in range(days):
            day = [
                (t, v)
                for t, v in zip(ch.ts, ch.values, strict=True)
                if d * 86400 <= t - ch.ts[0] < (d + 1) * 86400
            ]
            ts = [round(t * 1e6) for t, _ in day]
            kinds["bench readings (doubles)"].append(packing.pack(ts, [v for _, v in day]))
            node_ts = [t + rnd.randrange(2) * 1_000_000 for t in ts]
            node_v = [round(v * 16) / 16 for _, v in day]
            kinds["DS18B20 node (decimal)"].append(packing.pack(node_ts, node_v))
    for kind, blobs in kinds.items():
        n = sum(len(packing.unpack(b)[0]) for b in blobs)
        assert all(packing.unpack(b) == _old_unpack(b) for b in blobs), "decoders differ"
        best = {"old": math.inf, "new": math.inf}
        for _ in range(3):  # interleaved, best of 3: the machine may be shared
            for name, fn in (("old", _old_unpack), ("new", packing.unpack)):
                t0 = time.process_time()
                for b in blobs:
                    fn(b)
                best[name] = min(best[name], time.process_time() - t0)
        print(
            f"decode {kind:<25} {len(blobs)} days, {n:,} readings: per-varint loop"
            f" {best['old'] / n * 1e6:.2f} µs/reading, unpack {best['new'] / n * 1e6:.2f}"
            f" µs/reading (x{best['old'] / best['new']:.1f} faster, CPU time)"
        )


def render_reportlab(d: rd.ReportData) -> bytes:
    from reportlab import rl_config
    from reportlab.graphics.shapes import Drawing, PolyLine, String
    from reportlab.lib import colors
    from reportlab.lib.pagesizes import A4
    from reportlab.lib.styles import getSampleStyleSheet
    from reportlab.pdfbase import pdfmetrics
    from reportlab.pdfbase.ttfonts import TTFont
    from reportlab.platypus import PageBreak, Paragraph, SimpleDocTemplate, Table, TableStyle

    rl_config.invariant = 1
    pdfmetrics.registerFont(TTFont("DejaVu", FONT))
    st = getSampleStyleSheet()["Normal"]
    st.fontName = "DejaVu"
    buf = io.BytesIO()
    doc = SimpleDocTemplate(buf, pagesize=A4, invariant=1)
    story: list[Any] = []
    for c in d.channels:
        story.append(Paragraph(escape(c.channel.name), st))
        rows = [["day", "min", "mean", "max", "h in range"]]
        for day in c.days:
            rows.append(
                [
                    str(day.day),
                    f"{day.vmin:.1f}",
                    f"{day.vmean:.1f}",
                    f"{day.vmax:.1f}",
                    f"{day.hours_in_range:.1f}",
                ]
            )
        t = Table(rows)
        t.setStyle(
            TableStyle(
                [
                    ("FONT", (0, 0), (-1, -1), "DejaVu", 7),
                    ("GRID", (0, 0), (-1, -1), 0.25, colors.grey),
                ]
            )
        )
        story.append(t)
        w, h = 480, 120
        dr = Drawing(w, h)
        lo, hi = c.vmin or 0, c.vmax or 1
        span = (d.end - d.start) or 1
        pts_hi, pts_lo = [], []
        for t0, mn, mx in c.chart:
            x = (t0 - d.start) / span * w
            pts_hi += [x, (mx - lo) / (hi - lo or 1) * h]
            pts_lo += [x, (mn - lo) / (hi - lo or 1) * h]
        dr.add(PolyLine(pts_hi, strokeColor=colors.red, strokeWidth=0.5))
        dr.add(PolyLine(pts_lo, strokeColor=colors.blue, strokeWidth=0.5))
        dr.add(String(2, h - 8, "°C", fontName="DejaVu", fontSize=7))
        story += [dr, PageBreak()]
    doc.build(story)
    return buf.getvalue()


def render_weasyprint(d: rd.ReportData) -> bytes:
    import weasyprint

    parts = [
        "<html><head><style>@font-face{font-family:DejaVu;src:url(file://" + FONT + ")}"
        "body{font-family:DejaVu;font-size:7pt} table{border-collapse:collapse}"
        "td,th{border:0.25pt solid grey;padding:1pt 3pt} section{page-break-after:always}"
        "</style></head><body>"
    ]
    w, h = 480, 120
    span = (d.end - d.start) or 1
    for c in d.channels:
        parts.append(
            f"<section><p>{escape(c.channel.name)}</p><table><tr><th>day</th><th>min</th><th>mean</th><th>max</th><th>h in range</th></tr>"
        )
        for day in c.days:
            parts.append(
                f"<tr><td>{day.day}</td><td>{day.vmin:.1f}</td><td>{day.vmean:.1f}</td><td>{day.vmax:.1f}</td><td>{day.hours_in_range:.1f}</td></tr>"
            )
        parts.append("</table>")
        lo, hi = c.vmin or 0, c.vmax or 1
        hi_pts = " ".join(
            f"{(t0 - d.start) / span * w:.1f},{h - (mx - lo) / (hi - lo or 1) * h:.1f}"
            for t0, _, mx in c.chart
        )
        lo_pts = " ".join(
            f"{(t0 - d.start) / span * w:.1f},{h - (mn - lo) / (hi - lo or 1) * h:.1f}"
            for t0, mn, _ in c.chart
        )
        parts.append(
            f'<svg width="{w}pt" height="{h}pt" viewBox="0 0 {w} {h}"><polyline fill="none" stroke="red" stroke-width="0.5" points="{hi_pts}"/>'
            f'<polyline fill="none" stroke="blue" stroke-width="0.5" points="{lo_pts}"/><text x="2" y="8" font-size="7">°C</text></svg></section>'
        )
    parts.append("</body></html>")
    pdf: bytes = weasyprint.HTML(string="".join(parts)).write_pdf()
    return pdf


def render_template(d: rd.ReportData) -> bytes:
    from opensense.reports import render

    return render.render_pdf(d, language="en")


ENGINES = {
    "reportlab": render_reportlab,
    "weasyprint": render_weasyprint,
    "haccp_monthly": render_template,
}


def setup_db(admin: str, channels: int, days: int) -> tuple[str, str, str]:
    """A scratch database holding the bench's month; returns (its name, DSN, site id)."""
    import asyncio
    import secrets
    from datetime import UTC, datetime, timedelta

    import psycopg
    from psycopg import sql

    from opensense import db
    from opensense.storage import write
    from opensense.storage.compaction import compact

    name = f"opensense_bench_report_{secrets.token_hex(3)}"
    with psycopg.connect(admin, autocommit=True) as c:
        c.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    dsn = psycopg.conninfo.make_conninfo(admin, dbname=name)
    db.migrate(dsn)
    inp = make_input(channels, days)
    lo = datetime.fromtimestamp(
        rd.period_bounds(inp.period_from, inp.period_to, inp.timezone)[0], UTC
    )

    async def go() -> str:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            await conn.execute(
                "INSERT INTO accounts (id, name, email) VALUES ('acc_bench', 'b', 'b@x.invalid')"
            )
            await conn.execute(
                "INSERT INTO sites (id, account_id, name, address, timezone, vertical) VALUES"
                " ('site_bench', 'acc_bench', 'Bench site', 'Teststraße 1', 'Europe/Berlin', 'chilled_storage')"
            )
            await conn.execute(
                "INSERT INTO devices (id, account_id, site_id, local_id, name) VALUES"
                " ('dev_bench', 'acc_bench', 'site_bench', 'bench', 'bench')"
            )
            months = {db.month_start((lo + timedelta(days=d)).date()) for d in range(-1, days + 2)}
            await write.ensure_month_partitions(conn, months)
            for ch in inp.channels:
                cur = await conn.execute(
                    "INSERT INTO channels (id, sensor_id, account_id, device_id, kind, label, unit, name)"
                    " VALUES (%s, %s, 'acc_bench', 'dev_bench', 'temperature', %s, '°C', %s) RETURNING num",
                    (ch.id, "snr" + ch.id[3:], ch.id, ch.name),
                )
                row = await cur.fetchone()
                assert row is not None
                async with conn.cursor().copy(
                    "COPY measurements (channel_num, ts, value) FROM STDIN"
                ) as cp:
                    for t, v in zip(ch.ts, ch.values, strict=True):
                        await cp.write_row((row[0], datetime.fromtimestamp(t, UTC), v))
            await compact(conn, lo + timedelta(days=days + 2), 0)
        return "site_bench"

    return name, dsn, asyncio.run(go())


def db_worker(dsn: str, site: str, channels: int, days: int) -> None:
    import asyncio

    import psycopg

    from opensense.reports import load, render

    inp0 = make_input(1, days)
    # The month leaves the coroutine through a list, not as its result: Python 3.11's
    # asyncio.run, restoring the SIGINT handler, formats the repr of its task (and so
    # of the task's result: 1.7 million floats, ~2 s) in a ValueError that
    # signal.getsignal swallows. The CLI's coroutine returns the PDF, not the month.
    out: list[rd.ReportInput] = []

    async def go() -> None:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            out.append(await load.load_month(conn, site, inp0.period_from, inp0.period_to))

    t0, c0 = time.perf_counter(), time.process_time()
    asyncio.run(go())
    t1, c1 = time.perf_counter(), time.process_time()
    inp = out[0]
    d = rd.compute(inp)
    t2 = time.perf_counter()
    pdf = render.render_pdf(d)
    t3 = time.perf_counter()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    n = sum(len(c.ts) for c in inp.channels)
    print(
        json.dumps(
            {
                "read_s": t1 - t0,
                "read_cpu_s": c1 - c0,
                "data_s": t2 - t1,
                "render_s": t3 - t2,
                "rss_mb": rss,
                "bytes": len(pdf),
                "n": n,
            }
        )
    )


def make_annual_input(channels: int, months: int) -> Any:
    """`channels` x `months` of 1-hour rollups (12 readings an hour), from 2026-01."""
    from opensense.reports import annual

    start, end = rd.period_bounds(date(2026, 1, 1), date(2026, 12, 31), "Europe/Berlin")
    end = min(end, start + months * 31 * 86400)
    chans = []
    for c in range(channels):
        ts, lo, hi, sm, n = array("d"), array("d"), array("d"), array("d"), array("q")
        t, k = start, 0
        while t < end:
            v = 3.0 + (k % 24) / 10 + c / 100
            ts.append(t)
            lo.append(v - 0.3)
            hi.append(v + (3.0 if k % 500 == 0 else 0.3))
            sm.append(v * 12)
            n.append(12)
            t, k = t + 3600, k + 1
        chans.append(
            annual.HourlyChannel(
                f"chn_{c}", f"node{c // 4} · probe {c}", f"node{c // 4}", "°C", ts, lo, hi, sm, n,
                (rd.Threshold(None, 0.0, 5.0),),
            )
        )  # fmt: skip
    exs = [
        rd.Excursion(f"evt_{c}_{k}", f"chn_{c}", "range", "alarm", start + k * 500 * 3600,
                     start + k * 500 * 3600 + 900, start + k * 500 * 3600 + 5400, 6.0)
        for c in range(channels) for k in range(int((end - start) // (500 * 3600)))
    ]  # fmt: skip
    last = date(2026, 12, 31) if months >= 12 else date(2026, months + 1, 1) - timedelta(days=1)
    return annual.AnnualInput(
        "site_bench", "Bench", "", "Europe/Berlin", date(2026, 1, 1), last, chans, exs
    )


def worker(engine: str, channels: int, days: int) -> None:
    if engine == "haccp_annual":
        from opensense.reports import annual

        year = make_annual_input(channels, 12 if days >= 28 else 1)
        t0 = time.perf_counter()
        ad = annual.compute_annual(year)
        t1 = time.perf_counter()
        rss_data = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        pdf = annual.render_annual(ad)
    else:
        inp = make_input(channels, days)  # stands for the database read: not timed here
        t0 = time.perf_counter()
        d = rd.compute(inp)
        t1 = time.perf_counter()
        rss_data = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        pdf = ENGINES[engine](d)
    t2 = time.perf_counter()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "data_s": t1 - t0,
                "render_s": t2 - t1,
                "rss_data_mb": rss_data,
                "rss_mb": rss,
                "bytes": len(pdf),
            }
        )
    )


def _in_fresh_process(*args: str) -> tuple[dict[str, Any] | None, list[str]]:
    """This script again, in a new process (its peak RSS is the run's own): the JSON
    of its last output line, or None and the last line of its stderr."""
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if out.returncode:
        return None, out.stderr.strip().splitlines()[-1:]
    return json.loads(out.stdout.strip().splitlines()[-1]), []


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", choices=[*ENGINES, "haccp_annual"], action="append")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument(
        "--dsn",
        help="PostgreSQL server (admin DSN): also time the month read from a scratch database",
    )
    ap.add_argument("--db-worker", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--channels", type=int)
    ap.add_argument("--days", type=int)
    a = ap.parse_args()
    channels = a.channels or (3 if a.quick else 20)
    days = a.days or (3 if a.quick else 30)
    if a.worker:
        worker(a.worker, channels, days)
        return
    if a.db_worker:
        db_worker(a.db_worker[0], a.db_worker[1], channels, days)
        return
    print(
        f"monthly document: {channels} channels x 1/min x {days} days = {channels * days * 1440:,} readings"
    )
    print(
        f"{'engine':<14} {'data':>7} {'render':>7} {'total':>7} {'peak RSS':>9} {'(data only)':>11} {'PDF':>9}"
    )
    base = None
    for engine in a.only or [*ENGINES, "haccp_annual"]:
        r, err = _in_fresh_process(
            "--worker", engine, "--channels", str(channels), "--days", str(days)
        )
        if r is None:
            print(f"{engine:<14} failed: {err}")
            continue
        total = r["data_s"] + r["render_s"]
        base = base or r
        ratio = f"(x{r['render_s'] / base['render_s']:.2f} render, x{r['rss_mb'] / base['rss_mb']:.2f} RSS)"
        verdict = "PASS" if total < 5 and r["rss_mb"] < 300 else "MISS"
        print(
            f"{engine:<14} {r['data_s']:6.2f}s {r['render_s']:6.2f}s {total:6.2f}s {r['rss_mb']:7.0f}MB"
            f" {r['rss_data_mb']:9.0f}MB {r['bytes'] / 1024:7.0f}kB  {verdict} {ratio}"
        )
    decode_figures(channels, days)
    if a.dsn:
        import psycopg
        from psycopg import sql

        t0 = time.perf_counter()
        name, dsn, site = setup_db(a.dsn, channels, days)
        print(
            f"from the database: {name}, month built and packed in {time.perf_counter() - t0:.1f} s"
        )
        try:
            r, err = _in_fresh_process(
                "--db-worker", dsn, site, "--channels", str(channels), "--days", str(days)
            )
            if r is None:
                print(f"database run failed: {err}")
            else:
                total = r["read_s"] + r["data_s"] + r["render_s"]
                verdict = "PASS" if total < 5 and r["rss_mb"] < 300 else "MISS"
                print(
                    f"{'db+haccp':<14} read {r['read_s']:.2f}s ({r['n']:,} readings) + data {r['data_s']:.2f}s"
                    f" + render {r['render_s']:.2f}s = {total:.2f}s, peak RSS {r['rss_mb']:.0f}MB  {verdict}"
                    f" (read CPU {r['read_cpu_s']:.2f}s)"
                )
        finally:
            with psycopg.connect(a.dsn, autocommit=True) as c:
                c.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )
    print("targets: monthly < 5 s and < 300 MB (total time, peak RSS of the rendering process)")


if __name__ == "__main__":
    main()
