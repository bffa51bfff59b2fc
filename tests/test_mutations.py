"""Mutations: deliberately broken copies of the code that named tests must catch.

Each mutation is applied to a copy of the repository in a temporary directory (never to
the work tree) and the test it names is run there; the mutation passes here when that
test FAILS on the broken copy. They take minutes (some rerun an end-to-end test), so
they are out of the default run:

    .venv/bin/python -m pytest -m mutation tests/test_mutations.py

The default run only checks that every mutation still applies to today's code (its
text is there exactly once), so an edit cannot quietly turn one into a no-op.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # relative to the repository
    old: str  # exactly once in the file
    new: str
    test: str  # the pytest node id that must fail on the mutated copy
    why: str


MUTATIONS = (
    Mutation(
        "fq_segment_deleted_before_the_head_moves",
        "firmware/sense/fq.py",
        "            if self._state_fits():  # the head moves past the segment before the segment goes\n"
        "                os.remove(p)\n",
        "            os.remove(p)\n            if self._state_fits():\n                pass\n",
        "tests/test_firmware_queue.py::test_queue_under_micropython"
        "[case_power_cut_at_every_step_loses_nothing_committed]",
        "a cut between the delete and the state write loses records no counter owns up to",
    ),
    Mutation(
        "fq_drop_counter_counts_acknowledged_records",
        "firmware/sense/fq.py",
        "                    if self.head[0] == self.lo:\n"
        "                        f.seek(self.head[1])\n",
        "",
        "tests/test_firmware_queue.py::test_queue_under_micropython"
        "[case_power_cut_at_every_step_loses_nothing_committed]",
        "a drop counter that over-reports hides losses; the old `missing <= drops` "
        "(values, earlier drops included) let it pass",
    ),
    Mutation(
        "embedded_broker_acks_before_storing",
        "server/opensense/mqtt/embedded.py",
        "    if not await side.on_publish(\n"
        "        self.session, app_message.topic, bytes(app_message.data), app_message.qos, self\n"
        "    ):\n",
        "    _args = (self.session, app_message.topic, bytes(app_message.data), app_message.qos, self)\n"
        "    asyncio.get_running_loop().call_later(\n"
        "        0.5, lambda: asyncio.ensure_future(side.on_publish(*_args))\n"
        "    )\n"
        "    if False:\n",
        "tests/test_mqtt_embedded.py::"
        "test_server_killed_mid_stream_stores_every_reading_exactly_once",
        "PUBACK before the commit: a SIGKILL mid-delivery loses acknowledged readings",
    ),
    Mutation(
        "identify_takes_the_account_from_the_device_id",
        "server/opensense/devices/routes.py",
        '    """Blink the node\'s LED (cmd/identify) so an installer finds it in the fridge."""\n'
        "    now = request.app[CONFIG].clock()\n"
        "    async with request.app[POOL].connection() as conn:\n"
        "        acc = await auth.account(request, conn)\n",
        "    now = request.app[CONFIG].clock()\n"
        "    async with request.app[POOL].connection() as conn:\n"
        "        await auth.account(request, conn)\n"
        "        cur = await conn.execute(\n"
        '            "SELECT account_id FROM devices WHERE id = %s", (request.match_info["device_id"],)\n'
        "        )\n"
        '        acc = ((await cur.fetchone()) or ("",))[0]\n',
        "tests/test_errors.py::test_another_accounts_id_on_every_route_is_not_found",
        "a route the hand-written list of B's ids never named (identify) reaches B's device",
    ),
    Mutation(
        "mqtt_duplicates_not_counted",
        "server/opensense/mqtt/ingest.py",
        '        self.counters.deduplicated += answer["deduplicated"]\n',
        "",
        "tests/test_mqtt_embedded.py::test_publish_over_tls_is_stored_before_puback",
        "a resend must be reported as exactly one skipped duplicate",
    ),
    Mutation(
        "http_duplicates_reported_as_accepted",
        "server/opensense/ingest/pipeline.py",
        '        "deduplicated": len(entries) - inserted,\n',
        '        "deduplicated": 0,\n',
        "tests/test_ingest.py::test_resend_is_deduplicated_never_stored_twice",
        "the answer must say how many re-sent readings were skipped",
    ),
)


@pytest.mark.parametrize("m", MUTATIONS, ids=lambda m: m.name)
def test_every_mutation_still_applies(m: Mutation) -> None:
    text = (ROOT / m.path).read_text()
    assert text.count(m.old) == 1, (m.name, m.path)
    assert m.test.split("::")[0] and (ROOT / m.test.split("::")[0]).exists(), m.test


def _copy(dest: Path) -> None:
    files = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    for f in files:
        src = ROOT / f
        if src.is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)


@pytest.mark.mutation
@pytest.mark.parametrize("m", MUTATIONS, ids=lambda m: m.name)
def test_the_named_test_fails_on_the_mutation(m: Mutation, tmp_path: Path) -> None:
    if shutil.which("git") is None:
        pytest.skip("needs git to list the repository's files")
    copy = tmp_path / "repo"
    _copy(copy)
    target = copy / m.path
    text = target.read_text()
    assert text.count(m.old) == 1, m.name
    target.write_text(text.replace(m.old, m.new))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(copy / "server"), str(copy / "gateway")])
    where = subprocess.run(
        [sys.executable, "-c", "import opensense; print(opensense.__file__)"],
        env=env,
        capture_output=True,
        text=True,
        cwd=str(copy),
    ).stdout
    assert where.startswith(str(copy)), where  # really the mutated copy
    r = subprocess.run(
        [sys.executable, "-m", "pytest", m.test, "-x", "-q", "-p", "no:cacheprovider"],
        env=env,
        capture_output=True,
        text=True,
        cwd=str(copy),
        timeout=900,
    )
    tail = r.stdout[-3000:] + r.stderr[-1000:]
    # exit code 1: tests ran and failed (2+ would be an error of the run itself)
    assert r.returncode == 1 and "1 failed" in r.stdout, (m.name, m.why, tail)
