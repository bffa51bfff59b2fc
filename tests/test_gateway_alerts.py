"""Local alerts on an injected clock: the gateway sends an alarm raised during an
outage only once the server has been out of reach for `uplink_down_after_s`, by a
real SMTP server (aiosmtpd) and a shell hook; an alarm raised while the server was
reachable is left to the server. Runs the gateway's own objects, no processes."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller

from opensense_gateway.config import Config
from opensense_gateway.main import Gateway

from .fixtures.processes import free_port

SYNC = {
    "account_id": "acc_1",
    "devices": [],
    "rules": [],
    "defaults": [
        {
            "type": "temperature",
            "kind": "range",
            "params": {"ok_min": -2, "ok_max": 5},
            "grace_min": 15,
        }
    ],
}


class Clock:
    def __init__(self) -> None:
        self.t = 1_800_000_000.0

    def __call__(self) -> float:
        return self.t


class Inbox:
    def __init__(self) -> None:
        self.messages: list[Any] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        self.messages.append(envelope)
        return "250 OK"


def reading(minute: int, value: float, t0: float) -> tuple[str, int, int, int, str, bytes]:
    body = {
        "ts": datetime.fromtimestamp(t0 + 60 * minute, UTC).isoformat(),
        "measurements": [{"type": "temperature", "value": value}],
    }
    return ("mqtt", 0, minute + 1, 1, "opensense/acc_1/fridge01", json.dumps(body).encode())


def test_alert_waits_for_the_outage_threshold_then_smtp_and_hook(tmp_path: Path):
    inbox = Inbox()
    port = free_port()
    ctl = Controller(inbox, hostname="127.0.0.1", port=port)
    ctl.start()
    hook_out = tmp_path / "hook.txt"
    clock = Clock()
    cfg = Config(
        state_dir=str(tmp_path / "state"),
        server_url="http://127.0.0.1:9",
        server_token="gw_x",
        uplink_down_after_s=600,
        smtp_host="127.0.0.1",
        smtp_port=port,
        smtp_to="owner@cafe.example",
        hook=f'echo "$OPENSENSE_ALERT $OPENSENSE_DEVICE $OPENSENSE_VALUE" >> {hook_out}',
    )
    gw = Gateway(cfg, clock=clock)
    try:
        gw.apply_sync(SYNC)
        gw.link.ok(clock())  # the server answered...
        gw.link.down("cut")  # ...then the line went
        t0 = clock() - 3600
        # 40 minutes too warm from minute 10: the alarm opens at minute 25 (grace 15)
        gw.commit([reading(m, 8.0 if m >= 10 else 4.0, t0) for m in range(40)])
        (alarm,) = gw.store.unnotified_alarms()
        assert alarm["opened_at"] == t0 + 25 * 60
        clock.t += 599
        gw.notify_due(["smtp", "hook"])
        assert inbox.messages == [] and not hook_out.exists()  # not yet: 599 s < 600 s
        clock.t += 2
        gw.notify_due(["smtp", "hook"])
        assert len(inbox.messages) == 1
        assert "Subject: [ALARM] fridge01 temperature" in inbox.messages[0].content.decode()
        assert hook_out.read_text() == "open fridge01 8.0\n"
        gw.notify_due(["smtp", "hook"])  # once per alarm and path
        assert len(inbox.messages) == 1
        alerts = gw.store.unposted_alerts()
        assert sorted(a["path"] for a in alerts) == ["hook", "smtp"]
        assert all(a["notified_at"] == clock() for a in alerts)

        # back in range: the clear is recorded on the alerts, to be posted again
        gw.commit([reading(50, 4.0, t0)])
        assert all(a["cleared_at"] == t0 + 50 * 60 for a in gw.store.unposted_alerts())

        # an alarm raised while the server is reachable is the server's
        gw.link.ok(clock())
        gw.commit([reading(m, 9.0, t0) for m in range(60, 80)])
        gw.store.hand_over_alarms()
        gw.link.down("cut again")
        clock.t += 3600
        gw.notify_due(["smtp"])
        assert len(inbox.messages) == 1
    finally:
        gw.store.close()
        ctl.stop()
