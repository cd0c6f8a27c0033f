#!/usr/bin/env bash
# Set up, then check and test: the lint, format and type gate, the fast unit lane (tiny random models),
# then the slow lane (the real packaged models). Arguments go to pytest alone, skipping the lanes.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
if [ $# -gt 0 ]; then
  exec .venv/bin/python -m pytest -q "$@"
fi
.venv/bin/ruff check src tests
.venv/bin/ruff format --check src tests
.venv/bin/python -m mypy
.venv/bin/python -m pytest -q -m "not slow" --durations=10
.venv/bin/python -m pytest -q -m slow
