"""Every benchmark under tools/bench runs in its --quick form, as a separate process,
and prints its figures: the benches call the server, the gateway and the firmware as
they are today, so a change that breaks one shows here, not on the day someone
measures. Each test parses the figures the bench's README section documents and
checks they are figures (a rate above zero, every reading accounted for); it does not
judge them: PASS/MISS against a target is the bench's to print, never a failure.

The database benches get a database of the session's PostgreSQL server (--dsn), not
an embedded server of their own: starting one per bench would add minutes to the
suite. Marked `e2e` (one pass of tools/test.sh) and `bench` (`pytest -m bench`)."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

pytestmark = [pytest.mark.db, pytest.mark.e2e, pytest.mark.bench]

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240  # a --quick run takes seconds; a hung one must not hold the suite


def run_bench(name: str, *args: str) -> str:
    """tools/bench/<name> --quick <args>: its output; fails on a non-zero exit."""
    t0 = time.monotonic()
    done = subprocess.run(
        [str(ROOT / "tools" / "bench" / name), "--quick", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, f"tools/bench/{name} --quick exited {done.returncode}:\n{out}"
    print(f"tools/bench/{name} --quick: {time.monotonic() - t0:.1f} s")
    return out


def figure(text: str, pattern: str) -> tuple[str, ...]:
    """The groups of the first line matching `pattern` (numbers without separators)."""
    m = re.search(pattern, text, re.M)
    assert m, f"no line matching {pattern!r} in:\n{text}"
    return tuple(g.replace(",", "") for g in m.groups())


NUM = r"([\d,]+(?:\.\d+)?)"
VERDICT = r"(PASS|MISS)"


@pytest.fixture
def scratch_dsn(pg_server: str) -> Iterator[str]:
    """A fresh, empty database on the session's server, as its superuser: the benches
    that take a scratch database give it their roles and migrate it."""
    name = f"opensense_bench_{secrets.token_hex(4)}"
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    info = psycopg.conninfo.conninfo_to_dict(pg_server)
    info["dbname"] = name
    yield psycopg.conninfo.make_conninfo("", **info)
    with psycopg.connect(pg_server, autocommit=True) as conn:
        for db in (name, f"{name}_baseline"):  # (ingest --baseline-rev makes the second)
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(db))
            )


def test_fwqueue() -> None:
    out = run_bench("fwqueue")
    b1, b5, ratio = figure(
        out, rf"batch=1 \(baseline\): +{NUM}\n.*batch=5 \(default\): +{NUM} +ratio {NUM}"
    )
    assert float(b1) > float(b5) > 0 and 0 < float(ratio) < 1
    (days,) = figure(out, rf"outage the 1.6 MB queue holds: +{NUM} days")
    assert float(days) > 0


def test_decode() -> None:
    out = run_bench("decode")
    for body, k in (("32 readings", 32), ("3 readings", 3), ("1 reading", 1)):
        size, b, a, b_r, a_r = figure(out, rf"^{body} +(\d+) +{NUM} +{NUM} +{NUM} +{NUM} ")
        assert int(size) > 0 and float(b) > 0 and float(a) > 0
        assert abs(float(b_r) * k - float(b)) <= 0.01 * k + 0.1
    for refused in (r"bad JSON \(NaN\)", r"bad value \(31st\)"):
        figure(out, rf"^{refused} +\d+ +{NUM} +{NUM} ")
    figure(out, rf"^32 channels +\d+ +{NUM} +{NUM} ")
    rows = out[out.index("rows for the batch writer") :]
    b, a, b_r, a_r = figure(rows, rf"^32 readings +{NUM} +{NUM} +{NUM} +{NUM} ")
    assert float(a) > 0 and abs(float(a_r) * 32 - float(a)) <= 0.01 * 32 + 0.1


def test_audit(pg_server: str) -> None:
    out = run_bench("audit", "--dsn", pg_server)
    (base,) = figure(out, rf"plain INSERT, 1 writer: +{NUM} rows/s \(baseline\)")
    rate, ratio = figure(out, rf"audit.record, 1 writer: +{NUM} rows/s \({NUM}x baseline\)")
    assert float(base) > 0 and float(rate) > 0 and float(ratio) > 0
    for what in ("publish", "verify "):
        (r,) = figure(out, rf"^  {what}.*: +{NUM} rows/s")
        assert float(r) > 0
    (plain,) = figure(out, rf"pg_dump -Fc -> file \(unencrypted\): +{NUM} MB/s")
    (enc,) = figure(out, rf"pg_dump -Fc \| age -> file: +{NUM} MB/s")
    assert float(plain) > 0 and float(enc) > 0


def test_reads(pg_server: str) -> None:
    out = run_bench("reads", "--dsn", pg_server)
    (n,) = figure(out, rf"^data: {NUM} readings over 14 days")
    assert int(n) == 14 * 1440
    rows = {
        way: figure(out, rf"^{way} +{NUM}s +{NUM}ms +{NUM}MB +(\d+) ")
        for way in ("before", "after")
    }
    # both ways answer the same buckets: the range's days
    assert rows["before"][3] == rows["after"][3] and int(rows["after"][3]) >= 14


@pytest.mark.parametrize("aged", [False, True], ids=["fresh", "aged"])
def test_evaluator(pg_server: str, aged: bool) -> None:
    out = run_bench("evaluator", "--dsn", pg_server, *(["--aged"] if aged else []))
    if aged:  # every state of both sides holds a day of checkpoints before the rounds
        # the baseline's (at its --rev: in the state rows' arrays) and this tree's (rows)
        figure(out, r"^aged: 32 states, 150\.\.150 checkpoints each \(\d")
        figure(out, r"^aged: 32 states, 150\.\.150 checkpoints each \(in rows of their own\)")
    rows = {
        side: figure(out, rf"^{side} +{NUM} +{NUM} +{NUM} +{NUM} ") for side in ("baseline", "now")
    }
    for server, _pg, total, _chan in rows.values():
        assert 0 < float(server) <= float(total)
    figure(out, r"^now .*\(server x[\d.]+, total x[\d.]+\)")
    figure(out, r"same decisions on both sides \(states, events; [1-9]\d* events a side\): yes")


def test_alarms(pg_server: str) -> None:
    out = run_bench("alarms", "--dsn", pg_server)
    opened, hooks, _mails = figure(
        out,
        rf"probes: {NUM} alarms opened by a commit; webhooks received {NUM}; alarm emails {NUM}",
    )
    assert int(opened) > 0 and hooks == opened, out
    figure(out, rf"baseline NOTIFY round trip: p50 {NUM} ms  p99 {NUM} ms")
    p50, p99 = figure(out, rf"commit -> webhook handed over: p50 {NUM} ms  p99 {NUM} ms")
    assert 0 < float(p50) <= float(p99)
    figure(out, rf"target p99 < 1 s with [\d,]+ channels live: {VERDICT}")
    for state in ("fresh", "25 h"):
        for size in (128, 8):
            client, _ = figure(
                out,
                rf"evaluator pass, {state} state, {size} channels a pass: client {NUM} µs"
                rf" \+ PostgreSQL (n/a|{NUM} µs) CPU per channel",
            )[:2]
            assert float(client) >= 0
    # the aged channels hold the template's day of checkpoints (rows of their own)
    assert 140 <= float(figure(out, rf"\(25 h state: {NUM} checkpoints")[0]) <= 151


def test_gateway(scratch_dsn: str) -> None:
    out = run_bench("gateway", "--dsn", scratch_dsn)
    (base,) = figure(out, rf"^baseline  direct POST /v1/ingest.*: {NUM} readings/s")
    n, rate = figure(out, rf"^drain     {NUM} readings in [\d.]+ s: {NUM} readings/s")
    assert int(n) == 5000 and float(base) > 0 and float(rate) > 0
    figure(out, r"queue after: 0, dead letters 0")
    (peak,) = figure(out, rf"gateway peak RSS while draining [\d,]+: {NUM} MB")
    assert float(peak) > 0
    assert len(re.findall(rf"  {VERDICT}$", out, re.M)) == 2, out


def test_status(scratch_dsn: str) -> None:
    out = run_bench("status", "--dsn", scratch_dsn)
    (readings,) = figure(out, rf"ingest meanwhile: [\d,]+ requests/s, {NUM} readings/s")
    assert float(readings) > 0
    idle, loaded = figure(out, rf"/status.json p99: idle {NUM} ms; under ingest load {NUM} ms")
    assert float(idle) > 0 and float(loaded) > 0
    figure(
        out, rf"status-only process {NUM} ms {VERDICT}; the ingest server itself {NUM} ms {VERDICT}"
    )


def test_ingest(scratch_dsn: str) -> None:
    out = run_bench("ingest", "--dsn", scratch_dsn)
    summary = out[out.index("SUMMARY") :]
    (ceiling,) = figure(summary, rf"ceiling = {NUM} rows/s")
    assert float(ceiling) > 0
    phases = re.findall(
        rf"^ +(1|32) +(16|64) +{NUM} +{NUM} .*%.*every reading accepted$", summary, re.M
    )
    assert len(phases) == 4, summary
    (packed,) = figure(summary, rf"after: packed {NUM} B/reading")
    assert float(packed) > 0
    # MQTT through the embedded broker: every PUBACKed message is in the database
    for k in (1, 3):
        figure(summary, rf"^ +{k} +4 +{NUM} +{NUM} .* {NUM} rows = {NUM} PUBACKed x {k}$")
    # CPU per stored reading, each path, beside COPY's per row
    for path in ("HTTP 32 readings/request", "HTTP 1 reading/request", "MQTT 1", "MQTT 3"):
        rate, server, _pg, total = figure(summary, rf"^   {path}.*? {NUM} +{NUM} +(\S+) +{NUM} ")
        assert float(rate) > 0 and float(server) > 0 and float(total) >= float(server)
    figure(summary, rf"^   COPY \(binary, 1 stream\) .* {NUM}")
    # the writing statement part by part
    figure(summary, rf"^   BATCH_SQL as the server runs it +{NUM} +{NUM} +{NUM}")
    assert len(re.findall(rf" {VERDICT}$", summary[summary.index("TARGETS") :], re.M)) == 5


def test_ingest_against_an_older_commit_in_the_same_run(scratch_dsn: str) -> None:
    """--baseline-rev: the code when issue 14 began runs beside this tree, on a database
    of its own, and the HTTP targets become shares of its figures from the same run;
    --rounds 2: every phase twice on each side, each path's figure the median round."""
    out = run_bench(
        "ingest",
        "--dsn",
        scratch_dsn,
        "--only",
        "http",
        "--baseline-rev",
        "dc0c4da",
        "--rounds",
        "2",
    )
    assert len(re.findall(r"every reading accepted  \(base\)$", out, re.M)) == 8, out
    summary = out[out.index("SUMMARY") :]
    assert "dc0c4da's server, the same HTTP phases in this run" in summary
    rate, server, _pg, total, base = figure(
        summary,
        rf"^   HTTP 32 readings/request \(c=\d+\) median of 2 +{NUM} +{NUM} +(\S+) +{NUM}"
        rf" +\S+ +{NUM} ",
    )
    assert float(rate) > 0 and float(total) >= float(server) > 0 and float(base) > 0
    assert base != "190.8"  # measured, not the constant
    (limit,) = figure(
        summary, rf"HTTP 32 readings/request CPU <= 20% of dc0c4da .*target <= {NUM}\)"
    )
    assert abs(float(limit) - 0.2 * float(base)) < 0.11


