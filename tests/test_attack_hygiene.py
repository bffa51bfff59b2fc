"""Issue 11, items 18, 20, 21, 23: attacks and faults against the real server.

- 18: a LoRaWAN DevEUI is unique per account (no oracle, no squatting).
- 20: every file holding a secret is created 0600 in a 0700 state directory.
- 21: process hygiene: SIGKILL/SIGHUP leave no orphaned PostgreSQL; one runner per
  simulated node directory.
- 23: the status page does not claim what is not built, and a fresh demo is not
  degraded for a backup key it was never given.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import psycopg
import pytest
from aiohttp.test_utils import TestClient

from opensense.api.keys import STATUS
from opensense.app import create_app
from opensense.node.sim import NodeBusy, SimNode
from opensense.statedir import write_secret
from opensense.status import components

from .fixtures.clock import FakeClock
from .fixtures.processes import BIN, free_port
from .fixtures.server import World, make_world, test_config

# --- 18: DevEUI unique per account -------------------------------------------------

EUI = "70B3D57ED00000A1"
ONLY_B = "70B3D57ED00000B2"


def _uplink(eui: str, value: float) -> dict[str, Any]:
    return {
        "end_device_ids": {"dev_eui": eui},
        "uplink_message": {
            "decoded_payload": {"measurements": [{"type": "temperature", "value": value}]}
        },
    }


async def _webhook_token(client: TestClient, w: World) -> str:  # type: ignore[type-arg]
    r = await client.post("/v1/tokens", json={"kind": "whk", "name": "ttn"}, headers=w.auth)
    assert r.status == 201, await r.text()
    return str((await r.json())["token"])


async def _lora_device(client: TestClient, w: World, local_id: str, eui: str) -> Any:  # type: ignore[type-arg]
    body = {"site_id": w.site, "local_id": local_id, "dev_eui": eui.lower()}
    return await client.post("/v1/devices", json=body, headers=w.auth)


async def _values(dsn: str, device_id: str) -> list[float]:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT m.value FROM measurements m JOIN channels c ON c.num = m.channel_num"
            " WHERE c.device_id = %s AND c.kind = 'temperature' ORDER BY m.value",
            (device_id,),
        )
        return [float(r[0]) for r in await cur.fetchall()]


async def test_dev_eui_is_unique_per_account_not_across_accounts(
    client: TestClient,  # type: ignore[type-arg]
    dsn: str,
    config: Any,
) -> None:
    a = await make_world(dsn, config, ())
    b = await make_world(dsn, config, ())
    r = await _lora_device(client, a, "lora-a", EUI)
    assert r.status == 201, await r.text()
    dev_a = (await r.json())["id"]

    # B registers A's DevEUI: no 409 (that was an oracle telling B that A owns it),
    # and B's device is B's own
    r = await _lora_device(client, b, "lora-b", EUI)
    assert r.status == 201, await r.text()
    dev_b = (await r.json())["id"]
    assert dev_b != dev_a

    # a duplicate within one account stays a clear conflict
    r = await _lora_device(client, b, "lora-b2", EUI)
    assert r.status == 409, await r.text()
    err = (await r.json())["error"]
    assert err["code"] == "conflict" and EUI in err["message"] and "this account" in err["message"]

    whk_a, whk_b = await _webhook_token(client, a), await _webhook_token(client, b)
    r = await client.post(f"/v1/ingest/lorawan?token={whk_a}", json=_uplink(EUI, 3.5))
    assert r.status == 200, await r.text()
    r = await client.post(f"/v1/ingest/lorawan?token={whk_b}", json=_uplink(EUI, -19.0))
    assert r.status == 200, await r.text()
    # each account's uplink landed on its own device: B's squat did not take A's
    assert await _values(dsn, dev_a) == [3.5]
    assert await _values(dsn, dev_b) == [-19.0]

    # a DevEUI only B has, sent through A's webhook: A's unassigned tray, never B
    r = await _lora_device(client, b, "lora-b3", ONLY_B)
    assert r.status == 201, await r.text()
    dev_b3 = (await r.json())["id"]
    r = await client.post(f"/v1/ingest/lorawan?token={whk_a}", json=_uplink(ONLY_B, 7.0))
    assert r.status == 202 and (await r.json())["unassigned"] is True
    assert await _values(dsn, dev_b3) == []
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT account_id FROM unassigned_uplinks WHERE dev_eui = %s", (ONLY_B,)
        )
        assert [r[0] for r in await cur.fetchall()] == [a.account]


# --- 21: process hygiene -------------------------------------------------------------


def _embedded_env(state: Path, **extra: str) -> dict[str, str]:
    """`opensense` on the embedded PostgreSQL in `state` (no DSN), nothing else."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENSENSE_")}
    env.update(
        {
            "OPENSENSE_STATE_DIR": str(state),
            "OPENSENSE_BCRYPT_ROUNDS": "4",
            "OPENSENSE_JOBS": "false",
            "OPENSENSE_MQTT": "off",
        }
    )
    env.update(extra)
    return env


