"""Where a process's CPU goes: py-spy sampling a running server (`--profile DIR` of
the ingest bench), and the samples summarised by function group.

py-spy reads the interpreter's stacks from outside (ptrace, `--nonblocking`: the
process is not paused), so the server runs its normal code. Only samples of threads
that are running count (py-spy's default leaves idle threads out: the event loop
waiting in epoll is not CPU). The raw output (`--format raw`: one line per distinct
stack, `frame;frame;… count`, root first) stays in DIR for flame graphs
(`flamegraph.pl`, speedscope.app); `summarise` reads it back.

Each sample is charged to one group twice over:

- *self* (`AREAS`): the first frame from the leaf up whose file or function matches
  an area, so a sample inside psycopg's adaptation called by the batch writer counts
  for psycopg, and one in json.loads called by the validator for JSON;
- *inclusive* (`STAGES`): every stage of the ingest path that appears anywhere on the
  stack, so a stage's share includes what it calls (stages nest: the shares do not
  add up to 100 %).
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .procs import STARTED
from .report import say

# (group, pattern on "function (file:line)"), the first match from the leaf up wins.
AREAS: tuple[tuple[str, str], ...] = (
    ("psycopg: adapt/protocol", r"\(psycopg(_binary|_c)?/"),
    ("psycopg pool", r"\(psycopg_pool/"),
    ("JSON (json, orjson)", r"\(json/|orjson"),
    ("TLS (ssl)", r"\(ssl\.py|\(asyncio/sslproto\.py"),
    ("MQTT broker (amqtt)", r"\(amqtt/"),
    ("HTTP (aiohttp, multidict, yarl)", r"\((aiohttp|multidict|yarl)/"),
    ("logging", r"\(logging/"),
    ("opensense: MQTT glue", r"\(opensense/mqtt/"),
    ("opensense: validate", r"\(opensense/ingest/validate\.py"),
    ("opensense: pipeline/auth", r"\(opensense/ingest/pipeline\.py|\(opensense/tokens\.py"),
    ("opensense: ingest routes", r"\(opensense/ingest/routes\.py"),
    ("opensense: rate limit", r"\(opensense/ratelimit\.py"),
    ("opensense: batch writer", r"\(opensense/storage/(batcher|write)\.py"),
    ("opensense: alarm evaluator", r"\(opensense/alarms/"),
    ("opensense: live/NOTIFY", r"\(opensense/(web/live|live|status)"),
    ("opensense: API middleware/log", r"\(opensense/(api|app)"),
    ("opensense: other", r"\(opensense/"),
    ("asyncio event loop", r"\(asyncio/|\(selectors\.py|uvloop"),
    ("other Python", r"."),
)

# (stage, pattern on a frame): inclusive, anywhere on the stack.
STAGES: tuple[tuple[str, str], ...] = (
    ("HTTP request handling (aiohttp, whole)", r"\(aiohttp/web_protocol\.py"),
    ("  POST /v1/ingest handler (whole)", r"^ingest \(opensense/ingest/routes\.py"),
    ("  read body", r"^BaseRequest\.read \(|^Request\.read \("),
    ("  answer (json dumps, write)", r"^response \(opensense/api/jsonutil|finish_response"),
    ("MQTT broker (amqtt, whole)", r"\(amqtt/"),
    ("  MQTT ingest glue (opensense.mqtt)", r"\(opensense/mqtt/"),
    ("TLS (ssl)", r"\(ssl\.py|\(asyncio/sslproto\.py"),
    ("auth: device_for_token (token row + rate counter)", r"^device_for_token "),
    ("  token check (fast check / bcrypt)", r"\(opensense/tokens\.py"),
    ("JSON parse", r"^(parse_json|loads|JSONDecoder\.decode|JSONDecoder\.raw_decode) \("),
    ("validate payload", r"\(opensense/ingest/validate\.py"),
    ("store_fast (rows, answer)", r"^store_fast "),
    ("  store (slow path: own transaction)", r"^store \(opensense/ingest/pipeline"),
    ("batch writer: _write (dedupe, sort, execute)", r"^BatchWriter\._write "),
    ("  psycopg execute, batch statement", r"BatchWriter\._write \([^;]*\);.*\(psycopg/"),
    ("psycopg (anywhere)", r"\(psycopg(_binary|_c)?/"),
    ("alarm evaluator", r"\(opensense/alarms/"),
    ("live/NOTIFY listeners", r"\(opensense/(web/live|live)|_notify_handler"),
    ("logging", r"\(logging/"),
)


# Leaf frames that hand work to another process and wake it (a query to PostgreSQL,
# a socket write) or wait for one (epoll). py-spy counts a runnable thread as busy, so
# on a crowded machine a thread preempted right there (the woken process takes the
# core) is charged to these while it waits: perf (on-CPU only) showed the kernel and
# libpq together at 8-12 % of the server's CPU where py-spy put 25-35 % on these.
# The summary gives every share with and without them; with them left out is the
# closer estimate on a busy machine.
WAKE = re.compile(
    r"^(BaseCursor\._send_query_prepared|BaseCursor\._send_query|EpollSelector\.select"
    r"|_SelectorSocketTransport\.write|BaseConnection\._exec_command) "
)


@dataclass
class Summary:
    samples: int = 0
    areas: Counter[str] = field(default_factory=Counter)
    stages: Counter[str] = field(default_factory=Counter)
    leaves: Counter[str] = field(default_factory=Counter)  # leaf function (self)
    wake: int = 0  # samples whose leaf is in WAKE
    stages_x: Counter[str] = field(default_factory=Counter)  # stages without them
    areas_x: Counter[str] = field(default_factory=Counter)


def summarise(raw: Path) -> Summary:
    """The samples of a py-spy `--format raw` file, grouped (see the module's text)."""
    areas = [(g, re.compile(p)) for g, p in AREAS]
    stages = [(g, re.compile(p)) for g, p in STAGES]
    out = Summary()
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        frames = stack.split(";")
        if frames and frames[0].startswith("process ") or frames[0].startswith("thread "):
            frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        out.samples += count
        woke = WAKE.search(frames[-1]) is not None
        out.wake += count if woke else 0
        done = False
        for fr in reversed(frames):
            for g, rx in areas:
                if rx.search(fr):
                    out.areas[g] += count
                    if not woke:
                        out.areas_x[g] += count
                    done = True
                    break
            if done:
                break
        joined = ";".join(frames)
        for g, rx in stages:
            if ";" in rx.pattern:
                hit = rx.search(joined) is not None
            else:
                hit = any(rx.search(fr) for fr in frames)
            if hit:
                out.stages[g] += count
                if not woke:
                    out.stages_x[g] += count
        out.leaves[re.sub(r":\d+\)$", ")", frames[-1])] += count
    return out


def table(s: Summary, us_per_reading: float | None = None, top: int = 12) -> list[str]:
    """Lines: self share per area, inclusive share per stage, the hottest leaves. Each
    share twice: of all samples, and of the samples not in a WAKE leaf (the closer
    estimate on a busy machine); with `us_per_reading` (the server's CPU µs per
    reading) the second also in µs."""
    if not s.samples:
        return ["  (no samples)"]
    kept = max(s.samples - s.wake, 1)

    def row(name: str, n: int, nx: int | None) -> str:
        share = n / s.samples
        if nx is None:
            return f"    {name:<52} {share:6.1%}"
        us = f"  {nx / kept * us_per_reading:7.1f} µs" if us_per_reading else ""
        return f"    {name:<52} {share:6.1%}  {nx / kept:6.1%}{us}"

    lines = [
        f"  {s.samples:,} samples, {s.wake / s.samples:.0%} in calls that wake or wait for"
        " another process (WAKE); share of all | of the rest, µs from the rest",
        "  self time by area:",
    ]
    lines += [row(g, n, s.areas_x[g]) for g, n in s.areas.most_common()]
    lines.append("  inclusive by stage (nested, overlapping):")
    lines += [row(g, s.stages[g], s.stages_x[g]) for g, _ in STAGES if s.stages[g]]
    lines.append(f"  hottest leaf functions (self, of all samples), top {top}:")
    lines += [row(g[:52], n, None) for g, n in s.leaves.most_common(top)]
    return lines


class PySpy:
    """py-spy recording one process into DIR/<name>.txt (raw collapsed stacks) for the
    span between start() and stop()."""

    def __init__(self, out: Path, pid: int, rate: int = 250) -> None:
        exe = shutil.which("py-spy") or str(Path(__import__("sys").executable).parent / "py-spy")
        if not Path(exe).exists():
            raise RuntimeError("--profile needs py-spy: .venv/bin/python -m pip install py-spy")
        self.exe, self.out, self.pid, self.rate = exe, out, pid, rate
        out.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None
        self.path: Path | None = None

    def start(self, name: str) -> None:
        self.path = self.out / f"{name}.txt"
        self.proc = _spawn(
            [
                self.exe,
                "record",
                "--pid",
                str(self.pid),
                "--rate",
                str(self.rate),
                "--nonblocking",
                "--format",
                "raw",
                "--output",
                str(self.path),
            ],
            self.out / f"{name}.py-spy.log",
        )

    def stop(self) -> Summary | None:
        proc, self.proc = self.proc, None
        path = _stop(proc, self.path)
        if path is None:
            return None
        if not path.exists():
            say(f"  py-spy wrote no {path.name} (see {path.stem}.py-spy.log)")
            return None
        return summarise(path)


def _spawn(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    """A recorder (py-spy, perf) in its own session, its output to `log`, ended with
    the bench if not before (procs.STARTED)."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    STARTED.append(proc)
    return proc


def _stop(proc: subprocess.Popen[bytes] | None, path: Path | None) -> Path | None:
    """End a recorder started to write `path` (SIGINT: py-spy and perf write their output
    on it), killed if it takes more than 30 s; `path` (written or not), or None if no
    recorder was started."""
    if proc is None or path is None:
        return None
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return path


# --- PostgreSQL's processes: perf ------------------------------------------------------

# PostgreSQL functions whose inclusive share says where a backend's CPU goes (perf's
# --children view; needs usable call chains, else only the self view is meaningful).
PG_ENTRIES: tuple[tuple[str, str], ...] = (
    ("parse/analyse/rewrite (unprepared)", "pg_analyze_and_rewrite_fixedparams"),
    ("plan: a prepared statement's plan (BuildCachedPlan)", "BuildCachedPlan"),
    ("plan: planner (any)", "standard_planner"),
    ("executor start (InitPlan, partitions, triggers)", "standard_ExecutorStart"),
    ("executor run", "standard_ExecutorRun"),
    ("executor finish (data-modifying CTEs run to the end)", "standard_ExecutorFinish"),
    ("  INSERT (ExecInsert)", "ExecInsert"),
    ("  ON CONFLICT DO UPDATE (ExecOnConflictUpdate)", "ExecOnConflictUpdate"),
    ("  speculative check (ExecCheckIndexConstraints)", "ExecCheckIndexConstraints"),
    ("  index insert (ExecInsertIndexTuples)", "ExecInsertIndexTuples"),
    ("  heap insert (heap_insert)", "heap_insert"),
    ("  partition routing (ExecFindPartition)", "ExecFindPartition"),
    ("  AFTER triggers (AfterTriggerEndQuery)", "AfterTriggerEndQuery"),
    ("  GROUP BY (ExecAgg)", "ExecAgg"),
    ("  sort (tuplesort_performsort)", "tuplesort_performsort"),
    ("executor end (ExecutorEnd)", "standard_ExecutorEnd"),
    ("WAL insert (XLogInsert)", "XLogInsert"),
    ("commit (CommitTransaction)", "CommitTransaction"),
    ("  WAL flush (XLogFlush)", "XLogFlush"),
    ("  NOTIFY at commit (AtCommit_Notify/PreCommit_Notify)", "PreCommit_Notify"),
    ("protocol read (pq_getbyte, secure_read)", "secure_read"),
    ("protocol write (secure_write)", "secure_write"),
    ("bind (exec_bind_message: parameters in)", "exec_bind_message"),
    ("array input (array_recv)", "array_recv"),
)


@dataclass
class PgProfile:
    self_syms: list[tuple[float, str]]  # (percent, symbol), perf's self view
    entries: list[tuple[str, float]]  # (name, inclusive percent) of PG_ENTRIES


def _perf_report(data: Path, children: bool) -> list[tuple[float, str]]:
    cmd = [
        "perf",
        "report",
        "-i",
        str(data),
        "--stdio",
        "--sort",
        "sym",
        "-g",
        "none",
        "--percent-limit",
        "0.3",
        "--children" if children else "--no-children",
    ]
    # the first percent is the sort's (children or self), the second perf's self
    return _perf_rows(cmd, r"^\s+([\d.]+)%\s+(?:[\d.]+%\s+)?\[[.k]\]\s+(.+?)\s*$")


def _perf_rows(cmd: list[str], row: str) -> list[tuple[float, str]]:
    """(percent, name) of each line of the perf report `cmd` prints that matches `row`
    (group 1 the percent, group 2 the name); none if perf fails or takes over 120 s."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    rx = re.compile(row)
    return [(float(m[1]), m[2]) for m in map(rx.match, out.splitlines()) if m]


def pg_summarise(data: Path) -> PgProfile:
    self_rows = _perf_report(data, children=False)
    incl = {sym: pct for pct, sym in _perf_report(data, children=True)}
    entries = [(name, incl.get(sym, 0.0)) for name, sym in PG_ENTRIES]
    return PgProfile(self_rows, entries)


def pg_table(p: PgProfile, us_per_reading: float | None, top: int = 15) -> list[str]:
    def row(name: str, pct: float) -> str:
        us = f"  {pct / 100 * us_per_reading:7.1f} µs" if us_per_reading else ""
        return f"    {name[:52]:<52} {pct / 100:6.1%}{us}"

    lines = ["  PostgreSQL (perf), inclusive by function (nested, overlapping):"]
    lines += [row(n, v) for n, v in p.entries if v >= 0.3]
    lines.append(f"  PostgreSQL (perf), hottest functions (self), top {top}:")
    lines += [row(sym, pct) for pct, sym in p.self_syms[:top]]
    return lines


def by_dso(data: Path) -> list[tuple[float, str]]:
    """perf's self samples by library (python, kernel, libpq, libssl, ...)."""
    cmd = ["perf", "report", "-i", str(data), "--stdio", "--sort", "dso", "--no-children"]
    cmd += ["-g", "none", "--percent-limit", "0.5"]
    return _perf_rows(cmd, r"^\s+([\d.]+)%\s+(\S.*?)\s*$")


class PgPerf:
    """`perf record` on PostgreSQL's processes (the postmaster and its children at
    start()) into DIR/<name>.pg.perf.data; with `label` another process tree (the
    server: native view, by library, to check what py-spy's samples were)."""

    def __init__(self, out: Path, postmaster: int, freq: int = 249, label: str = "pg") -> None:
        if shutil.which("perf") is None:
            raise RuntimeError("no perf on this machine")
        self.out, self.postmaster, self.freq, self.label = out, postmaster, freq, label
        self.proc: subprocess.Popen[bytes] | None = None
        self.path: Path | None = None

    def start(self, name: str) -> None:
        import psutil

        try:
            root = psutil.Process(self.postmaster)
            pids = [root.pid, *(c.pid for c in root.children(recursive=True))]
        except psutil.Error:
            return
        self.path = self.out / f"{name}.{self.label}.perf.data"
        self.proc = _spawn(
            [
                "perf",
                "record",
                "-F",
                str(self.freq),
                *(
                    ["--call-graph", "dwarf,16384"]  # PostgreSQL: no frame pointers
                    if self.label == "pg"
                    else []
                ),
                "-p",
                ",".join(map(str, pids)),
                "-o",
                str(self.path),
            ],
            self.out / f"{name}.{self.label}.perf.log",
        )

    def stop(self) -> PgProfile | None:
        proc, self.proc = self.proc, None
        path = _stop(proc, self.path)
        if path is None or not path.exists():
            return None
        if self.label != "pg":
            return PgProfile(by_dso(path), [])
        return pg_summarise(path)