def test_ingest_mqtt_against_an_older_commit_on_this_machine(scratch_dsn: str) -> None:
    """--only mqtt --baseline-rev: the MQTT phases of the code when issue 14 began and of
    this tree, each a run of its own (the old one on a fresh database), and the MQTT
    target becomes a share of the old code's figure measured here, not the constant."""
    out = run_bench("ingest", "--dsn", scratch_dsn, "--only", "mqtt", "--baseline-rev", "dc0c4da")
    assert re.search(r"^  round 1, dc0c4da +: MQTT 1 reading/message", out, re.M), out
    assert re.search(r"^  round 1, this tree: MQTT 1 reading/message", out, re.M), out
    summary = out[out.index("SUMMARY") :]
    base, mine = figure(summary, rf"^   MQTT 1 reading/message +{NUM} +{NUM} +\d+%")
    b, m = (float(x.replace(",", "")) for x in (base, mine))
    assert b > 0 and m > 0
    assert base != "975.5"  # measured, not the constant
    (limit,) = figure(summary, rf"MQTT 1 reading/message CPU <= 30% of dc0c4da .*target <= {NUM}\)")
    assert abs(float(limit.replace(",", "")) - 0.3 * b) < 0.11
    figure(summary, rf"^   MQTT 3 readings/message +{NUM} +{NUM} +\d+%")


