"""OpenSense paho loop benchmark (issue 14): what the external consumer's network loop
costs the server a message, paho in a thread of its own (as mqtt/external.py ran it
until stop 30: `loop_start`, each message handed to the event loop with
call_soon_threadsafe) against paho driven by the event loop (`_PahoLoop` of
mqtt/external.py, as it runs now), in the same run.

A broker of the bench's own (Mosquitto on a free port, plain TCP, anonymous; amqtt
when there is no Mosquitto). For each way, a subscriber process (uvloop as the server,
MQTT 5, QoS 1, manual acknowledgement sent from the event loop after the message was
handed to it, as the consumer does) and a paho publisher process sending N 3-reading
messages at R a second. The subscriber measures its own CPU (getrusage) from its
first message to its last: µs a message. Rounds alternate between the ways; each
way's figure is its median round. The rest of the server (storage, rule engine) is
not in it: tools/bench/fleet measures the whole, where this difference is below the
noise of a two-point line.

    tools/bench/paholoop            # 6,000 messages at 1,000/s, 3 rounds a way (~45 s)
    tools/bench/paholoop --quick    # 600 messages, 1 round a way (a smoke run)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _lib.procs import free_port, stop_popen  # noqa: E402
from _lib.rounds import alternate  # noqa: E402

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
PAYLOAD = b'{"measurements":[{"v":4.25,"ts":1},{"v":3.5,"ts":1},{"v":-18.0,"ts":1}]}'
WAYS = ("thread", "loop")


def subscribe(way: str, port: int, n: int) -> None:
    """The subscriber (a process of its own): prints `cpu_us_per_msg <x>`."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from opensense.mqtt.external import _PahoLoop

    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass

    async def main() -> None:
        loop = asyncio.get_running_loop()
        done, ready = asyncio.Event(), asyncio.Event()
        count = [0]  # messages handed to the loop
        start: list[resource.struct_rusage] = []  # the CPU at the first one
        c = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"bench-{way}",
            protocol=mqtt.MQTTv5,
            manual_ack=True,
        )

        def handle(mid: int, qos: int) -> None:  # on the event loop, as the consumer's
            if not start:
                start.append(resource.getrusage(resource.RUSAGE_SELF))
            count[0] += 1
            c.ack(mid, qos)
            if count[0] >= n:
                done.set()

        def on_message(cl: mqtt.Client, u: object, m: mqtt.MQTTMessage) -> None:
            payload = bytes(m.payload)  # (the consumer copies it too)
            del payload
            if way == "thread":
                loop.call_soon_threadsafe(handle, m.mid, m.qos)
            else:
                loop.call_soon(handle, m.mid, m.qos)

        def on_connect(cl: mqtt.Client, u: object, f: object, rc: object, p: object) -> None:
            cl.subscribe("bench/#", qos=1)

        def on_subscribe(cl: mqtt.Client, u: object, mid: int, codes: object, p: object) -> None:
            loop.call_soon_threadsafe(ready.set)

        c.on_message, c.on_connect, c.on_subscribe = on_message, on_connect, on_subscribe
        c.connect_async("127.0.0.1", port, keepalive=30)
        driver = None
        if way == "thread":
            c.loop_start()
        else:
            driver = _PahoLoop(c, loop)
            driver.start()
        await ready.wait()
        print("ready", flush=True)
        await done.wait()
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        r0 = start[0]
        cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
        print(f"cpu_us_per_msg {cpu * 1e6 / (count[0] - 1):.1f}", flush=True)
        if driver is not None:
            await driver.stop()
        else:
            c.disconnect()
            c.loop_stop()

    asyncio.run(main())


def publish(port: int, n: int, rate: float) -> None:
    """The publisher (a process of its own): n QoS 1 messages at `rate` a second."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-pub", protocol=mqtt.MQTTv5)
    c.max_inflight_messages_set(200)
    c.connect("127.0.0.1", port, 30)
    c.loop_start()
    t0 = time.perf_counter()
    infos = []
    for i in range(n):
        infos.append(c.publish(f"bench/{i % 100}", PAYLOAD, qos=1))
        wait = t0 + (i + 1) / rate - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
    for info in infos:
        info.wait_for_publish(10)
    c.disconnect()
    c.loop_stop()


def start_broker(work: Path) -> tuple[subprocess.Popen[bytes], int, str]:
    port = free_port()
    log = open(work / "broker.log", "wb")  # noqa: SIM115 (the broker's lifetime)
    if Path(MOSQUITTO).exists():
        conf = work / "mosquitto.conf"
        lines = ["allow_anonymous true", "persistence false", f"listener {port} 127.0.0.1"]
        if os.geteuid() == 0:
            lines.append("user root")
        conf.write_text("\n".join(lines) + "\n")
        cmd, name = [MOSQUITTO, "-c", str(conf)], "Mosquitto"
    else:
        from _lib.brokers import AMQTT_SCRIPT

        config = json.dumps(
            {
                "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
                "plugins": {
                    "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
                },
            }
        )
        cmd, name = [sys.executable, "-c", AMQTT_SCRIPT, config], "amqtt"
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 15
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, port, name
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"the bench's broker did not start: {cmd}") from None
            time.sleep(0.05)


def one_round(way: str, port: int, n: int, rate: float) -> float:
    me = [sys.executable, str(Path(__file__).resolve())]
    sub = subprocess.Popen(
        [*me, "--sub", way, "--port", str(port), "--n", str(n)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert sub.stdout is not None
    line = sub.stdout.readline()
    if line.strip() != "ready":
        sub.kill()
        raise RuntimeError(f"the {way} subscriber did not start: {line!r}")
    subprocess.run(
        [*me, "--pub", "--port", str(port), "--n", str(n), "--rate", str(rate)],
        check=True,
        timeout=n / rate + 60,
    )
    out, _ = sub.communicate(timeout=60)
    for ln in out.splitlines():
        if ln.startswith("cpu_us_per_msg "):
            return float(ln.split()[1])
    raise RuntimeError(f"the {way} subscriber printed no figure: {out!r}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 600 messages, 1 round")
    ap.add_argument("--n", type=int, help="messages a round (default 6,000)")
    ap.add_argument("--rate", type=float, default=1000.0, help="messages a second")
    ap.add_argument("--rounds", type=int, help="rounds a way (default 3)")
    ap.add_argument("--sub", choices=WAYS, help=argparse.SUPPRESS)
    ap.add_argument("--pub", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    n = args.n or (600 if args.quick else 6000)
    if args.sub:
        subscribe(args.sub, args.port, n)
        return 0
    if args.pub:
        publish(args.port, n, args.rate)
        return 0
    rounds = args.rounds or (1 if args.quick else 3)
    with tempfile.TemporaryDirectory(prefix="opensense-paholoop-") as tmp:
        proc, port, name = start_broker(Path(tmp))
        try:
            print(f"paho loop: {n:,} QoS 1 messages a round at {args.rate:,.0f}/s through {name}")
            thread, loop = alternate(
                WAYS, rounds, lambda way: one_round(way, port, n, args.rate), "µs a message", "7.1f"
            )
        finally:
            stop_popen(proc)
    print()
    print("subscriber CPU a message (median round)")
    print(f"  thread (loop_start, the baseline)   {thread:7.1f} µs")
    print(f"  event loop (_PahoLoop)              {loop:7.1f} µs   ratio {loop / thread:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
