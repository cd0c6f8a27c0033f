#!/usr/bin/env bash
# Set up, then run the embedded default job: packaged MiniLM + Rotten Tomatoes, BadNet 10 % dirty, LoRA.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/cleantune run "$@"