def test_restart(scratch_dsn: str) -> None:
    out = run_bench("restart", "--dsn", scratch_dsn)
    figure(out, r"fast checks for 3 devices checked by bcrypt equal the bench's")
    (today,) = figure(out, rf"today \(extrapolated from \d+\): {NUM} s")
    assert float(today) > 0
    for door in ("HTTP", "MQTT"):
        ok, n = figure(out, rf"^  {door} .*; {NUM}/{NUM} admitted; target < 60 s: (?:PASS|MISS)")
        assert ok == n == "50", out


def test_mqtt(scratch_dsn: str) -> None:
    out = run_bench("mqtt", "--dsn", scratch_dsn)
    summary = out[out.index("SUMMARY") :]
    for broker in ("amqtt", "embedded"):
        (rate,) = figure(summary, rf"^   {broker} +32 readings \(.*?\) +{NUM}")
        assert float(rate) > 0
    # every PUBACKed message is in the database, exactly once
    figure(summary, rf"embedded, 32 per message: {NUM} rows = {NUM} PUBACKed x 32$")
    if shutil.which("mosquitto") and shutil.which("mosquitto_ctrl"):
        figure(summary, rf"Mosquitto, 32 per message: {NUM} rows = {NUM} PUBACKed x 32")
        figure(
            summary, rf"Mosquitto end to end >= 50% of its own QoS 1 rate, 32 per msg .* {VERDICT}"
        )


