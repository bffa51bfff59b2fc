"""`opensense demo` with no DSN: the embedded PostgreSQL in a state directory, the demo
account, a backfill through the real ingest, then live readings from simulated nodes
running the real firmware over TLS MQTT."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from .fixtures.processes import BIN, free_port


def assert_secrets_private(state: Path, demo: dict) -> None:
    """Every file the demo wrote that holds a token or a private key is 0600, and every
    directory of the state dir is 0700 (the state dir itself 0711 as root: the embedded
    PostgreSQL's own user walks through it to pgdata). pgdata is PostgreSQL's (0700)."""
    secrets = [demo["api_token"], *(d["token"] for d in demo["devices"].values())]
    secrets = [s.encode() for s in secrets] + [b"PRIVATE KEY"]
    assert stat.S_IMODE(state.stat().st_mode) == (0o711 if os.geteuid() == 0 else 0o700)
    holders = []
    for path in state.rglob("*"):
        if "pgdata" in path.relative_to(state).parts:
            continue
        mode = stat.S_IMODE(path.lstat().st_mode)
        if path.is_dir():
            if path.relative_to(state).parts[0] != "audit":  # published checkpoints: public
                assert mode == 0o700, f"{path}: {mode:o}"
        elif any(s in path.read_bytes() for s in secrets):
            holders.append(path.relative_to(state).as_posix())
            assert mode == 0o600, f"{path} holds a secret with mode {mode:o}"
    # the ones we know of, so that the scan above is known to have looked at them
    assert {"demo.json", "mqtt-tls/ca.key", "mqtt-tls/server.key"} <= set(holders), holders
    assert {f"demo-nodes/{n}/config.json" for n in demo["devices"]} <= set(holders), holders


@pytest.fixture
def demo_dir() -> Iterator[Path]:
    """A folder the embedded server's own user can reach when we are root: not under
    pytest's tmp_path, whose root (/tmp/pytest-of-root) is 0700."""
    d = Path(tempfile.mkdtemp(prefix="opensense-demo-"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_demo_serves_readings_from_an_embedded_database(demo_dir: Path) -> None:
    tmp_path = demo_dir
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENSENSE_")}
    env.update(
        {
            # relative, as with tools/demo.sh (.opensense): the simulated nodes run with
            # their own working directory, so every path handed to them must be absolute
            "OPENSENSE_STATE_DIR": "state",
            "OPENSENSE_BCRYPT_ROUNDS": "4",
            "OPENSENSE_MQTT_PORT": str(free_port()),
        }
    )
    with (tmp_path / "demo.log").open("w") as log:  # the child keeps its own copy
        proc = subprocess.Popen(
            [str(BIN), "demo", "--port", str(port)], env=env, stdout=log, stderr=log, cwd=tmp_path
        )
    try:
        base = f"http://127.0.0.1:{port}"
        state_file = tmp_path / "state" / "demo.json"
        deadline = time.monotonic() + 90
        channels: list = []
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
            if not state_file.exists():
                continue
            token = json.loads(state_file.read_text())["api_token"]
            req = urllib.request.Request(
                f"{base}/v1/channels", headers={"Authorization": f"Bearer {token}"}
            )
            try:
                every = json.load(urllib.request.urlopen(req, timeout=5))["data"]
            except OSError:
                continue
            channels = [c for c in every if c["kind"] == "temperature"]
            # the firmware nodes' own health channels prove the live path is the node's
            from_nodes = {c["device_id"] for c in every if c["kind"] == "health"}
            if (
                len(channels) == 3
                and any(c["rules"][0]["params"]["ok_max"] == -18 for c in channels)
                and len(from_nodes) == 3
            ):
                break
        assert proc.poll() is None, (tmp_path / "demo.log").read_text()
        assert len(channels) == 3, (tmp_path / "demo.log").read_text()
        assert len(from_nodes) == 3, (tmp_path / "demo.log").read_text()
        req = urllib.request.Request(
            f"{base}/v1/channels/{channels[0]['id']}/measurements?agg=1h&fn=count",
            headers={"Authorization": f"Bearer {token}"},
        )
        counts = json.load(urllib.request.urlopen(req, timeout=5))["data"]
        assert sum(v for _, v in counts) >= 6 * 60  # the 6-hour backfill (at 4 a minute)
        assert (tmp_path / "state" / "pgdata" / "PG_VERSION").exists()
        # the printed sign-in link opens the demo owner's sign-in page (a button: the
        # link is used by the POST it sends, tests/test_dashboard.py)
        printed = re.search(r"(http://\S+/auth/link\?t=\S+)", (tmp_path / "demo.log").read_text())
        assert printed, (tmp_path / "demo.log").read_text()
        page = urllib.request.urlopen(printed.group(1), timeout=5).read().decode()
        assert 'action="/auth/link"' in page, page
        # a link asked for later (no SMTP: into the log, marked) names the demo's own
        # port too, not the default public URL's 8080
        ask = urllib.request.Request(
            f"{base}/v1/auth/request",
            data=json.dumps({"email": "demo@opensense.invalid"}).encode(),
            headers={"Content-Type": "application/json"},
        )
        assert urllib.request.urlopen(ask, timeout=5).status == 200
        mailed = None
        for _ in range(100):
            mailed = re.search(
                r"SIGN-IN LINK.*?(http://\S+/auth/link\?t=)", (tmp_path / "demo.log").read_text()
            )
            if mailed:
                break
            time.sleep(0.1)
        assert mailed, (tmp_path / "demo.log").read_text()
        assert mailed.group(1).startswith(f"{base}/"), mailed.group(0)
        # a fresh demo is not degraded: nothing it was never given (a backup key) is late
        status = json.load(urllib.request.urlopen(f"{base}/status.json", timeout=5))
        assert status["overall"] == "operational", status
        assert not [c for c in status["components"] if c["state"] in ("degraded", "outage")]
        assert_secrets_private(tmp_path / "state", json.loads(state_file.read_text()))
        # the story (docs/dashboard.md, "The demo"): one past excursion, the prep
        # fridge's, acknowledged with its note; no false alarm on the freezer
        demo = json.loads(state_file.read_text())
        events: list = []
        for _ in range(60):
            req = urllib.request.Request(
                f"{base}/v1/events", headers={"Authorization": f"Bearer {token}"}
            )
            events = json.load(urllib.request.urlopen(req, timeout=5))["data"]
            if events and all(e["acknowledged_at"] for e in events):
                break
            time.sleep(0.5)
        assert [e["device_id"] for e in events] == [demo["devices"]["fridge02"]["id"]], events
        assert events[0]["ack_note"] and events[0]["ack_product"], events
        assert events[0]["value"] >= 8.5, events  # the door ajar warmed it to ~9 °C
        proc.terminate()
        assert proc.wait(30) == 0
        # a restart backfills only the minutes since each fridge's last reading
        with (tmp_path / "demo2.log").open("w") as log:
            proc = subprocess.Popen(
                [str(BIN), "demo", "--port", str(port)],
                env=env,
                stdout=log,
                stderr=log,
                cwd=tmp_path,
            )
        backfilled = None
        deadline = time.monotonic() + 60
        while backfilled is None and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
            backfilled = re.search(
                r"backfilled (\d+) readings", (tmp_path / "demo2.log").read_text()
            )
        assert backfilled, (tmp_path / "demo2.log").read_text()
        assert int(backfilled.group(1)) <= 3 * 3, backfilled.group(0)  # a minute or two each
        proc.terminate()
        assert proc.wait(30) == 0
        # the embedded PostgreSQL stopped with the demo
        assert not (tmp_path / "state" / "pgdata" / "postmaster.pid").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
