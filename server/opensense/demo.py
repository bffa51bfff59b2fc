"""`opensense demo`: a demo account, site and three fridges on http://127.0.0.1:8080.
Six hours of history are backfilled through the real HTTP ingest; then each fridge
is a simulated node running the real firmware (firmware/) on the MicroPython unix
port, its probe warming and cooling, reporting over TLS MQTT to the embedded broker
(opensense.node.sim). If the nodes cannot run (no micropython interpreter, MQTT off),
the demo says why and feeds the same readings over HTTP instead. Re-running reuses
the account (its tokens are kept in <state_dir>/demo.json); readings sit on a minute
grid, so a restart resends the backfill and the server deduplicates it."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import signal
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import psycopg
from aiohttp import web

from .api.jsonutil import rfc3339
from .app import create_app
from .devices import store
from .presets import VERTICALS
from .settings import Config
from .statedir import prepare_state_dir, write_secret

log = logging.getLogger(__name__)

DEVICES = (
    # local_id, name, site vertical's typical setpoint (°C), swing
    ("fridge01", "Walk-in fridge", 3.0, 1.2),
    ("fridge02", "Prep fridge", 4.0, 1.5),
    ("freezer01", "Chest freezer", -20.0, 1.5),
)
BACKFILL = timedelta(hours=6)
LABEL = "air"  # the probe's label: the backfill and the live node share one channel
NODE_CADENCE_S = 15  # the demo nodes report every 15 s so the dashboard moves


def simulated(setpoint: float, swing: float, ts: datetime, seed: int) -> float:
    """A compressor cycle (~40 min) plus slow drift; a door opening now and then."""
    t = ts.timestamp()
    v = setpoint + swing * math.sin(t / 2400 * 2 * math.pi + seed)
    v += 0.3 * math.sin(t / 86400 * 2 * math.pi)
    if int(t // 60) % 97 == seed:  # a door left open for a minute
        v += 2.5
    return round(v * 16) / 16  # DS18B20 12-bit resolution: 1/16 °C


async def ensure_demo(cfg: Config, dsn: str) -> dict[str, Any]:
    prepare_state_dir(cfg.state_dir, for_embedded_postgres=not cfg.database_url)
    path = cfg.state_dir / "demo.json"
    if path.exists():
        return dict(json.loads(path.read_text()))
    now = cfg.clock()
    async with await psycopg.AsyncConnection.connect(
        dsn, autocommit=True, options="-c timezone=UTC"
    ) as conn:
        async with conn.transaction():
            acc = await store.create_account(conn, "Demo Café", "demo@opensense.invalid")
            _, ua = await store.create_token(conn, acc, "ua_live", cfg.bcrypt_rounds, "demo")
            site = await store.create_site(
                conn,
                acc,
                {
                    "name": "Demo Café",
                    "timezone": "Europe/Berlin",
                    "vertical": "chilled_storage",
                    "address": "Hauptstraße 1, Berlin",
                },
            )
            devices = {}
            for local_id, name, _, _ in DEVICES:
                dev, token = await store.create_device(
                    conn,
                    acc,
                    {"site_id": site["id"], "local_id": local_id, "name": name},
                    cfg.bcrypt_rounds,
                    now,
                )
                devices[local_id] = {"id": dev["id"], "token": token}
    state = {"account_id": acc, "api_token": ua, "site_id": site["id"], "devices": devices}
    write_secret(path, json.dumps(state, indent=2).encode())  # 0600 from its first byte
    return state


async def feed(base: str, state: dict[str, Any], cfg: Config, nodes: list[Any]) -> None:
    async with aiohttp.ClientSession() as http:

        async def send(
            local_id: str, times: list[datetime], seed: int, sp: float, sw: float
        ) -> None:
            body = {
                "device": local_id,
                "measurements": [
                    {
                        "type": "temperature",
                        "label": LABEL,
                        "value": simulated(sp, sw, t, seed),
                        "ts": rfc3339(t),
                    }
                    for t in times
                ],
            }
            headers = {"Authorization": f"Bearer {state['devices'][local_id]['token']}"}
            async with http.post(f"{base}/v1/ingest", json=body, headers=headers) as r:
                if r.status != 200:
                    log.warning("demo feed %s: %s %s", local_id, r.status, await r.text())

        now = cfg.clock().replace(second=0, microsecond=0)
        for seed, (local_id, _, sp, sw) in enumerate(DEVICES):
            grid = [
                now - BACKFILL + timedelta(minutes=i)
                for i in range(int(BACKFILL.total_seconds() // 60))
            ]
            for i in range(0, len(grid), 32):
                await send(local_id, grid[i : i + 32], seed, sp, sw)
        log.info("demo: backfilled %s of readings", BACKFILL)
        await use_frozen_limits(http, base, state)
        nodes[:] = await asyncio.to_thread(start_nodes, state, cfg)
        if nodes:
            await asyncio.Event().wait()  # the nodes report on their own; run_demo stops them
        while True:
            now = cfg.clock().replace(microsecond=0)
            for seed, (local_id, _, sp, sw) in enumerate(DEVICES):
                await send(local_id, [now], seed, sp, sw)
            await asyncio.sleep(10)


def start_nodes(state: dict[str, Any], cfg: Config) -> list[Any]:
    """One simulated node per demo fridge, running the real firmware; [] (and the
    reason, printed) when they cannot run, so the demo falls back to the HTTP feed."""
    why = ""
    if cfg.mqtt != "embedded":
        why = f"OPENSENSE_MQTT is {cfg.mqtt!r}, the demo nodes need the embedded broker"
    nodes: list[Any] = []
    if not why:
        try:
            from .mqtt.ca import ensure_tls
            from .node.sim import SimNode, rom

            hosts = [h.strip() for h in cfg.mqtt_hostnames.split(",") if h.strip()]
            ca = ensure_tls(cfg.state_dir, hosts).ca_der()
            for seed, (local_id, _, sp, sw) in enumerate(DEVICES):
                r = rom(0x0D00 + seed)
                config = {
                    "wifi": {"ssid": "demo-cafe", "password": "demo-password"},
                    "server": {"host": hosts[0], "mqtt_port": cfg.mqtt_port},
                    "account": state["account_id"],
                    "device_id": state["devices"][local_id]["id"],
                    "local_id": local_id,
                    "token": state["devices"][local_id]["token"],
                    "probes": {r: {"label": LABEL}},
                    "cadence": NODE_CADENCE_S,
                }
                ctl = {
                    "speed": 1,
                    "epoch0": int(datetime.now(UTC).timestamp()),
                    "probes": [{"rom": r, "temp": sp, "amp": sw, "period": 2400}],
                }
                n = SimNode(cfg.state_dir / "demo-nodes" / local_id, config, ca, ctl)
                n.start()
                nodes.append(n)
        except Exception as e:  # the demo must start anyway: say why and feed over HTTP
            why = f"{type(e).__name__}: {e}"
            for n in nodes:
                n.close()
            nodes = []
    if why:
        print(f"demo: simulated firmware nodes not started ({why}); feeding over HTTP", flush=True)
    else:
        print(
            f"demo: {len(nodes)} simulated nodes run the real firmware (MicroPython unix port) "
            f"over TLS MQTT; their consoles: {cfg.state_dir / 'demo-nodes'}/*/console.log",
            flush=True,
        )
    return nodes


async def use_frozen_limits(http: aiohttp.ClientSession, base: str, state: dict[str, Any]) -> None:
    """The site is chilled storage; its freezer gets the frozen preset's limits, set
    the way an operator would: PATCH the channel through the API."""
    frozen = VERTICALS["frozen"].rules["temperature"]
    auth = {"Authorization": f"Bearer {state['api_token']}"}
    dev = state["devices"]["freezer01"]["id"]
    async with http.get(f"{base}/v1/channels", params={"device_id": dev}, headers=auth) as r:
        channels = (await r.json())["data"]
    for ch in channels:
        if ch["kind"] == "temperature":
            body = {**frozen.params, "grace_min": frozen.grace_min}
            async with http.patch(f"{base}/v1/channels/{ch['id']}", json=body, headers=auth) as r:
                if r.status != 200:
                    log.warning("demo: could not set freezer limits: %s", await r.text())


async def run_demo(cfg: Config, dsn: str, host: str, port: int) -> None:
    state = await ensure_demo(cfg, dsn)
    runner = web.AppRunner(create_app(cfg, dsn), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    base = f"http://{host}:{port}"
    tok = state["api_token"]
    print(
        f"""
OpenSense demo is running on {base}
  API token (demo account): {tok}
  Try:
    curl -s -H 'Authorization: Bearer {tok}' {base}/v1/devices
    curl -s -H 'Authorization: Bearer {tok}' {base}/v1/channels
    curl -s -H 'Authorization: Bearer {tok}' '{base}/v1/channels/<channel id>/measurements?agg=5m&fn=max'
  OpenAPI: {base}/v1/openapi.json
  Status page: {base}/status  (JSON: {base}/status.json, Prometheus: {base}/metrics)
  Demo state (tokens): {cfg.state_dir / "demo.json"}
Press Ctrl-C to stop.
""",
        flush=True,
    )
    nodes: list[Any] = []  # the simulated firmware nodes feed() starts
    task = asyncio.create_task(feed(base, state, cfg, nodes))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        # a clean exit lets the embedded PostgreSQL stop with us (its atexit hook); a
        # closed terminal (SIGHUP) is a stop too, not a kill that leaves it running
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        log.info("demo: stopping")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        for n in nodes:
            await asyncio.to_thread(n.close)
        await runner.cleanup()
