#!/usr/bin/env bash
# One command: install OpenSense into .venv and run the demo on http://127.0.0.1:8080
# (embedded PostgreSQL in .opensense/, a demo account, site and fridges feeding readings).
set -euo pipefail
cd "$(dirname "$0")/.."
. tools/_venv.sh
.venv/bin/python -m pip install -q --disable-pip-version-check -e .
exec .venv/bin/opensense demo "$@"
