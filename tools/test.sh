#!/usr/bin/env bash
# One command: install OpenSense with its test tools into .venv and run the whole suite:
# lint (ruff), types (mypy), then pytest against the embedded PostgreSQL, then the
# database tests again against a system PostgreSQL (OPENSENSE_TEST_DSN, default
# postgresql://postgres@127.0.0.1:5432/test) when one answers. The bench-rig scenarios
# (pytest -m hil tests/test_hil.py) run in the background beside the first pass.
set -euo pipefail
cd "$(dirname "$0")/.."
. tools/_venv.sh
# Mosquitto 2 (broker and mosquitto_pub) for the MQTT tests, from Debian's packages
if ! command -v mosquitto >/dev/null || ! command -v mosquitto_ctrl >/dev/null \
   || ! command -v mosquitto_pub >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "== installing mosquitto and mosquitto-clients"
    apt-get update -qq && apt-get install -y -qq mosquitto mosquitto-clients >/dev/null
  else
    echo "the MQTT tests need mosquitto and mosquitto_pub: sudo apt-get install mosquitto mosquitto-clients" >&2
    exit 1
  fi
fi
# socat: the installer test bridges mpremote to the MicroPython unix port over a pty
if ! command -v socat >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "== installing socat"
  apt-get install -y -qq socat >/dev/null || echo "no socat: the mpremote pty test is skipped" >&2
fi
# pdftoppm turns rendered reports into PNG test artifacts; reports embed DejaVu Sans
if { ! command -v pdftoppm >/dev/null || [ ! -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ]; } \
   && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "== installing poppler-utils and fonts-dejavu-core"
  apt-get install -y -qq poppler-utils fonts-dejavu-core >/dev/null || echo "no pdftoppm: report PNGs are not made" >&2
fi
# Chromium for the dashboard's browser tests (Playwright drives Debian's build at
# /usr/bin/chromium; `playwright install` and its downloaded browsers are not used)
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "== installing chromium"
    apt-get update -qq && apt-get install -y -qq chromium >/dev/null
  else
    echo "the browser tests need Debian's chromium: sudo apt-get install chromium" >&2
    exit 1
  fi
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
# the site gateway is its own package (gateway/pyproject.toml); its tests need it here
.venv/bin/python -m pip install -q --disable-pip-version-check -e gateway

echo "== ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "== mypy"
.venv/bin/mypy

# The bench-rig scenarios (tests/test_hil.py, marked `hil`, skipped by the main pass)
# are mostly waiting: they run beside the main pass, in the background, on an embedded
# PostgreSQL of their own, with their own log; their exit code counts and the log is
# printed at the end. Measured on 2 cores on 2026-12-03: the 13 scenarios took 94 s
# alone and 113 s of wall time beside other firmware and MQTT tests.
HIL_LOG=$(mktemp -t opensense-hil-XXXXXX.log)
echo "== pytest -m hil tests/test_hil.py (bench-rig scenarios, in the background; log $HIL_LOG)"
env -u OPENSENSE_TEST_DSN .venv/bin/python -m pytest -m hil tests/test_hil.py >"$HIL_LOG" 2>&1 &
HIL_PID=$!
# a failing main pass ends the script (set -e): the scenarios' run ends with it
trap 'kill "$HIL_PID" 2>/dev/null || true' EXIT

# The first pass runs its test files in 3 worker processes (pytest-xdist, each file's
# tests in one worker, each worker with its own embedded PostgreSQL): the suite mostly
# waits on subprocesses, brokers and clocks, so on 2 cores on 2026-12-03 it took 7.3 min
# this way against about 19 min in one process (both with other work on the machine).
# OPENSENSE_TEST_WORKERS=0 runs it in one process.
WORKERS=${OPENSENSE_TEST_WORKERS:-3}
XDIST=()
if [ "$WORKERS" != 0 ]; then XDIST=(-n "$WORKERS" --dist loadfile); fi
echo "== pytest (embedded PostgreSQL, ${WORKERS} workers)"
env -u OPENSENSE_TEST_DSN .venv/bin/python -m pytest "${XDIST[@]}" "$@"

DSN=${OPENSENSE_TEST_DSN:-postgresql://postgres@127.0.0.1:5432/test}
if .venv/bin/python -c 'import sys, psycopg; psycopg.connect(sys.argv[1], connect_timeout=3).close()' "$DSN" 2>/dev/null; then
  # This pass proves the SQL on a second PostgreSQL major version (the system's, 15 here;
  # the embedded one is 18): the files whose SQL is version-sensitive (partitions,
  # compaction, retention, the audit trail's triggers and roles, pg_dump/pg_restore,
  # migrations over an older schema) plus the main write and alarm paths. The rest ran
  # above: its SQL is the same. On a clean clone on 2 cores on 2026-12-03 the first pass
  # took 14.5 min and this pass over every db test 4.6 min: 20.3 min in all, over the
  # 20-minute budget.
  PASS2=(tests/test_storage.py tests/test_retention.py tests/test_audit.py tests/test_backup.py
         tests/test_attack_audit_backup.py tests/test_deploy.py tests/test_ingest.py
         tests/test_alarms.py tests/test_management.py tests/test_status_rules.py)
  echo "== pytest -m 'db and not e2e' ${PASS2[*]} (PostgreSQL at $DSN)"
  OPENSENSE_TEST_DSN=$DSN .venv/bin/python -m pytest -m "db and not e2e" "${PASS2[@]}" "$@"
else
  echo "== no PostgreSQL answers at $DSN: the second database pass is skipped"
fi

echo "== the bench-rig scenarios (pytest -m hil tests/test_hil.py, started beside the main pass)"
HIL_RC=0
wait "$HIL_PID" || HIL_RC=$?
trap - EXIT
cat "$HIL_LOG"
if [ "$HIL_RC" -ne 0 ]; then
  echo "== the bench-rig scenarios failed (exit $HIL_RC; log $HIL_LOG)" >&2
  exit "$HIL_RC"
fi