def test_paholoop() -> None:
    out = run_bench("paholoop")
    (thread,) = figure(out, rf"^  thread \(loop_start, the baseline\) +{NUM} µs")
    loop, ratio = figure(out, rf"^  event loop \(_PahoLoop\) +{NUM} µs +ratio {NUM}")
    assert float(thread) > 0 and float(loop) > 0 and float(ratio) > 0


def test_listen(scratch_dsn: str) -> None:
    out = run_bench("listen", "--dsn", scratch_dsn)
    (former,) = figure(out, rf"^  psycopg notifies\(\) \(the baseline\) +{NUM} µs")
    now, ratio = figure(out, rf"^  aio.listen \(libpq input\) +{NUM} µs +ratio {NUM}")
    assert float(former) > 0 and float(now) > 0 and float(ratio) > 0


def test_calmsql() -> None:
    out = run_bench("calmsql")  # (its own embedded PostgreSQL: it loads auto_explain)
    rounds = re.findall(
        rf"^  round 1 .* statement +{NUM} µs, trigger +{NUM} µs \({NUM} ", out, re.M
    )
    assert len(rounds) == 2, out
    for stmt, trig, settled in rounds:  # every reading settled, the trigger inside
        assert 0 < float(trig) < float(stmt) and int(settled) > 0
    figure(
        out, rf"^  by channels.num \(0033\) +statement +{NUM} µs +trigger +{NUM} µs +ratio {NUM}"
    )


def test_marks() -> None:
    out = run_bench("marks")
    rounds = re.findall(rf"^  round 1  (.+?) +{NUM} µs a row .*, +{NUM} wall$", out, re.M)
    assert [w for w, _, _ in rounds] == ["as the server runs it", "without the marks (floor)"]
    assert all(float(c) > 0 and float(w) > 0 for _, c, w in rounds), out
    figure(out, rf"^  the marks: -?{NUM} µs a row, -?\d+% of the statement's ")


