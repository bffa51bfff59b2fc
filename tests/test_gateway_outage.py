"""Done-when of issue 5, end to end with real processes: real PostgreSQL, a real
`opensense serve`, a real site Mosquitto, the real `opensense-gateway`, a real SMTP
server (aiosmtpd) for the local alert, and a TCP proxy as the WAN link.

20 nodes × 1 reading a minute for a simulated 3 days (4,320 readings a node, 86,400
in all; the nodes' clock runs fast: readings carry their simulated timestamps) while
the WAN is cut; the gateway is SIGKILLed twice during the outage and once during the
drain. Afterwards the server holds every reading exactly once, the local alarm went
out by email during the outage within grace + one cadence, and its local_alerts row
reached the server before the backlog did."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from aiosmtpd.controller import Controller

from opensense.gateway import store as gateways
from opensense.settings import Config

from .fixtures.processes import ServerProcess, free_port
from .fixtures.server import make_world
from .gateway_rig import GatewayProcess, Node, SiteBroker, TcpProxy, connected_node, wait_for

pytestmark = pytest.mark.db

NODES = 20
MINUTES = 3 * 24 * 60  # 4,320 readings a node
EXCURSION = (
    MINUTES // 4,
    MINUTES // 4 + 60,
)  # node 0 reads 9 °C in these minutes (chilled: ok ≤ 5, grace 15)
GRACE_S = 15 * 60
CADENCE_S = 60


class Inbox:
    def __init__(self) -> None:
        self.messages: list[tuple[float, Any]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        self.messages.append((time.time(), envelope))
        return "250 OK"


@pytest.fixture
def smtp() -> Any:
    inbox = Inbox()
    port = free_port()
    ctl = Controller(inbox, hostname="127.0.0.1", port=port)
    ctl.start()
    yield port, inbox
    ctl.stop()


async def setup_site(dsn: str) -> tuple[Any, str]:
    world = await make_world(
        dsn, Config(bcrypt_rounds=4), tuple(f"fridge{i:02d}" for i in range(NODES))
    )
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        gw, token = await gateways.create_gateway(conn, world.account, world.site, "back room", 4)
    return world, token


def server_count(dsn: str, account: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT count(*) FROM measurements m JOIN channels c ON c.num = m.channel_num"
            " WHERE c.account_id = %s",
            (account,),
        ).fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.e2e
def test_three_day_outage_twenty_nodes_gateway_killed_three_times(dsn, tmp_path: Path, smtp):
    smtp_port, inbox = smtp
    world, gw_token = asyncio.run(setup_site(dsn))
    server = ServerProcess(dsn)
    proxy = TcpProxy(server.port)
    broker = SiteBroker(tmp_path / "broker")
    gw = GatewayProcess(
        tmp_path / "gw",
        server={"url": f"http://127.0.0.1:{proxy.port}", "token": gw_token, "timeout_s": 3},
        forward={"batch_size": 2000, "sync_interval_s": 2, "health_interval_s": 1},
        mqtt={
            "host": "127.0.0.1",
            "port": broker.port,
            "password": "gateway-secret",
            "password_file": broker.passwd,
            "acl_file": broker.acl,
            "reload_command": broker.reload_command,
        },
        alarms={
            "uplink_down_after_s": 1,
            "check_interval_s": 0.2,
            "smtp_host": "127.0.0.1",
            "smtp_port": smtp_port,
            "smtp_to": "owner@cafe.example",
        },
    )
    nodes: list[Node] = []
    try:
        # first contact: the gateway syncs the site's devices into the broker
        wait_for(lambda: broker.passwd.read_text().count("\n") == NODES + 1, 30, "the sync")
        proxy.cut()
        wait_for(lambda: gw.health().get("uplink") == "down", 30, "the gateway to see the cut")
        # the broker keeps messages for the gateway once its session has subscribed
        wait_for(
            lambda: gw.health().get("site_broker") == "subscribed", 30, "the gateway's session"
        )

        nodes = [  # retried while Mosquitto reloads its password file
            connected_node(
                broker.port,
                world.account,
                f"fridge{i:02d}",
                world.devices[f"fridge{i:02d}"],
                world.device_ids[f"fridge{i:02d}"],
            )
            for i in range(NODES)
        ]
        start = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=MINUTES)
        t0 = start.timestamp()
        infos = []
        for minute in range(MINUTES):
            if minute in (MINUTES // 3, 2 * MINUTES // 3):
                gw.kill()  # twice during the outage
                time.sleep(0.3)
                gw.start()
            for i, n in enumerate(nodes):
                hot = i == 0 and EXCURSION[0] <= minute < EXCURSION[1]
                infos.append(n.publish(t0 + minute * CADENCE_S, 9.0 if hot else 4.0))
            if minute % 200 == 199:  # the nodes' own pace: let the acks catch up
                infos[-1].wait_for_publish(30)
        for info in infos:
            info.wait_for_publish(60)
        # the gateway takes everything the broker holds for it
        wait_for(lambda: gw.queued() >= NODES * MINUTES, 120, "the gateway to queue all")
        # the local alarm went out during the outage, by email
        wait_for(lambda: inbox.messages, 30, "the local alarm email")
        subject = inbox.messages[0][1].content.decode(errors="replace")
        assert "[ALARM] fridge00 temperature" in subject
        assert len(inbox.messages) == 1
        assert server_count(dsn, world.account) == 0  # the link was down all along

        # the line returns; the gateway is killed once more during the drain
        proxy.restore()
        wait_for(
            lambda: server_count(dsn, world.account) > NODES * MINUTES // 4,
            120,
            "the drain to start",
        )
        gw.kill()
        time.sleep(0.3)
        gw.start()
        wait_for(
            lambda: server_count(dsn, world.account) >= NODES * MINUTES and gw.queued() == 0,
            180,
            "the drain to finish",
        )
        assert gw.dead_letters() == 0

        with psycopg.connect(dsn) as conn:
            # count(DISTINCT ts) equals count(*) by construction (one channel per node,
            # primary key on (channel, ts)); the exact counts are what prove no loss
            per_device = conn.execute(
                "SELECT d.local_id, count(*), count(DISTINCT m.ts), min(m.ts), max(m.ts)"
                " FROM measurements m JOIN channels c ON c.num = m.channel_num"
                " JOIN devices d ON d.id = c.device_id WHERE c.account_id = %s"
                " GROUP BY d.local_id ORDER BY 1",
                (world.account,),
            ).fetchall()
            alerts = conn.execute(
                "SELECT a.opened_at, a.notified_at, a.path, a.channel_id, a.received_at"
                " FROM local_alerts a JOIN gateways g ON g.id = a.gateway_id"
                " WHERE g.account_id = %s",
                (world.account,),
            ).fetchall()
            first_batch = conn.execute(
                "SELECT min(b.received_at) FROM gateway_batches b JOIN gateways g"
                " ON g.id = b.gateway_id WHERE g.account_id = %s",
                (world.account,),
            ).fetchone()
            hot = conn.execute(
                "SELECT count(*) FROM measurements m JOIN channels c ON c.num = m.channel_num"
                " JOIN devices d ON d.id = c.device_id WHERE d.local_id = 'fridge00'"
                " AND c.account_id = %s AND m.value > 5",
                (world.account,),
            ).fetchone()
        # every reading exactly once (the primary key forbids a second copy; the
        # counts show none is missing)
        assert len(per_device) == NODES
        for local_id, n, distinct, lo, hi in per_device:
            assert (n, distinct) == (MINUTES, MINUTES), local_id
            assert lo == start and hi == start + timedelta(minutes=MINUTES - 1), local_id
        assert hot == (EXCURSION[1] - EXCURSION[0],)
        # the local alarm: one, by smtp, within grace + one cadence of the excursion
        assert len(alerts) == 1
        opened_at, notified_at, path, channel_id, received_at = alerts[0]
        excursion = start + timedelta(minutes=EXCURSION[0])
        assert path == "smtp" and channel_id is not None and channel_id.startswith("chn_")
        assert (
            timedelta(seconds=GRACE_S)
            <= opened_at - excursion
            <= timedelta(seconds=GRACE_S + CADENCE_S)
        )
        assert notified_at.timestamp() <= inbox.messages[0][0] + 1
        # posted before the backlog: the server knew of it before any reading came
        assert first_batch is not None and received_at <= first_batch[0]
        health = wait_for(
            lambda: (h := gw.health()).get("queue_depth") == 0 and h, 10, "health to settle"
        )
        assert health["dead_letters"] == 0 and health["uplink"] == "up"
    except BaseException:
        print(gw.log_text())
        print(
            "queued:",
            gw.queued(),
            "health:",
            gw.health(),
            "server:",
            server_count(dsn, world.account),
        )
        print((broker.root / "mosquitto.log").read_text(errors="replace")[-3000:])
        raise
    finally:
        for n in nodes:
            n.close()
        gw.stop()
        broker.stop()
        proxy.close()
        server.stop()
