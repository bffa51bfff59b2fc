"""`opensense demo`: a demo account, site and three fridges on http://127.0.0.1:8080.
Six hours of history are backfilled through the real HTTP ingest; then each fridge
is a simulated node running the real firmware (firmware/) on the MicroPython unix
port, its probe warming and cooling, reporting over TLS MQTT to the embedded broker
(opensense.node.sim). If the nodes cannot run (no micropython interpreter, MQTT off),
the demo says why and feeds the same readings over HTTP instead. Re-running reuses
the account (its tokens are kept in <state_dir>/demo.json); a restart backfills only
the readings since each fridge's last stored one (at most six hours, every 15 s).

The story a fresh demo tells (docs/dashboard.md, "The demo"): three fridges in range,
nodes online, and the prep fridge with one past excursion — its door left ajar three
hours ago — that the engine opened and closed and that the demo owner acknowledged
with a corrective-action note. The freezer's channel is made with the frozen preset's
limits (`frozen_site`), so its history is judged by them: no false alarm opens."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import signal
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import psycopg
from aiohttp import web

from .api.jsonutil import rfc3339
from .app import create_app
from .devices import store
from .serving import gc_on_startup
from .settings import Config
from .statedir import prepare_state_dir, write_secret
from .web import store as web_store

log = logging.getLogger(__name__)

DEMO_OWNER = "demo@opensense.invalid"  # the demo account's login email: its owner

DEVICES = (
    # local_id, name, site vertical's typical setpoint (°C), swing
    ("fridge01", "Walk-in fridge", 3.0, 1.2),
    ("fridge02", "Prep fridge", 3.5, 1.0),
    ("freezer01", "Chest freezer", -20.0, 1.5),
)
BACKFILL = timedelta(hours=6)
SITE_VERTICAL = "chilled_storage"
LABEL = "air"  # the probe's label: the backfill and the live node share one channel
NODE_CADENCE_S = 15  # the demo nodes report every 15 s so the dashboard moves
STEP = timedelta(seconds=NODE_CADENCE_S)  # the backfill's too
# The prep fridge's past excursion, as minutes after the start of the first backfill:
# its door left ajar from 3 h ago for 45 min, the air warming to about 9 °C.
EXCURSION = ("fridge02", 180, 45)
STORY_ACK = {
    "by": "Demo owner",
    "note": "Door left ajar after the morning delivery; found on the kitchen round.",
    "cause": "door not closed",
    "action": "door closed, seal checked",
    "product": "core temperature 4.1 °C measured; product kept",
}


def simulated(setpoint: float, swing: float, ts: datetime, seed: int) -> float:
    """A compressor cycle (~40 min) plus slow drift, inside the site's limits: the one
    excursion of the story is laid over it by `excursion`. (No brief door openings: a
    history sent in batches of 32 would show the engine an out-of-range reading at the
    end of a batch as still out when its clock runs, docs/alarms.md "Choices and
    limits", and the demo would open alarms no fridge had.)"""
    t = ts.timestamp()
    v = setpoint + swing * math.sin(t / 2400 * 2 * math.pi + seed)
    v += 0.3 * math.sin(t / 86400 * 2 * math.pi)
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
            acc = await store.create_account(conn, "Demo Café", DEMO_OWNER)
            _, ua = await store.create_token(conn, acc, "ua_live", cfg.bcrypt_rounds, "demo")
            site = await store.create_site(
                conn,
                acc,
                {
                    "name": "Demo Café",
                    "timezone": "Europe/Berlin",
                    "vertical": SITE_VERTICAL,
                    "address": "Hauptstraße 1, Berlin",
                },
            )
            devices = {}
            for local_id, name, _, _ in DEVICES:
                dev, token = await store.create_device(
                    conn,
                    acc,
                    # the nodes' own cadence: a node whose info reports another is
                    # sent the device's (docs/mqtt.md, "Commands")
                    {
                        "site_id": site["id"],
                        "local_id": local_id,
                        "name": name,
                        "cadence_s": NODE_CADENCE_S,
                    },
                    cfg.bcrypt_rounds,
                    now,
                )
                devices[local_id] = {"id": dev["id"], "token": token}
    state = {"account_id": acc, "api_token": ua, "site_id": site["id"], "devices": devices}
    write_secret(path, json.dumps(state, indent=2).encode())  # 0600 from its first byte
    return state


def excursion(local_id: str, ts: datetime, start: datetime, value: float) -> float:
    """The story's excursion laid over a fridge's simulated air temperature: a door
    ajar warms the air towards 9 °C within ~10 min and it cools back once closed."""
    who, after_min, length_min = EXCURSION
    if local_id != who:
        return value
    m = (ts - start).total_seconds() / 60 - after_min
    if m < 0 or m > length_min + 10:
        return value
    warm = min(m, length_min) / 10
    cool = max(0.0, m - length_min) / 4
    lift = (9.0 - value) * min(1.0, warm) * math.exp(-cool)
    return round((value + lift) * 16) / 16


async def last_readings(dsn: str, state: dict[str, Any]) -> dict[str, datetime | None]:
    """Each demo fridge's newest stored raw reading, so a restart backfills only the
    minutes it missed (readings of days already packed are older than the backfill)."""
    out: dict[str, datetime | None] = {}
    async with await psycopg.AsyncConnection.connect(
        dsn, autocommit=True, options="-c timezone=UTC"
    ) as conn:
        for local_id, dev in state["devices"].items():
            cur = await conn.execute(
                "SELECT max(m.ts) FROM measurements m JOIN channels c ON c.num = m.channel_num"
                " WHERE c.device_id = %s AND c.account_id = %s",
                (dev["id"], state["account_id"]),
            )
            row = await cur.fetchone()
            out[local_id] = row[0] if row else None
    return out


async def feed(base: str, state: dict[str, Any], cfg: Config, nodes: list[Any], dsn: str) -> None:
    async with aiohttp.ClientSession() as http:

        async def send(
            local_id: str,
            times: list[datetime],
            seed: int,
            sp: float,
            sw: float,
            start: datetime | None = None,
        ) -> None:
            def value(t: datetime) -> float:
                v = simulated(sp, sw, t, seed)
                return v if start is None else excursion(local_id, t, start, v)

            body = {
                "device": local_id,
                "measurements": [
                    {"type": "temperature", "label": LABEL, "value": value(t), "ts": rfc3339(t)}
                    for t in times
                ],
            }
            headers = {"Authorization": f"Bearer {state['devices'][local_id]['token']}"}
            async with http.post(f"{base}/v1/ingest", json=body, headers=headers) as r:
                if r.status != 200:
                    log.warning("demo feed %s: %s %s", local_id, r.status, await r.text())

        # the history at the nodes' cadence, the devices' own (ensure_demo): a report
        # counts a silence of more than two cadences as a gap
        t = cfg.clock().replace(microsecond=0)
        now = t.replace(second=t.second // NODE_CADENCE_S * NODE_CADENCE_S)
        start = now - BACKFILL
        last = await last_readings(dsn, state)
        fresh = all(v is None for v in last.values())
        sent = 0
        for seed, (local_id, _, sp, sw) in enumerate(DEVICES):
            prev = last.get(local_id)
            first = start if prev is None else max(start, prev + STEP)
            grid = [first + i * STEP for i in range(int((now - first) / STEP))]
            if local_id == "freezer01" and prev is None and grid:
                # Its channel comes with its first reading and takes the site vertical's
                # default rule: the site is frozen storage for that one request, so the
                # freezer's rule has the frozen preset's limits from its beginning, and
                # its whole history is judged, charted and reported by them
                # (alarms/history.py)
                async with frozen_site(http, base, state):
                    await send(local_id, grid[:1], seed, sp, sw)
                grid = grid[1:]
                sent += 1
            for i in range(0, len(grid), 32):
                await send(local_id, grid[i : i + 32], seed, sp, sw, start if fresh else None)
            sent += len(grid)
        log.info("demo: backfilled %d readings (those since each fridge's last)", sent)
        if fresh:
            await acknowledge_story(http, base, state)
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


@contextlib.asynccontextmanager
async def frozen_site(
    http: aiohttp.ClientSession, base: str, state: dict[str, Any]
) -> AsyncIterator[None]:
    """The demo site's vertical set to frozen storage, and back after, as an operator
    installing a freezer would (PATCH /v1/sites: both in the audit trail): a channel
    made meanwhile gets the frozen preset's default rule. Limits set afterwards
    (PATCH /v1/channels) would hold only from then on: the freezer's six hours of
    history, sent after its first reading, would be charted and reported against the
    chilled limits its channel came with."""
    auth = {"Authorization": f"Bearer {state['api_token']}"}
    url = f"{base}/v1/sites/{state['site_id']}"
    async with http.patch(url, json={"vertical": "frozen"}, headers=auth) as r:
        if r.status != 200:
            log.warning("demo: could not make the site frozen storage: %s", await r.text())
    try:
        yield
    finally:
        async with http.patch(url, json={"vertical": SITE_VERTICAL}, headers=auth) as r:
            if r.status != 200:
                log.warning("demo: could not set the site back: %s", await r.text())


async def acknowledge_story(http: aiohttp.ClientSession, base: str, state: dict[str, Any]) -> None:
    """Acknowledge the prep fridge's past excursion with its corrective-action note, as
    the owner would have: waits (a few seconds at most) for the engine to open it."""
    auth = {"Authorization": f"Bearer {state['api_token']}"}
    dev = state["devices"][EXCURSION[0]]["id"]
    async with http.get(f"{base}/v1/channels", params={"device_id": dev}, headers=auth) as r:
        channels = [c["id"] for c in (await r.json())["data"] if c["kind"] == "temperature"]
    for _ in range(100):
        for ch in channels:
            params = {"channel_id": ch}
            async with http.get(f"{base}/v1/events", params=params, headers=auth) as r:
                events = (await r.json())["data"]
            for ev in events:
                if ev.get("acknowledged_at") is None:
                    async with http.post(
                        f"{base}/v1/events/{ev['id']}/ack", json=STORY_ACK, headers=auth
                    ) as r:
                        if r.status != 200:
                            log.warning("demo: could not acknowledge: %s", await r.text())
                    return
        await asyncio.sleep(0.2)
    log.warning("demo: the prep fridge's past excursion did not open an alarm")


async def owner_link(cfg: Config, dsn: str, base: str) -> str | None:
    """A fresh sign-in link for the demo account's owner (valid once, for 10 minutes;
    issued and audited as a mailed one is), or None when the owner is gone."""
    now = cfg.clock()
    async with await psycopg.AsyncConnection.connect(
        dsn, autocommit=True, options="-c timezone=UTC"
    ) as conn:
        async with conn.transaction():
            user = await web_store.user_for_email(conn, DEMO_OWNER)
            if user is None:
                return None
            _, link = await web_store.issue_sign_in(
                conn, user, now, {"ip": "", "via": "opensense demo"}
            )
    return f"{base}/auth/link?t={link}"


async def run_demo(cfg: Config, dsn: str, host: str, port: int) -> None:
    state = await ensure_demo(cfg, dsn)
    app = create_app(cfg, dsn)
    app.on_startup.append(gc_on_startup(cfg.gc_gen0))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    base = f"http://{host}:{port}"
    tok = state["api_token"]
    link = await owner_link(cfg, dsn, base)
    print(
        f"""
OpenSense demo is running on {base}
  Dashboard: sign in as the demo owner with {link}
    (once, within 10 minutes; later: {base}/auth/login with {DEMO_OWNER},
    and the link appears in this log, marked *** SIGN-IN LINK)
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
    task = asyncio.create_task(feed(base, state, cfg, nodes, dsn))
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