def _postmasters(pgdata: Path) -> list[int]:
    """Pids of every running postmaster on `pgdata` (its children, the backends, have
    their titles rewritten; the postmaster keeps `-D <pgdata>` on its command line)."""
    out = []
    for p in psutil.process_iter(["name", "cmdline", "status"]):
        cmd = p.info["cmdline"] or []
        if (
            p.info["name"] == "postgres"
            and p.info["status"] != psutil.STATUS_ZOMBIE
            and str(pgdata) in cmd
        ):
            out.append(p.pid)
    return out


def _stop_postmasters(pgdata: Path) -> None:
    for pid in _postmasters(pgdata):
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(pid).kill()


def _serve(state: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    with log.open("ab") as out:  # the child keeps its own copy
        proc = subprocess.Popen(
            [str(BIN), "serve", "--port", str(port)],
            env=_embedded_env(state),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            urllib.request.urlopen(url + "/healthz", timeout=1).close()
            return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"serve did not start: {log.read_text()}")


@pytest.mark.e2e
def test_sigkill_then_restart_adopts_the_orphan_and_sighup_stops_cleanly(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o755)  # as root, the embedded server runs as its own user
    state = tmp_path / "state"
    pgdata = (state / "pgdata").resolve()
    log = tmp_path / "serve.log"
    try:
        r = subprocess.run(
            [str(BIN), "db", "migrate"], env=_embedded_env(state), capture_output=True, timeout=120
        )
        assert r.returncode == 0, r.stderr.decode()
        assert _postmasters(pgdata) == []  # the migrate's exit stopped it

        first, _ = _serve(state, log)
        [orphan] = _postmasters(pgdata)
        first.kill()  # SIGKILL: no exit hook runs
        first.wait(10)
        # the fault: PostgreSQL outlives its holder, whose pid stays in the handle list
        assert _postmasters(pgdata) == [orphan]

        second, _ = _serve(state, log)
        # one postmaster: the orphan was adopted, not joined by a second server
        assert _postmasters(pgdata) == [orphan]
        handles = json.loads((pgdata / ".handle_pids.json").read_text())
        assert handles == [second.pid], handles  # the dead holder is gone from the list

        # a closed terminal: a clean stop, which stops the server it adopted
        second.send_signal(signal.SIGHUP)
        assert second.wait(60) == 0, log.read_text()
        assert _postmasters(pgdata) == [], log.read_text()
        assert not (pgdata / "postmaster.pid").exists()
    finally:
        _stop_postmasters(pgdata)


def test_two_runners_on_one_node_directory_the_second_refuses(tmp_path: Path) -> None:
    node_dir = tmp_path / "node"
    first = SimNode(node_dir, {"token": "ds_live_x"}, b"ca", {"probes": []})
    try:
        with pytest.raises(NodeBusy) as e:
            SimNode(node_dir, {"token": "ds_live_y"}, b"ca", {"probes": []})
        assert str(os.getpid()) in str(e.value)
        # the refused runner wrote nothing: the first runner's config stands
        assert json.loads((node_dir / "config.json").read_text())["token"] == "ds_live_x"
    finally:
        first.close()
    # once the first lets go, the directory is free again
    SimNode(node_dir, {"token": "ds_live_z"}, b"ca", {"probes": []}).close()


def test_a_node_outliving_its_runner_keeps_the_directory_locked(tmp_path: Path) -> None:
    """The node's interpreter holds the lock too: a runner killed while its node ran
    on (no PDEATHSIG outside Linux) cannot be joined by a second runner."""
    node_dir = tmp_path / "node"
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from opensense.node.sim import lock_node_dir\n"
        "import subprocess\n"
        "f = lock_node_dir(Path(sys.argv[1]))\n"
        "child = subprocess.Popen(['sleep', '60'], pass_fds=(f.fileno(),), start_new_session=True)\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    node_dir.mkdir()
    runner = subprocess.Popen(
        [sys.executable, "-c", code, str(node_dir)], stdout=subprocess.PIPE, text=True
    )
    assert runner.stdout is not None
    child = int(runner.stdout.readline())
    try:
        runner.kill()
        runner.wait(10)
        with pytest.raises(NodeBusy):
            SimNode(node_dir, {"token": "ds_live_y"}, b"ca", {"probes": []})
    finally:
        os.kill(child, signal.SIGKILL)
        runner.stdout.close()


# --- 23: the status page tells the truth ---------------------------------------------


async def _status(client: TestClient) -> dict[str, Any]:  # type: ignore[type-arg]
    r = await client.get("/status.json")
    assert r.status == 200
    return dict(await r.json())


async def test_status_shows_no_unbuilt_component_and_no_unconfigured_backup_as_late(
    aiohttp_client: Any, new_database: Any, clock: FakeClock
) -> None:
    fresh = new_database()
    cfg = test_config(clock, status_interval_s=10)
    assert not cfg.backup_recipients  # as a fresh install and the demo: no backup key
    client = await aiohttp_client(create_app(cfg, fresh))
    mon = client.app[STATUS]
    await mon.pause()
    await mon.tick()
    snap = await _status(client)
    ids = {c["id"]: c for c in snap["components"]}
    # nothing claims to be operational that this build does not have; reports are
    # built (reports/__init__.py registers them) and, with no render yet, unknown
    assert "dashboard" not in ids, sorted(ids)
    assert ids["reports"]["state"] == "unknown", ids["reports"]
    assert all("Dashboard" not in c["name"] for c in snap["components"])
    assert ids["api"]["state"] == "operational"
    assert ids["backups"]["state"] == "unknown"
    assert ids["backups"]["detail"] == "not configured on this server"
    # hours later, still no backup: not configured is not late (no backup_old P2)
    clock.advance(hours=3)
    await mon.tick()
    snap = await _status(client)
    assert snap["overall"] != "degraded", snap
    assert not [i for i in snap["incidents"] if "backup" in i["title"].lower()]

    # a feature switches its component on by registering itself
    components.register_feature("dashboard")
    try:
        clock.advance(seconds=10)
        await mon.tick()
        snap = await _status(client)
        assert "dashboard" in {c["id"] for c in snap["components"]}
    finally:
        components.unregister_feature("dashboard")
    with pytest.raises(ValueError):
        components.register_feature("no_such_feature")


def _nodes_in(state: Path) -> list[psutil.Process]:
    """The simulated nodes' interpreters running in `state`'s node directories."""
    base = str((state / "demo-nodes").resolve())
    out = []
    for p in psutil.process_iter(["name", "status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and p.cwd().startswith(base):
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def _demo(tmp_path: Path, state: Path, log: Path) -> subprocess.Popen[bytes]:
    env = _embedded_env(state, OPENSENSE_MQTT="embedded", OPENSENSE_MQTT_PORT=str(free_port()))
    with log.open("ab") as out:  # the child keeps its own copy
        proc = subprocess.Popen(
            [str(BIN), "demo", "--port", str(free_port())],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(_nodes_in(state)) < 3:
        assert proc.poll() is None, log.read_text()
        time.sleep(0.5)
    assert len(_nodes_in(state)) == 3, log.read_text()
    return proc


@pytest.mark.e2e
def test_a_killed_demo_leaves_no_node_running_and_the_next_one_runs_each_node_once(
    tmp_path: Path,
) -> None:
    os.chmod(tmp_path, 0o755)  # as root, the embedded server runs as its own user
    state = tmp_path / "state"
    pgdata = (state / "pgdata").resolve()
    log = tmp_path / "demo.log"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(_demo(tmp_path, state, log))
        [postmaster] = _postmasters(pgdata)
        procs[0].kill()  # SIGKILL: the demo's own cleanup never runs
        procs[0].wait(10)
        # its nodes die with it (they would otherwise report on, beside the next demo's)
        deadline = time.monotonic() + 10
        while _nodes_in(state) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _nodes_in(state) == []

        procs.append(_demo(tmp_path, state, log))
        time.sleep(2)  # a second set of nodes would have started by now
        nodes = _nodes_in(state)
        assert len(nodes) == 3 and {n.ppid() for n in nodes} == {procs[1].pid}
        assert _postmasters(pgdata) == [postmaster]  # adopted, not doubled

        procs[1].send_signal(signal.SIGHUP)  # the terminal closes
        assert procs[1].wait(60) == 0, log.read_text()
        assert _postmasters(pgdata) == [] and _nodes_in(state) == []
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for n in _nodes_in(state):
            n.kill()
        _stop_postmasters(pgdata)


def test_an_existing_world_readable_state_dir_is_tightened(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o755)
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    os.chmod(state, 0o755)  # as an older release (or a careless umask) left it
    pgdata = (state / "pgdata").resolve()
    try:
        r = subprocess.run(
            [str(BIN), "db", "migrate"], env=_embedded_env(state), capture_output=True, timeout=120
        )
        assert r.returncode == 0, r.stderr.decode()
        mode = stat.S_IMODE(state.stat().st_mode)
        assert mode == (0o711 if os.geteuid() == 0 else 0o700), oct(mode)
        assert b"was mode 755" in r.stderr and b"tightened" in r.stderr, r.stderr.decode()
    finally:
        _stop_postmasters(pgdata)


def test_write_secret_never_leaves_a_readable_window(tmp_path: Path) -> None:
    """An old world-readable file is replaced by a new one made 0600 at its creation
    (another inode), not chmod-ed after its content is in."""
    path = tmp_path / "config.json"
    path.write_text("old")
    os.chmod(path, 0o644)
    old_inode = path.stat().st_ino
    seen: list[int] = []
    real_open = os.open

    def spy(p: Any, flags: int, mode: int = 0o777, *a: Any, **k: Any) -> int:
        seen.append(mode)
        return real_open(p, flags, mode, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "open", spy)
        mp.setattr(os, "chmod", lambda *a, **k: pytest.fail("chmod on a secret file"))
        write_secret(path, b"ds_live_secret")
    assert seen == [0o600]
    assert path.read_bytes() == b"ds_live_secret" and path.stat().st_ino != old_inode
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]  # no temporary left
