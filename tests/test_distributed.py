"""Two processes under torchrun on the CPU (gloo): the DDP path the Trainer takes on several GPUs."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import run_tree

from cleantune.config import validate
from cleantune.dispatch import evaluate, run
from cleantune.io import read_json


def torchrun(tree: dict, tmp_path: Path, cache: Path) -> dict:
    path = tmp_path / f"{tree['name']}.yaml"
    path.write_text(yaml.safe_dump(tree))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "CLEANTUNE_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*command, "-m", "cleantune", "run", str(path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return read_json(Path(tree["output_dir"]) / tree["name"] / "metrics.json")


def test_gradient_alignment_trains_across_two_processes(data_dir, tiny_bert, tmp_path):
    defense = {"name": "muscle-lora", "clean_aux": 16, "aux_batch_size": 8, "ga_start_epoch": 0, "mu_schedule": "step"}
    tree = run_tree(data_dir, tiny_bert, tmp_path / "runs", name="ga", defense=defense)
    record = torchrun(tree, tmp_path, tmp_path / "cache")
    assert record["hardware"]["processes"] == 2
    # Each process takes its share of every epoch: the global batch is twice the per-device one.
    batch, epochs = tree["train"]["batch_size"], tree["train"]["epochs"]
    assert record["train"]["steps"] == epochs * math.ceil(record["n_train"] / (2 * batch))
    cfg = validate(tree, "test")
    assert evaluate(cfg, record["product"])["cacc"] == pytest.approx(record["metrics"]["cacc"])


def test_a_teacher_trained_by_two_processes_is_cached_once_and_reused(
    data_dir, tiny_bert, tiny_llama_wide, tmp_path, monkeypatch
):
    defense = {"name": "w2sdefense", "teacher": {"spec": str(tiny_bert), "epochs": 1, "batch_size": 16}}
    tree = run_tree(
        data_dir, tiny_llama_wide, tmp_path / "runs", name="w2s", defense=defense, scenario="poisoned-weights"
    )
    first = torchrun(tree, tmp_path, tmp_path / "cache")
    assert first["defense_info"]["teacher_reused"] is False
    (entry,) = (tmp_path / "cache" / "teachers").iterdir()  # no checkpoints or half-moved copies left
    assert {p.name for p in entry.iterdir()} == {"teacher.json", "teacher.safetensors"}
    monkeypatch.setenv("CLEANTUNE_CACHE", str(tmp_path / "cache"))
    second = run(validate({**tree, "name": "again"}, "test"))
    assert second["defense_info"]["teacher_reused"] is True
    assert second["defense_info"]["teacher_train_s"] == first["defense_info"]["teacher_train_s"]
