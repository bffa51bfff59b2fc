"""OpenSense restart benchmark: how long until every device is admitted again after a
server restart, and what it costs the server (issue 11, item 22; target < 60 s for
10,000 devices on 2 cores).

What it does, in one run against one database:

0. setup: one account, one site, N devices (default 10,000) with ds_live_ tokens
   hashed with bcrypt at cost 12, as in production. Making 10,000 cost-12 hashes would
   take ~40 CPU-minutes, so every token has its own key_id (the public half that
   finds the row) but the same 32-character secret and therefore the same stored
   hash. That is honest for what is measured: a bcrypt check costs the same for any
   (secret, hash) pair of a given cost, and the server's caches and fast checks are
   keyed by key_id, so no device profits from another's check. Rows are written with
   COPY (no audit rows: they play no part in authentication).
1. admission: `opensense serve` (a separate process, embedded broker on, jobs off)
   and every device's first request, `POST /v1/ingest` with one reading. Admitting
   10,000 devices for real would cost the same ~40 CPU-minutes of bcrypt, so the bench
   writes each token's fast check itself, with the server's own function
   (`opensense.tokens.fast_check`) and the key the server made in its state dir.
   Three devices are left without one: the server checks them with bcrypt and stores
   their fast checks, and the bench checks that those equal its own (so the shortcut
   stores exactly what the server would have).
2. baseline, today's behaviour: a restart with nothing kept (every fast check
   cleared) and bcrypt on 6 threads (asyncio's default pool on 2 cores, which is what
   main used); a sample of S devices (default 100) comes back, 7 at a time (6 running,
   1 waiting: every thread busy and no 503), and the time and server CPU are
   extrapolated to N. (All N would take 20+ minutes.) Main let up to the pool's 10
   requests wait, each holding a database connection, so its probe figure (below)
   was, if anything, worse.
3. re-admission over HTTP: the fast checks back in place, a restart with the shipped
   settings (OPENSENSE_BCRYPT_WORKERS=1), then all N devices send one request at
   client concurrency 64; time until every one got its 200, and the server's CPU.
4. re-admission over MQTT: another restart, then all N devices open a TLS connection
   to the embedded broker and send CONNECT (username = dev_ id, password = token,
   client id = dev_ id); time until every one got CONNACK 0, and the server's CPU.
   Each client disconnects after its CONNACK: the bench does not hold 10,000 sessions
   open (the load client is one Python process on the same 2 cores).

During 2 and 3 a probe device (admitted right after the restart) sends a reading
every 100 ms: its p50/p99 latency shows whether ingest starves meanwhile.

Figures only, never a verdict that fails the run: the closing block prints the
target next to the measured time (PASS/MISS) and each phase's ratio to the baseline.
The server, PostgreSQL and this load client share the machine's cores; each phase
prints who used the CPU.

    tools/bench/restart              # 10,000 devices (~3 min on 2 cores)
    tools/bench/restart --quick      # 50 devices, sample 4 (a smoke run)
    tools/bench/restart --devices 5000 --sample 50 --dsn postgresql://user@host/scratch
"""

from __future__ import annotations

import argparse
import asyncio
import os
import ssl
import statistics
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import bcrypt
import psutil

from _lib import pg, runner
from _lib.cpu import CpuMeter, CpuUse
from _lib.fleet import account_site
from _lib.procs import Serve, free_port, watched
from _lib.report import percentile, say, verdict
from opensense import tokens
from opensense.ids import new_id

COST = 12  # production's bcrypt cost
CONCURRENCY = 64
TODAY_WORKERS = 6  # asyncio's default executor on 2 cores: min(32, cores + 4)
TARGET_S = 60.0


@dataclass
class Plan:
    devices: int
    sample: int


FULL = Plan(devices=10_000, sample=100)
QUICK = Plan(devices=50, sample=4)


@dataclass
class Dev:
    id: str
    local_id: str
    key_id: str
    token: str


@dataclass
class Phase:
    name: str
    devices: int
    wall: float
    cpu: CpuUse
    ok: int
    retries: int = 0
    problems: dict[str, int] = field(default_factory=dict)
    probe_ms: list[float] = field(default_factory=list)

    def probe(self) -> str:
        if not self.probe_ms:
            return "probe: no answers"
        ms = sorted(self.probe_ms)
        return (
            f"probe device meanwhile: {len(ms)} readings, p50"
            f" {statistics.median(ms):.0f} ms, p99 {percentile(ms, 99):.0f} ms"
        )