def test_fleet(scratch_dsn: str) -> None:
    out = run_bench("fleet", "--dsn", scratch_dsn)
    summary = out[out.index("SUMMARY") :]
    brokers = ["embedded"]
    if shutil.which("mosquitto") and shutil.which("mosquitto_ctrl"):
        brokers.append("Mosquitto")
    for broker in brokers:
        points = re.findall(rf"^   {broker} +{NUM} nodes = +{NUM} msg/min", summary, re.M)
        assert [n for n, _ in points] == ["120", "240"], summary
        for nodes in ("120", "240"):
            # every PUBACKed message is in the database, exactly once
            rows, acked = figure(
                summary,
                rf"^   {broker}, {nodes} nodes: {NUM} rows = {NUM} PUBACKed x 3"
                r"(?: \+ \d+ of unPUBACKed ones)?(?:;|$)",
            )
            assert int(rows) >= 3 * int(acked) > 0, summary
        figure(summary, rf"^   {broker}: share = -?[\d.]+% \+ -?[\d.]+% per 1,000 nodes.* nodes")
        figure(summary, rf"under 50 % CPU on 2 cores, {broker} +(?:[\d,]+|n/a) nodes  {VERDICT}")
    # each point: the CPU shares and publish -> stored of tracked messages, all seen
    shares = re.findall(rf"= +{NUM}% of the machine; load", summary)
    assert len(shares) == 2 * len(brokers) and all(float(x) > 0 for x in shares), summary
    lat = re.findall(rf"publish -> stored p50 {NUM} ms  p99 {NUM} ms \(([\d,]+) tracked\)", summary)
    assert len(lat) == len(shares), summary
    assert all(0 < float(p50) <= float(p99) and n != "0" for p50, p99, n in lat), summary
    assert "never seen" not in summary, summary


def test_report(pg_server: str) -> None:
    # the product's engine and template; the measured alternative (WeasyPrint) is not
    # a dependency, so its quick run is not part of the suite
    out = run_bench("report", "--only", "reportlab", "--only", "haccp_monthly", "--dsn", pg_server)
    (n,) = figure(out, rf"^monthly document: 3 channels x 1/min x 3 days = {NUM} readings")
    assert n == "12960", out
    for engine in ("reportlab", "haccp_monthly"):
        total, rss = figure(out, rf"^{engine} +[\d.]+s +[\d.]+s +{NUM}s +{NUM}MB")
        assert float(total) > 0 and float(rss) > 0
    read, got = figure(out, rf"^db\+haccp +read [\d.]+s \({NUM} readings\).*= {NUM}s")
    assert int(read) > 0 and float(got) > 0
    for kind in ("bench readings", "DS18B20 node"):
        old, new = figure(out, rf"^decode {kind} .* loop {NUM} µs/reading, unpack {NUM} µs")
        assert float(old) > 0 and float(new) > 0


def test_dashboard(pg_server: str) -> None:
    out = run_bench("dashboard", "--dsn", pg_server)
    for label in ("overview \\(50 channels\\)", "13-month chart data"):
        p50, p95 = figure(out, rf"^{label} +server time p50 {NUM} ms  p95 {NUM} ms")
        assert 0 < float(p50) <= float(p95), out
    points, size = figure(out, rf"\({NUM} points, {NUM} bytes\)")
    assert 390 <= int(points) <= 400 and int(size) > 0  # one point a day, no raw readings
    p50, p95, probes = figure(
        out,
        rf"^commit -> state change on all 50 streams: p50 {NUM} ms  p95 {NUM} ms .*; (\d+) probes",
    )
    assert 0 < float(p50) <= float(p95) and int(probes) == 3, out
    assert len(re.findall(rf": {VERDICT}$", out, re.M)) == 3, out


def test_workers(pg_server: str) -> None:
    out = run_bench("workers", "--dsn", pg_server)
    for workers in (1, 2):
        for k in (1, 32):
            (rate,) = figure(
                out, rf"workers={workers} +{k}/request +{NUM} readings/s .*every reading accepted"
            )
            assert float(rate) > 0
    for k in (1, 32):
        one, two, ratio = figure(
            out, rf"^ +{k}/request +1 worker +{NUM} +2 workers +{NUM} +x{NUM}$"
        )
        assert float(one) > 0 and float(two) > 0 and float(ratio) > 0


def test_every_bench_runs_here() -> None:
    """A bench added to tools/bench without its quick run in this file fails here."""
    launchers = {
        p.name
        for p in (ROOT / "tools" / "bench").iterdir()
        if p.is_file() and os.access(p, os.X_OK) and not p.suffix
    }
    tested = {n.removeprefix("test_") for n in globals() if n.startswith("test_")}
    assert launchers <= tested, sorted(launchers - tested)
