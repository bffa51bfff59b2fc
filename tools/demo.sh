#!/usr/bin/env bash
# One command: install OpenSense into .venv and run the demo on http://127.0.0.1:8080
# (embedded PostgreSQL in .opensense/, a demo account, site and fridges feeding readings).
set -euo pipefail
cd "$(dirname "$0")/.."
. tools/_venv.sh
.venv/bin/python -m pip install -q --disable-pip-version-check -e .
# the demo nodes run the real firmware on the MicroPython unix port; without it the
# demo still runs and feeds over HTTP (it says why)
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[node]" \
  || echo "demo: could not install the MicroPython unix port; the demo will feed over HTTP" >&2
exec .venv/bin/opensense demo "$@"