def make_server(dsn: str, state: Path, log: Path) -> Serve:
    """`opensense serve` with the embedded broker, alarms off; restartable on the same
    ports."""
    mqtt_port = free_port()
    env = {
        "OPENSENSE_STATE_DIR": str(state),
        "OPENSENSE_INGEST_RATE_PER_MIN": "600",
        "OPENSENSE_ALARMS_ENABLED": "false",
        "OPENSENSE_MQTT": "embedded",
        "OPENSENSE_MQTT_HOST": "127.0.0.1",
        "OPENSENSE_MQTT_PORT": str(mqtt_port),
        "OPENSENSE_MQTT_HOSTNAMES": "localhost,127.0.0.1",
    }
    srv = Serve(dsn, log, env, mqtt_port=mqtt_port, ready_timeout=60)
    srv.env.pop("OPENSENSE_TOKEN_MAC_KEY", None)  # the key file in the state dir
    return srv


# --- setup ----------------------------------------------------------------------------


async def make_devices(dsn: str, n: int) -> tuple[list[Dev], Dev, float]:
    """N devices and a probe device, all with a cost-12 hash of one shared secret."""
    secret = tokens._rand(tokens.SECRET_LEN)
    t0 = time.process_time()
    hashed = bcrypt.hashpw(secret.encode(), bcrypt.gensalt(COST)).decode()
    hash_cpu = time.process_time() - t0
    prefix = tokens.PREFIXES["ds_live"]
    devs: list[Dev] = []
    async with await pg.connect(dsn) as conn:
        async with conn.transaction():
            acc, site = await account_site(conn, "Restart bench")
            now = datetime.now(UTC)
            for i in range(n + 1):
                key_id = tokens._rand(tokens.KEY_ID_LEN)
                local_id = f"node{i:05d}" if i < n else "probe"
                devs.append(Dev(new_id("dev"), local_id, key_id, f"{prefix}{key_id}_{secret}"))
            async with conn.cursor().copy(
                "COPY devices (id, account_id, site_id, local_id, name) FROM STDIN"
            ) as cp:
                for d in devs:
                    await cp.write_row((d.id, acc, site["id"], d.local_id, d.local_id))
            async with conn.cursor().copy(
                "COPY device_placements (device_id, site_id, effective_from) FROM STDIN"
            ) as cp:
                for d in devs:
                    await cp.write_row((d.id, site["id"], now))
            async with conn.cursor().copy(
                "COPY tokens (id, kind, key_id, hash, account_id, device_id) FROM STDIN"
            ) as cp:
                for d in devs:
                    await cp.write_row((new_id("tok"), "ds_live", d.key_id, hashed, acc, d.id))
    return devs[:n], devs[n], hash_cpu


def fast_checks(state: Path, devs: list[Dev], stored_hash: str) -> list[tuple[bytes, str]]:
    key = tokens.load_mac_key("", state)
    return [
        (tokens.fast_check(key, d.key_id, d.token.rsplit("_", 1)[1], stored_hash), d.key_id)
        for d in devs
    ]


async def write_fast_checks(dsn: str, rows: list[tuple[bytes, str]]) -> None:
    async with await pg.connect(dsn) as conn:
        async with conn.transaction():
            await conn.execute("CREATE TEMP TABLE fc (mac bytea, key_id text) ON COMMIT DROP")
            async with conn.cursor().copy("COPY fc (mac, key_id) FROM STDIN") as cp:
                for row in rows:
                    await cp.write_row(row)
            await conn.execute(
                "UPDATE tokens t SET fast_check = fc.mac FROM fc WHERE fc.key_id = t.key_id"
            )


async def clear_fast_checks(dsn: str, devs: list[Dev]) -> None:
    async with await pg.connect(dsn) as conn:
        await conn.execute(
            "UPDATE tokens SET fast_check = NULL WHERE key_id = ANY(%s)",
            ([d.key_id for d in devs],),
        )


async def stored_fast_checks(dsn: str, devs: list[Dev]) -> dict[str, bytes | None]:
    async with await pg.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT key_id, fast_check FROM tokens WHERE key_id = ANY(%s)",
            ([d.key_id for d in devs],),
        )
        return {r[0]: (bytes(r[1]) if r[1] is not None else None) for r in await cur.fetchall()}


# --- the load -------------------------------------------------------------------------


