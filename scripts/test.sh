#!/usr/bin/env bash
# Set up, then run every test (the slow ones use the real packaged models).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
