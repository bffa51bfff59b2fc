"""OpenSense MQTT benchmark: each broker alone, then end to end into the database.

What it measures (in this order in the summary):

1. Each broker alone, no OpenSense server: the broker in a process of its own, paho
   publishers (QoS 1, TLS with the CA verified, as nodes connect; 20 messages in
   flight each, closed loop) and one paho subscriber (`bench/#`, QoS 1, on a
   plain-TCP loopback listener, as the server reaches Mosquitto in deploy/mosquitto).
   Messages/s PUBACKed to the publishers and delivered to the subscriber, with the
   payload of a 32-reading measurement message (~2.5 KB) and of a 1-reading one
   (~90 B); publish->PUBACK latency alongside. "Delivered" is the broker's rate.
   - amqtt: the embedded broker's library, plain (anonymous authentication, none of
     the OpenSense plugins), a TLS listener with a certificate of the OpenSense CA
     and a plain one.
   - Mosquitto: the installed one with a minimal config (anonymous, 127.0.0.1 only,
     no persistence; max_queued_messages raised as in the shipped config, so a slow
     subscriber is not silently dropped messages).
2. End to end, readings/s into PostgreSQL: `opensense serve` as a separate process
   (jobs off), N devices as node-like paho clients (username = dev_ id, password =
   ds_live_ token, TLS with the OpenSense CA verified, QoS 1, 20 in flight each)
   publishing measurement messages of 32 and of 1 reading, every reading new (its
   own channel and timestamp: nothing is deduplicated). One warm-up message per
   device (it creates the channels) is in the database before the window opens.
   - embedded: OPENSENSE_MQTT=embedded; the broker stores before it acknowledges,
     so a PUBACK means committed and PUBACKed messages/s is the end-to-end rate.
   - Mosquitto: OPENSENSE_MQTT=external with the shipped deploy/mosquitto config,
     set up by its bootstrap.sh into a temporary root (as tests/fixtures/mosquitto.py
     does) with the two listeners moved to free ports; the server consumes over the
     plain loopback listener with the account bootstrap.sh made, and the devices are
     made through POST /v1/devices, so the server gives the broker their
     credentials. Mosquitto acknowledges before the server has the message, so a
     closed loop would only fill Mosquitto's queue: the publishers get credit to
     keep about one second of the server's rate queued, and the rate is counted in
     the database (rows at both ends of the window). --no-pace drops the credit:
     the publishers run closed loop as in the embedded phases, Mosquitto's queue to
     the server grows, and the phase shows how the server copes with a backlog (as
     after an outage).
   Every phase ends with a check: once the server caught up, the phase's rows are
   exactly the PUBACKed messages x readings per message.
3. The ratio of each end-to-end rate to that broker's own (messages/s, same
   payload), and what the embedded broker sustains in nodes at one reading a minute.

The issue's target (on 2 cores): Mosquitto end to end >= 50 % of Mosquitto's own
QoS 1 rate, printed with PASS/MISS per payload. A miss is reported, never fatal: the
exit status is 0 unless the run itself broke (a failed Mosquitto part is not a
break: deploy/mosquitto, mosquitto or OPENSENSE_MQTT=external may be missing or
failing; it says "not measured: <reason>" and the run goes on).

Everything shares the machine's cores: the broker, the server, PostgreSQL and the
load (publisher and subscriber processes, _lib/mqtt_worker.py). Each phase
prints who used the CPU, and the server's memory end to end; a busy "rest of
machine" means other work was running and the figures are low. The clients are
Python: against Mosquitto they, not the broker, are the limit of "alone" (the CPU
line shows it), so Mosquitto's own figure is a floor. Latencies are those of a closed
loop that keeps every window full (about devices x 20 / rate), not a node's wait at
its normal pace.

    tools/bench/mqtt              # full run, about 2 minutes on 2 cores
    tools/bench/mqtt --quick      # smoke run: 4 devices, the 32-reading payload only
    tools/bench/mqtt --duration 5 --devices 16
    tools/bench/mqtt --logs /tmp/mqtt-bench-logs   # keep server, broker and worker logs
    tools/bench/mqtt --no-pace    # Mosquitto end to end unpaced: the server facing a backlog
    tools/bench/mqtt --dsn postgresql://user@host/scratch   # leaves its accounts there
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from _lib import pg, runner
from _lib.brokers import MOSQUITTO, OwnBroker, TlsPaths, mosquitto_version, shipped_with_server
from _lib.cpu import CpuMeter
from _lib.fleet import MqttFleet, fleet_by_api, fleet_by_service
from _lib.mqtt_load import (
    DB_DRAIN_S,
    Load,
    Progress,
    RowCounter,
    RssWatch,
    Worker,
    drive,
    payload_name,
    split,
    wait_rows,
)
from _lib.mqtt_worker import ACK_DRAIN_S
from _lib.procs import Serve, free_port, watched
from _lib.report import banner, fmt, say, verdict

TARGET_SHARE = 0.5  # Mosquitto end to end, as a share of Mosquitto's own QoS 1 rate


@dataclass(frozen=True)
class Plan:
    duration: float  # seconds per measured window
    warm: float  # seconds of publishing before the window opens
    broker_clients: int  # publishers in the broker's own phases
    devices: int  # node-like publishers end to end
    workers: int  # publisher processes (the clients are split among them)
    window: int  # QoS 1 messages in flight per client
    sizes: tuple[int, ...] = (32, 1)  # readings per message
    pace: bool = True  # Mosquitto end to end: credit-paced publishers (see pace)


FULL = Plan(duration=10.0, warm=1.5, broker_clients=8, devices=32, workers=2, window=20)
# --quick: one payload (32 readings), short windows: a smoke run of every part
QUICK = Plan(duration=1.5, warm=0.5, broker_clients=2, devices=4, workers=1, window=20, sizes=(32,))


# --- 1. the brokers alone ---------------------------------------------------------------


@dataclass
class BrokerOwn:
    broker: str
    load: Load
    delivered_window: int = 0
    delivered_total: int = 0
    note: str = ""

    @property
    def delivered_s(self) -> float:
        return self.delivered_window / self.load.duration


OWN_HEAD = "  payload                published/s  delivered/s  PUBACK p50 ms  p99 ms  messages"


def own_line(r: BrokerOwn) -> str:
    ld = r.load
    return (
        f"  {payload_name(ld):<22} {fmt(ld.acked_s):>11}  {fmt(r.delivered_s):>11}"
        f"  {fmt(ld.ms(50), 1):>13}  {fmt(ld.ms(99), 1):>6}  {ld.acked:>8,}"
        + (f"  {r.note}" if r.note else "")
    )


def publishers(
    conf: dict[str, Any], specs: list[dict[str, Any]], plan: Plan, work: Path
) -> list[Worker]:
    """The clients split among plan.workers publisher processes."""
    return [
        Worker("pub", {**conf, "window": plan.window, "clients": part}, work / "pub.log")
        for part in split(specs, plan.workers)
    ]


async def broker_own(
    name: str, work: Path, tls: TlsPaths, plan: Plan, meter: CpuMeter
) -> list[BrokerOwn]:
    broker = OwnBroker(name, work, tls.cert, tls.key)
    out = []
    try:
        await broker.wait_ready()
        say(OWN_HEAD)
        for k in plan.sizes:
            specs = [
                {"client_id": f"bench-pub-{i}", "topic": f"bench/{i}"}
                for i in range(plan.broker_clients)
            ]
            conf = {"host": "127.0.0.1", "port": broker.tls_port, "ca": str(tls.ca), "k": k}
            pubs = publishers(conf, specs, plan, work)
            sub = Worker(
                "sub",
                {"host": "127.0.0.1", "port": broker.plain_port, "topic": "bench/#"},
                work / "sub.log",
            )
            try:
                load, _, _ = await drive(
                    pubs,
                    k,
                    plan.warm,
                    plan.duration,
                    meter,
                    {f"{name} broker": [broker.proc.pid]},
                    sub=sub,
                )
                sub.send(f"STOP {load.acked}")
                r = await sub.result(30)
            finally:
                for w in [*pubs, sub]:
                    await w.stop()
            res = BrokerOwn(name, load, int(r["in_window"]), int(r["total"]))
            if res.delivered_total < load.acked:
                res.note = f"{load.acked - res.delivered_total:,} PUBACKed but never delivered"
            out.append(res)
            say(own_line(res))
            if load.cpu:
                say(f"      {load.cpu.line()}")
    finally:
        broker.stop()
    return out


# --- 2. end to end ------------------------------------------------------------------------


@dataclass
class EndToEnd:
    broker: str
    load: Load
    devices: int
    rows: int  # committed inside the measured window
    seconds: float  # between the two counts
    caught_up_s: float  # after the window closed, until every PUBACKed reading was in
    check: str
    ok: bool

    @property
    def readings_s(self) -> float:
        return self.rows / self.seconds if self.seconds else math.nan

    @property
    def msgs_s(self) -> float:
        return self.readings_s / self.load.k


E2E_HEAD = (
    "  payload                PUBACKed msg/s  committed msg/s  readings/s"
    "  PUBACK p50 ms  p99 ms  check"
)


def e2e_line(r: EndToEnd, last: str | None = None) -> str:
    ld = r.load
    return (
        f"  {payload_name(ld):<22} {fmt(ld.acked_s):>14}  {fmt(r.msgs_s):>15}"
        f"  {fmt(r.readings_s):>10}  {fmt(ld.ms(50), 1):>13}  {fmt(ld.ms(99), 1):>6}"
        f"  {r.check if last is None else last}"
    )


async def end_to_end(
    name: str,
    dsn: str,
    fleet: MqttFleet,
    port: int,
    ca: Path,
    plan: Plan,
    meter: CpuMeter,
    roles: dict[str, list[int]],
    work: Path,
) -> list[EndToEnd]:
    out = []
    say(E2E_HEAD)
    for k in plan.sizes:
        count = RowCounter(dsn, fleet.account, fleet.base)
        paced = name != "embedded" and plan.pace
        conf = {"host": "127.0.0.1", "port": port, "ca": str(ca), "k": k, "warm": True}
        conf["paced"] = paced
        pubs = publishers(conf, fleet.specs(), plan, work)
        progress = Progress(count, fleet) if paced else None

        rss = RssWatch(next(iter(roles.values()))[0])  # the server's, the first role
        try:
            rows0 = await count()
            # the warm-up messages (one per device; they create the channels) are in
            # before the window opens: with Mosquitto the PUBACK came earlier
            settle = functools.partial(wait_rows, count, rows0 + len(fleet.ids) * k)
            rss.start()
            load, first, last = await drive(
                pubs,
                k,
                plan.warm,
                plan.duration,
                meter,
                roles,
                count=count,
                progress=progress,
                settle=settle,
            )
            rss.stop()
            assert first is not None and last is not None
            fleet.base += max(load.sent.values(), default=0) + 15
            expected = rows0 + load.acked * k
            # the server catches up with what the broker acknowledged (Mosquitto: the
            # queue of the server's session); stop waiting when nothing moves
            final, moved = await count(), time.monotonic()
            deadline = time.monotonic() + DB_DRAIN_S
            while final < expected and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
                now_rows = await count()
                if now_rows != final:
                    final, moved = now_rows, time.monotonic()
                elif time.monotonic() - moved > 10:
                    break
            caught = time.perf_counter() - last[0]
        finally:
            for w in pubs:
                await w.stop()
            await count.close()
            rss.stop()
        new = final - rows0
        extra = new - load.acked * k
        ok = 0 <= extra <= load.unacked * k  # unacknowledged ones may be stored too
        if extra == 0:
            check = f"{new:,} rows = {load.acked:,} PUBACKed x {k}"
        elif ok:
            check = f"{new:,} rows = {load.acked:,} PUBACKed x {k} + {extra} of unPUBACKed ones"
        elif extra < 0:
            check = (
                f"INCOMPLETE: {new:,} rows of {load.acked:,} PUBACKed x {k}"
                f" {caught:.0f} s after the window (the server stopped catching up)"
            )
        else:
            check = f"MISMATCH: {new:,} new rows for {load.acked:,} PUBACKed x {k}"
        if load.unacked:
            check += f"; {load.unacked} without PUBACK {ACK_DRAIN_S:.0f} s after the window"
        if load.out_of_ts:
            check += f"; {load.out_of_ts} device(s) ran out of timestamps"
        if name != "embedded":
            check += "; paced" if paced else "; NOT paced (--no-pace)"
            if extra >= 0:
                check += f"; the server caught up {max(0.0, caught):.1f} s after the window"
        r = EndToEnd(
            name, load, len(fleet.ids), last[1] - first[1], last[0] - first[0], caught, check, ok
        )
        out.append(r)
        say(e2e_line(r))
        if load.cpu:
            say(f"      {load.cpu.line()}; server memory {rss.line()}")
    return out


async def embedded_e2e(
    dsn: str, work: Path, plan: Plan, meter: CpuMeter, rounds: int, pg_pid: int | None
) -> list[EndToEnd]:
    state = work / "state-embedded"
    state.mkdir()
    os.chmod(state, 0o755)
    mqtt_port = free_port()
    env = {
        "OPENSENSE_MQTT": "embedded",
        "OPENSENSE_MQTT_HOST": "127.0.0.1",
        "OPENSENSE_MQTT_PORT": str(mqtt_port),
        "OPENSENSE_MQTT_HOSTNAMES": "localhost,127.0.0.1",
        "OPENSENSE_STATE_DIR": str(state),
        "OPENSENSE_BCRYPT_ROUNDS": str(rounds),
        # the embedded broker counts each measurement publish against the device's
        # ingest limit (60 a minute in the product); the bench measures throughput
        "OPENSENSE_INGEST_RATE_PER_MIN": "1000000000",
    }
    server = Serve(dsn, work / "server-embedded.log", env, mqtt_port=mqtt_port).start()
    with watched(server):
        t0 = time.perf_counter()
        fleet = await fleet_by_service(dsn, plan.devices, rounds, "MQTT bench, embedded")
        await server.wait_ready()
        say(
            f"  server up (embedded broker, TLS on 127.0.0.1:{mqtt_port}), {plan.devices}"
            f" devices made in {time.perf_counter() - t0:.1f} s"
        )
        roles = {"server + broker": [server.pid], **({"PostgreSQL": [pg_pid]} if pg_pid else {})}
        ca = state / "mqtt-tls" / "ca.pem"
        return await end_to_end("embedded", dsn, fleet, mqtt_port, ca, plan, meter, roles, work)


async def external_e2e(
    dsn: str, work: Path, plan: Plan, meter: CpuMeter, rounds: int, pg_pid: int | None
) -> list[EndToEnd]:
    env = {"OPENSENSE_BCRYPT_ROUNDS": str(rounds)}
    async with shipped_with_server(work, dsn, env) as (mosq, server):
        t0 = time.perf_counter()
        fleet = await fleet_by_api(dsn, server.base, plan.devices, rounds, "MQTT bench, Mosquitto")
        say(
            f"  Mosquitto (shipped config, TLS on 127.0.0.1:{mosq.tls_port}, the server on the"
            f" loopback listener {mosq.local_port}) and the server up; {plan.devices} devices"
            f" made through POST /v1/devices in {time.perf_counter() - t0:.1f} s"
        )
        assert mosq.proc is not None
        roles = {"server": [server.pid], "Mosquitto": [mosq.proc.pid]}
        if pg_pid:
            roles["PostgreSQL"] = [pg_pid]
        return await end_to_end(
            "Mosquitto", dsn, fleet, mosq.tls_port, mosq.ca, plan, meter, roles, work
        )


# --- the run ------------------------------------------------------------------------------


@dataclass
class Results:
    own: dict[str, list[BrokerOwn]] = field(default_factory=dict)
    e2e: dict[str, list[EndToEnd]] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)  # part -> why it was not measured
    broke: bool = False  # a part other than the external broker failed


BROKERS = (("amqtt", "embedded"), ("Mosquitto", "Mosquitto"))  # own broker, end-to-end name


def by_k(rows: list[Any], k: int) -> Any | None:
    return next((r for r in rows if r.load.k == k), None)


def report(res: Results, plan: Plan) -> None:
    banner("SUMMARY")
    say(
        f"1. Each broker alone, no server: QoS 1, {plan.broker_clients} paho publishers"
        f" ({plan.window} in flight each) over TLS with the CA verified -> 1 paho subscriber"
        f" (bench/#, plain TCP on 127.0.0.1), {plan.duration:g} s window"
    )
    say("   broker     " + OWN_HEAD.strip())
    for own, _ in BROKERS:
        if f"own:{own}" in res.missing:
            say(f"   {own:<10} not measured: {res.missing[f'own:{own}']}")
        for o in res.own.get(own, []):
            say(f"   {own:<10}" + own_line(o)[1:])
    say()
    say(
        f"2. End to end into PostgreSQL: {plan.devices} devices (dev_ id + ds_live_ token,"
        f" TLS with the CA verified, QoS 1, {plan.window} in flight each), every reading new"
    )
    say(
        "   broker     "
        + E2E_HEAD.strip().replace("  check", "  of the broker alone: delivered | PUBACKed")
    )
    for own, name in BROKERS:
        if f"e2e:{name}" in res.missing:
            say(f"   {name:<10} not measured: {res.missing[f'e2e:{name}']}")
        for e in res.e2e.get(name, []):
            base: BrokerOwn | None = by_k(res.own.get(own, []), e.load.k)
            ratio = "n/a"
            if base and base.delivered_s and base.load.acked_s:
                ratio = (
                    f"{e.msgs_s / base.delivered_s:6.0%} | {e.msgs_s / base.load.acked_s:4.0%}"
                    f"  ({fmt(e.msgs_s)} msg/s of {fmt(base.delivered_s)} | {fmt(base.load.acked_s)})"
                )
            say(f"   {name:<10}" + e2e_line(e, ratio)[1:])
    for _, name in BROKERS:
        for e in res.e2e.get(name, []):
            say(f"   {name}, {e.load.k} per message: {e.check}")
    say(
        "   Embedded: a PUBACK means committed. Mosquitto: a PUBACK means the broker has it;"
        " the committed rate is counted in the database over the window, and the publishers"
        " are held back while the server lags (so PUBACKed msg/s is not a capacity there)."
    )
    say(
        "   Latency is of a closed loop: about (devices x in flight) / rate, a queue the bench"
        " keeps full, not a node's wait at its normal pace."
    )
    say(
        "   The ratio is in messages/s against the same payload through the broker alone:"
        " delivered to its subscriber (the issue's measure) | PUBACKed to its publishers."
        " The embedded broker end to end only receives (it stores instead of forwarding),"
        " so for it the PUBACKed rate is the fairer base; Mosquitto end to end forwards to"
        " the server like to the subscriber."
    )
    say()
    emb = res.e2e.get("embedded", [])
    say("3. What the embedded broker sustains, in nodes at one reading a minute")
    one: EndToEnd | None = by_k(emb, 1)
    batch: EndToEnd | None = by_k(emb, 32)
    if one is not None:
        say(
            f"   1 reading per message:   {fmt(one.readings_s):>7} readings/s x 60 ="
            f" {fmt(one.readings_s * 60)} nodes"
        )
    if batch is not None:
        say(
            f"   32 readings per message: {fmt(batch.readings_s):>7} readings/s x 60 ="
            f" {fmt(batch.readings_s * 60)} nodes sending 32 readings at a time"
            f" (or {fmt(batch.readings_s * 60 / 32)} nodes with 32 channels, one message a minute)"
        )
    if one is None and batch is None:
        say(f"   not measured: {res.missing.get('e2e:embedded', 'no end-to-end figures')}")
    say()
    say("TARGETS (from the issue; a MISS is reported, never fatal)")
    own_m, e2e_m = res.own.get("Mosquitto", []), res.e2e.get("Mosquitto", [])
    for k in plan.sizes:
        what = f"Mosquitto end to end >= {TARGET_SHARE:.0%} of its own QoS 1 rate, {k:>2} per msg"
        alone: BrokerOwn | None = by_k(own_m, k)
        through: EndToEnd | None = by_k(e2e_m, k)
        if alone is None or through is None or not alone.delivered_s:
            why = (
                res.missing.get("e2e:Mosquitto") or res.missing.get("own:Mosquitto") or "no figure"
            )
            say(f"  {what}  not measured: {why}")
            continue
        share = through.msgs_s / alone.delivered_s
        say(
            f"  {what}  {share:.0%} ({fmt(through.msgs_s)} of {fmt(alone.delivered_s)} msg/s)"
            f"  {verdict(share >= TARGET_SHARE)}"
        )


async def run(frame: runner.Frame, plan: Plan, rounds: int, logs: Path | None) -> int:
    from opensense.mqtt.ca import ensure_tls

    t_start = time.perf_counter()
    work = frame.work
    res = Results()
    meter = CpuMeter()
    files = ensure_tls(work / "tls", ["localhost", "127.0.0.1"])
    tls = TlsPaths(files.ca_cert, files.server_cert, files.server_key)
    try:
        for own, label in (("amqtt", "amqtt (plain, anonymous)"), ("Mosquitto", "Mosquitto")):
            say()
            say(
                f"[1] {label} alone: {plan.broker_clients} publishers over TLS -> 1 subscriber,"
                f" {plan.duration:g} s window after {plan.warm:g} s warm-up"
            )
            got = await runner.part(
                res, f"own:{own}", own == "amqtt", broker_own(own, work, tls, plan, meter)
            )
            if got is not None:
                res.own[own] = got

        say()
        say(f"[2] database: {pg.describe(frame.dsn, frame.embedded)}")
        # the servers connect as the app role (they refuse a superuser): db/roles.py
        dsn = await asyncio.to_thread(pg.serving_dsn, frame.dsn)
        say()
        say(f"[2] end to end through the embedded broker: {plan.devices} devices")
        e2e = embedded_e2e(dsn, work, plan, meter, rounds, frame.pg_pid)
        through = await runner.part(res, "e2e:embedded", True, e2e)
        if through is not None:
            res.e2e["embedded"] = through
        say()
        say("[2] end to end through Mosquitto (deploy/mosquitto, OPENSENSE_MQTT=external)")
        e2e = external_e2e(dsn, work, plan, meter, rounds, frame.pg_pid)
        through = await runner.part(res, "e2e:Mosquitto", False, e2e)
        if through is not None:
            res.e2e["Mosquitto"] = through
        report(res, plan)
        say()
        say(f"bench finished in {time.perf_counter() - t_start:.0f} s")
    finally:
        if logs:
            keep_logs(work, logs)
    return 1 if res.broke else 0


def cli(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--dsn", help="PostgreSQL DSN of a scratch database (default: embedded)")
    ap.add_argument("--duration", type=float, help="seconds per measured window")
    ap.add_argument("--devices", type=int, help="node-like publishers end to end")
    ap.add_argument("--quick", action="store_true", help="smoke run with tiny sizes")
    ap.add_argument("--logs", type=Path, help="keep the servers', brokers' and workers' logs here")
    ap.add_argument(
        "--no-pace",
        action="store_true",
        help="Mosquitto end to end: closed loop like the embedded phases, so Mosquitto's"
        " queue to the server grows (how the server copes with a backlog)",
    )
    args = ap.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.duration:
        plan = dataclasses.replace(plan, duration=args.duration)
    if args.devices:
        plan = dataclasses.replace(plan, devices=args.devices)
    if args.no_pace:
        plan = dataclasses.replace(plan, pace=False)
    # token hashing cost does not change throughput (a checked token is cached after
    # its first CONNECT) but makes device creation slow; the environment may set it
    rounds = int(os.environ.get("OPENSENSE_BCRYPT_ROUNDS", "4"))
    say(
        f"OpenSense MQTT benchmark{' (--quick)' if args.quick else ''},"
        f" {datetime.now(UTC):%Y-%m-%d %H:%M:%S}Z"
    )
    say(
        f"  machine: {psutil.cpu_count()} cores shared by the broker, the server, PostgreSQL"
        f" and the load (publisher and subscriber processes); load average before start"
        f" {os.getloadavg()[0]:.2f}"
    )
    say(
        f"  load: paho-mqtt clients in {plan.workers} publisher process(es), QoS 1, a window"
        f" of {plan.window} unacknowledged messages per client (closed loop); payloads are"
        f" node measurement messages of {' and '.join(str(k) for k in plan.sizes)} reading(s)"
    )
    say(f"  {MOSQUITTO}: {mosquitto_version()}")
    return runner.run("mqtt", args.dsn, lambda frame: run(frame, plan, rounds, args.logs))


def keep_logs(work: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for f in [*work.glob("*.log"), *work.glob("*.stderr"), *work.glob("mosquitto-root/**/*.log")]:
        shutil.copy(f, dest / (f.name if f.parent == work else f"shipped-{f.name}"))
    say(f"logs kept in {dest}")


if __name__ == "__main__":
    sys.exit(cli())