async def post_reading(http: aiohttp.ClientSession, base: str, d: Dev) -> tuple[int, float]:
    """One reading of the device by POST /v1/ingest: (status, Retry-After seconds)."""
    body = {"device": d.local_id, "measurements": [{"type": "temperature", "value": 4.0}]}
    headers = {"Authorization": f"Bearer {d.token}"}
    async with http.post(f"{base}/v1/ingest", json=body, headers=headers) as r:
        await r.read()
        return r.status, float(r.headers.get("Retry-After", "1"))


async def http_admit(base: str, devs: list[Dev], conc: int) -> tuple[int, int, dict[str, int]]:
    """Every device once, `conc` at a time; a 503 (bcrypt queue full) is retried after
    its Retry-After. Returns (admitted, retries, problems)."""
    todo = list(reversed(devs))
    ok = retries = 0
    problems: dict[str, int] = {}
    timeout = aiohttp.ClientTimeout(total=600)
    conn = aiohttp.TCPConnector(limit=conc)
    async with aiohttp.ClientSession(timeout=timeout, connector=conn) as http:

        async def worker() -> None:
            nonlocal ok, retries
            while todo:
                d = todo.pop()
                while True:
                    try:
                        status, wait = await post_reading(http, base, d)
                    except aiohttp.ClientError as exc:
                        problems[type(exc).__name__] = problems.get(type(exc).__name__, 0) + 1
                        break
                    if status == 503:
                        retries += 1
                        await asyncio.sleep(min(wait, 5.0))
                        continue
                    if status == 200:
                        ok += 1
                    else:
                        problems[str(status)] = problems.get(str(status), 0) + 1
                    break

        await asyncio.gather(*(worker() for _ in range(conc)))
    return ok, retries, problems


