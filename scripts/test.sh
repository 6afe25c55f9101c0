#!/usr/bin/env bash
# Installs what is missing, then runs the whole suite (this is what .ci/run calls).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/ruff check server client/interpgw_client tests bench
exec .venv/bin/python -m pytest -ra "$@"
