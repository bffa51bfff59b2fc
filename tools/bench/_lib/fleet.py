"""Accounts, sites, devices and tokens for a bench, made through the server's service
layer: the one place the benches reach into the server's code to set up data (the
measuring itself drives the server as a process, over HTTP and MQTT)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import aiohttp
import psycopg

from opensense.devices import store as device_store
from opensense.gateway import store as gateways
from opensense.settings import Config
from opensense_contract import topics

from . import pg
from .http_load import Dev

Conn = psycopg.AsyncConnection[Any]


async def account_site(conn: Conn, name: str) -> tuple[str, dict[str, Any]]:
    """One account with one site (UTC, chilled storage)."""
    acc = await device_store.create_account(conn, name, "bench@opensense.invalid")
    site = await device_store.create_site(
        conn, acc, {"name": "Bench", "timezone": "UTC", "vertical": "chilled_storage"}
    )
    return acc, site


async def devices(
    conn: Conn, acc: str, site_id: str, names: list[str], rounds: int
) -> list[tuple[dict[str, Any], str]]:
    """Devices (cadence 60 s) with their ingest tokens hashed at bcrypt cost `rounds`."""
    now = datetime.now(UTC)
    out = []
    for local_id in names:
        dev, token = await device_store.create_device(
            conn, acc, {"site_id": site_id, "local_id": local_id, "cadence_s": 60}, rounds, now
        )
        out.append((dev, token))
    return out


async def api_key(conn: Conn, acc: str, rounds: int) -> str:
    """A `ua_live` key of the account: the bench acts as its operator over the API."""
    _, key = await device_store.create_token(conn, acc, "ua_live", rounds, "bench")
    return str(key)


async def gateway_token(conn: Conn, acc: str, site_id: str, rounds: int) -> str:
    _, token = await gateways.create_gateway(conn, acc, site_id, "bench", rounds)
    return str(token)


def first_open_day(now: datetime) -> datetime:
    """The oldest day the writer still treats as open: readings from there on take
    the normal path, not the late-reading one."""
    d: date = now.date() - timedelta(days=Config.from_env().compact_after_days - 1)
    return datetime(d.year, d.month, d.day, tzinfo=UTC)


async def ingest_devices(dsn: str, rounds: int, n: int, now: datetime) -> tuple[str, list[Dev]]:
    """One account, one site, n devices for the HTTP load (tools/bench/ingest)."""
    first = first_open_day(now)
    limit = now + timedelta(minutes=4)  # ingest refuses readings 5 min ahead of its clock
    async with await pg.connect(dsn) as conn:
        async with conn.transaction():
            acc, site = await account_site(conn, "Ingest bench")
            made = await devices(conn, acc, site["id"], [f"bench{i:03d}" for i in range(n)], rounds)
    devs = [
        Dev(
            dev["local_id"],
            {"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            first + timedelta(seconds=i % 15),
            limit,
        )
        for i, (dev, token) in enumerate(made)
    ]
    return acc, devs


def bcrypt_rounds(quick: bool) -> int:
    """The cost of the bench's tokens: OPENSENSE_BCRYPT_ROUNDS when set, else the
    server's default, or 4 for a --quick run. A checked token is cached by the server,
    so the cost changes set-up and warm-up time, not the measured throughput."""
    if "OPENSENSE_BCRYPT_ROUNDS" in os.environ or not quick:
        return Config.from_env().bcrypt_rounds
    return 4


# --- MQTT: the devices as broker clients -----------------------------------------------


@dataclass
class MqttFleet:
    """The bench's devices in one account: MQTT credentials, and where the next phase's
    timestamps start (each phase after the last one's, so a phase's readings are the
    account's rows from `base` on)."""

    account: str
    base: int  # epoch seconds; device i publishes base + i % 15, then one second on
    ts_limit: int  # ingest refuses readings more than 5 minutes ahead of server time
    ids: list[str] = field(default_factory=list)
    local_ids: list[str] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)

    def add(self, device_id: str, local_id: str, token: str) -> None:
        self.ids.append(device_id)
        self.local_ids.append(local_id)
        self.tokens.append(token)

    def specs(self) -> list[dict[str, Any]]:
        return [
            {
                "client_id": did,
                "username": did,
                "password": tok,
                "topic": topics.topic(self.account, lid),
                "ts0": self.base + i % 15,
                "ts_limit": self.ts_limit,
            }
            for i, (did, lid, tok) in enumerate(
                zip(self.ids, self.local_ids, self.tokens, strict=True)
            )
        ]


def new_fleet(account: str) -> MqttFleet:
    """Readings start on the oldest day the writer still treats as open (so every one
    takes the normal path, as in tools/bench/ingest)."""
    now = datetime.now(UTC)
    first = int(first_open_day(now).timestamp())
    return MqttFleet(account, first, int((now + timedelta(minutes=4)).timestamp()))


async def fleet_by_service(dsn: str, n: int, rounds: int, name: str) -> MqttFleet:
    """Account, site and devices straight through the service layer (embedded broker:
    it checks every CONNECT against the database)."""
    async with await pg.connect(dsn) as conn:
        async with conn.transaction():
            acc, site = await account_site(conn, name)
            names = [f"node{i:03d}" for i in range(n)]
            made = await devices(conn, acc, site["id"], names, rounds)
    out = new_fleet(acc)
    for dev, token in made:
        out.add(dev["id"], dev["local_id"], token)
    return out


async def fleet_by_api(dsn: str, base: str, n: int, rounds: int, name: str) -> MqttFleet:
    """Account and site through the service layer, devices through POST /v1/devices, as
    an operator makes them: the server gives each one its broker credentials."""
    async with await pg.connect(dsn) as conn:
        async with conn.transaction():
            acc, site = await account_site(conn, name)
            key = await api_key(conn, acc, rounds)
    out = new_fleet(acc)
    headers = {"Authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        for i in range(n):
            body = {"site_id": site["id"], "local_id": f"node{i:03d}", "cadence_s": 60}
            async with http.post(f"{base}/v1/devices", json=body, headers=headers) as r:
                if r.status != 201:
                    raise RuntimeError(f"POST /v1/devices: {r.status} {(await r.text())[:300]}")
                dev = await r.json()
            out.add(dev["id"], dev["local_id"], dev["ingest_token"])
    return out


async def retire(dsn: str, fleet: MqttFleet) -> None:
    """Delete the fleet's devices (service layer: token revoked, device retired), so a
    later phase's server does not spend its sweeps on them going offline."""
    now = datetime.now(UTC)
    async with await pg.connect(dsn) as conn:
        async with conn.transaction():
            for device_id in fleet.ids:
                await device_store.delete_device(conn, fleet.account, device_id, now)