async def probe(base: str, d: Dev, stop: asyncio.Event, out: list[float]) -> None:
    """One admitted device sending a reading every 100 ms: ingest latency meanwhile."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                if (await post_reading(http, base, d))[0] == 200:
                    out.append((time.perf_counter() - t0) * 1000)
            except aiohttp.ClientError:
                pass
            try:
                await asyncio.wait_for(stop.wait(), 0.1)
            except TimeoutError:
                pass


def _mqtt_str(s: str) -> bytes:
    b = s.encode()
    return len(b).to_bytes(2, "big") + b


def _remaining(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def connect_packet(d: Dev) -> bytes:
    """MQTT 3.1.1 CONNECT: clean session, username and password, keepalive 60 s."""
    var = _mqtt_str("MQTT") + bytes([4, 0xC2]) + (60).to_bytes(2, "big")
    payload = _mqtt_str(d.id) + _mqtt_str(d.id) + _mqtt_str(d.token)
    body = var + payload
    return bytes([0x10]) + _remaining(len(body)) + body


async def mqtt_admit(
    port: int, ca: Path, devs: list[Dev], conc: int
) -> tuple[int, dict[str, int], list[float], list[float]]:
    """Every device once: TLS, CONNECT, CONNACK, DISCONNECT; `conc` at a time. Returns
    (admitted, problems, TLS handshake ms, CONNECT-to-CONNACK ms)."""
    ctx = ssl.create_default_context(cafile=str(ca))
    todo = list(reversed(devs))
    ok = 0
    problems: dict[str, int] = {}
    tls_ms: list[float] = []
    ack_ms: list[float] = []

    async def one(d: Dev) -> str:
        t0 = time.perf_counter()
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                "127.0.0.1", port, ssl=ctx, server_hostname="localhost", ssl_handshake_timeout=120
            ),
            180,
        )
        t1 = time.perf_counter()
        tls_ms.append((t1 - t0) * 1000)
        try:
            writer.write(connect_packet(d))
            await writer.drain()
            ack = await asyncio.wait_for(reader.readexactly(4), 180)
            ack_ms.append((time.perf_counter() - t1) * 1000)
            if ack[0] != 0x20:
                return f"packet {ack[0]:#x}"
            if ack[3] != 0:
                return f"CONNACK {ack[3]}"
            writer.write(b"\xe0\x00")  # DISCONNECT
            await writer.drain()
            return "ok"
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except (OSError, ssl.SSLError):
                pass

    async def worker() -> None:
        nonlocal ok
        while todo:
            d = todo.pop()
            try:
                res = await one(d)
            except (OSError, ssl.SSLError, asyncio.IncompleteReadError, TimeoutError) as exc:
                res = type(exc).__name__
            if res == "ok":
                ok += 1
            else:
                problems[res] = problems.get(res, 0) + 1

    await asyncio.gather(*(worker() for _ in range(conc)))
    return ok, problems, tls_ms, ack_ms


# --- the run --------------------------------------------------------------------------


async def timed_http(
    name: str,
    server: Serve,
    devs: list[Dev],
    probe_dev: Dev | None,
    pg_pid: int | None,
    conc: int = CONCURRENCY,
) -> Phase:
    meter = CpuMeter({"server": server.pid, "PostgreSQL": pg_pid}, "load client")
    stop = asyncio.Event()
    lat: list[float] = []
    task = asyncio.create_task(probe(server.base, probe_dev, stop, lat)) if probe_dev else None
    await asyncio.sleep(0.3 if task else 0)  # the probe is admitted before the storm
    lat.clear()
    meter.start()
    t0 = time.perf_counter()
    ok, retries, problems = await http_admit(server.base, devs, conc)
    wall = time.perf_counter() - t0
    cpu = meter.stop()
    stop.set()
    if task:
        await task
    return Phase(name, len(devs), wall, cpu, ok, retries, problems, lat)


def phase_lines(p: Phase) -> None:
    bad = f", problems {p.problems}" if p.problems else ""
    retry = f", {p.retries} retries after 503" if p.retries else ""
    say(
        f"  {p.ok:,}/{p.devices:,} admitted in {p.wall:.1f} s ({p.ok / max(p.wall, 1e-9):,.0f}/s);"
        f" server CPU {p.cpu.of('server'):.1f} s ({p.cpu.of('server') / max(p.devices, 1) * 1000:.2f} ms"
        f" a device){retry}{bad}"
    )
    say(f"    {p.cpu.line()}")
    if p.probe_ms or p.name.startswith(("baseline", "HTTP")):
        say(f"    {p.probe()}")


async def run(frame: runner.Frame, plan: Plan) -> None:
    dsn, work, pg_pid = frame.dsn, frame.work, frame.pg_pid
    t_start = time.perf_counter()
    say("setup")
    # migrated as the owner role; the server serves as the app role (it refuses a
    # superuser: db/roles.py), the bench's own setup keeps the superuser DSN
    app_dsn = await asyncio.to_thread(pg.serving_dsn, dsn)
    state = work / "state"
    state.mkdir()
    os.chmod(state, 0o755)  # as root the embedded PostgreSQL runs as its own user
    server = make_server(app_dsn, state, work / "server.log").start()
    with watched(server):
        t0 = time.perf_counter()
        devs, probe_dev, hash_cpu = await make_devices(dsn, plan.devices)  # while it starts
        say(
            f"  {plan.devices:,} devices (+1 probe) in {time.perf_counter() - t0:.1f} s; one"
            f" bcrypt cost-{COST} hash shared by all tokens (made in {hash_cpu:.2f} s of CPU)"
        )
        await server.wait_ready()
        async with await pg.connect(dsn) as conn:
            cur = await conn.execute("SELECT hash FROM tokens WHERE key_id = %s", (devs[0].key_id,))
            row = await cur.fetchone()
            assert row is not None
            stored_hash = row[0]
        computed = fast_checks(state, [*devs, probe_dev], stored_hash)
        await write_fast_checks(dsn, computed)
        witnesses = devs[:3]
        await clear_fast_checks(dsn, witnesses)

        say()
        say(f"[1] admission: {plan.devices:,} devices, one request each, concurrency {CONCURRENCY}")
        adm = await timed_http("admission", server, devs, None, pg_pid)
        phase_lines(adm)
        by_key = {k: m for m, k in computed}
        stored = await stored_fast_checks(dsn, witnesses)
        same = all(stored[d.key_id] == by_key[d.key_id] for d in witnesses)
        say(
            f"  the server's own fast checks for {len(witnesses)} devices checked by bcrypt"
            f" {'equal' if same else 'DIFFER FROM'} the bench's"
        )
        if not same:
            raise RuntimeError("the bench's fast checks are not the server's")

        say()
        sample = devs[: plan.sample]
        say(
            f"[2] baseline, today's behaviour: restart with nothing kept, bcrypt on"
            f" {TODAY_WORKERS} threads; a sample of {len(sample)} devices"
        )
        await clear_fast_checks(dsn, [*devs, probe_dev])
        await server.restart(OPENSENSE_BCRYPT_WORKERS=str(TODAY_WORKERS))
        # one client more than bcrypt threads: every thread busy, as on main, and no 503
        # (main had none: its requests waited, holding the pool's connections)
        base = await timed_http("baseline", server, sample, probe_dev, pg_pid, TODAY_WORKERS + 1)
        phase_lines(base)
        scale = plan.devices / max(base.ok, 1)
        base_wall, base_cpu = base.wall * scale, base.cpu.of("server") * scale
        say(
            f"  extrapolated to {plan.devices:,} devices: {base_wall:,.0f} s"
            f" ({base_wall / 60:.1f} min), server CPU {base_cpu:,.0f} s"
        )

        await write_fast_checks(dsn, computed)
        say()
        say(
            f"[3] re-admission over HTTP: restart (shipped settings), all {plan.devices:,}"
            f" devices, concurrency {CONCURRENCY}"
        )
        await server.restart()
        http_phase = await timed_http("HTTP", server, devs, probe_dev, pg_pid)
        phase_lines(http_phase)

        say()
        say(f"[4] re-admission over MQTT: restart, all {plan.devices:,} devices CONNECT over TLS")
        await server.restart()
        meter = CpuMeter({"server": server.pid, "PostgreSQL": pg_pid}, "load client")
        meter.start()
        t0 = time.perf_counter()
        ok, problems, tls_ms, ack_ms = await mqtt_admit(
            server.mqtt_port or 0, state / "mqtt-tls" / "ca.pem", devs, CONCURRENCY
        )
        mqtt_phase = Phase("MQTT", plan.devices, time.perf_counter() - t0, meter.stop(), ok)
        mqtt_phase.problems = problems
        phase_lines(mqtt_phase)
        pct = percentile
        say(
            f"    per connection: TLS handshake p50 {pct(tls_ms, 50):.0f} ms, p99"
            f" {pct(tls_ms, 99):.0f} ms; CONNECT to CONNACK p50 {pct(ack_ms, 50):.0f} ms,"
            f" p99 {pct(ack_ms, 99):.0f} ms"
        )

    say()
    say(f"summary: {plan.devices:,} devices re-admitted after a restart")
    say(f"  today (extrapolated from {base.ok}): {base_wall:,.0f} s, server CPU {base_cpu:,.0f} s")
    for p in (http_phase, mqtt_phase):
        say(
            f"  {p.name:<5} {p.wall:6.1f} s ({base_wall / max(p.wall, 1e-9):,.0f}x faster),"
            f" server CPU {p.cpu.of('server'):6.1f} s ({base_cpu / max(p.cpu.of('server'), 1e-9):,.0f}x less);"
            f" {p.ok:,}/{p.devices:,} admitted;"
            f" target < {TARGET_S:.0f} s: {verdict(p.ok == p.devices and p.wall < TARGET_S)}"
        )
    if base.probe_ms and http_phase.probe_ms:
        say(
            "  ingest meanwhile (probe p99): today"
            f" {percentile(sorted(base.probe_ms), 99):.0f} ms,"
            f" HTTP re-admission {percentile(sorted(http_phase.probe_ms), 99):.0f} ms"
        )
    say(f"bench finished in {time.perf_counter() - t_start:.0f} s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--dsn", help="PostgreSQL DSN of a scratch database (default: embedded)")
    ap.add_argument("--quick", action="store_true", help="50 devices, sample 4")
    ap.add_argument("--devices", type=int, help="devices re-admitted (default 10,000)")
    ap.add_argument("--sample", type=int, help="devices of the cold-bcrypt baseline (default 100)")
    args = ap.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.devices:
        plan = Plan(args.devices, min(plan.sample, args.devices))
    if args.sample:
        plan = Plan(plan.devices, min(args.sample, plan.devices))

    async def body(frame: runner.Frame) -> None:
        say(
            f"OpenSense restart benchmark{' (--quick)' if args.quick else ''},"
            f" {datetime.now(UTC):%Y-%m-%d %H:%M:%S}Z"
        )
        say(f"  database: {pg.describe(frame.dsn, frame.embedded)}")
        say(
            f"  machine: {psutil.cpu_count()} cores shared by PostgreSQL, the server and this"
            f" load client; load average before start {os.getloadavg()[0]:.2f}"
        )
        say(
            f"  {plan.devices:,} devices, bcrypt cost {COST}, baseline sample {plan.sample};"
            f" target: all re-admitted in < {TARGET_S:.0f} s"
        )
        say()
        await run(frame, plan)

    return runner.run("restart", args.dsn, body)


if __name__ == "__main__":
    sys.exit(main())
