"""Run directories: what every run records beside its product, and when an existing directory may
be reused. Shared by both tasks' pipelines."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import resource
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from datasets import Dataset

from cleantune.config import AnyRunConfig, made_differently
from cleantune.errors import CleantuneError
from cleantune.io import atomic_write_json, atomic_write_yaml, read_json
from cleantune.product import describe

log = logging.getLogger("cleantune")

PACKAGES = ("cleantune", "torch", "transformers", "peft", "accelerate", "datasets")


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def library_set(found: dict[str, str] | None) -> str | None:
    """The libraries a run's numbers depend on, as one comparable text (from its recorded ``versions``):
    the same config and commit can train another model under other releases of them."""
    if not found:
        return None
    return ", ".join(f"{name} {found[name]}" for name in PACKAGES if name != "cleantune" and name in found)


def source_commit() -> str | None:
    """The commit of the cleantune source that ran ("+dirty" with uncommitted edits), for benchmark rows.
    CLEANTUNE_SOURCE_COMMIT, when set, names it instead: a copy of a checkout (a lent GPU machine's)
    may carry an older git folder, or none."""
    told = os.environ.get("CLEANTUNE_SOURCE_COMMIT")
    if told:
        return told
    here = Path(__file__).parent

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(here), *args], capture_output=True, text=True, check=True).stdout

    try:
        commit = git("rev-parse", "--short", "HEAD").strip()
        return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no", ".").strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return None  # installed from a wheel, or no git


def hardware() -> dict[str, Any]:
    """What ran it, so that times taken on different machines are not compared unawares."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    # The processes that trained together (a process group alone does not mean the Trainer used it).
    processes = PartialState().num_processes
    gpu = torch.cuda.get_device_name(0) if gpus else None
    return {"cpus": os.cpu_count(), "gpus": gpus, "gpu": gpu, "processes": processes}


def peak_memory_mb() -> dict[str, float | None]:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return {"peak_rss_mb": round(rss, 1), "peak_gpu_mb": round(gpu, 1) if gpu is not None else None}


def fingerprint(data: Dataset) -> str:
    """SHA-256 of the rows a model trained on, so a product can be traced to its data."""
    digest = hashlib.sha256()
    for row in data:
        digest.update(json.dumps(row, sort_keys=True).encode())
    return digest.hexdigest()


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def finished(run_dir: Path) -> dict[str, Any] | None:
    metrics = run_dir / "metrics.json"
    return read_json(metrics) if metrics.exists() else None


def open_run_dir(cfg: Any, attack: dict[str, Any] | None, poisoned_idx: list[int]) -> Path:
    """The run directory with the resolved config and the evaluator's attack record; an old
    ``metrics.json`` goes first, so an interrupted rerun never looks finished."""
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.json").unlink(missing_ok=True)
    atomic_write_yaml(run_dir / "config.yaml", cfg.model_dump(mode="json"))
    atomic_write_json(run_dir / "attack_record.json", {"attack": attack, "poisoned_idx": poisoned_idx})
    return run_dir


def close_run(cfg: AnyRunConfig, record: dict[str, Any], started: float, main_process: bool) -> dict[str, Any]:
    """Complete ``record`` with what every run records; the main process writes it and drops checkpoints."""
    run_dir = cfg.run_dir
    record = {"status": "done", "name": cfg.name, "seed": cfg.seed, "scenario": cfg.scenario, **record}
    record |= {"wall_s": round(time.time() - started, 1), **peak_memory_mb()}
    record |= {"versions": versions(), "hardware": hardware(), "commit": source_commit()}
    if main_process:
        if record.get("product"):
            describe(Path(record["product"]), record, cfg.model_dump(mode="json"))
        atomic_write_json(run_dir / "metrics.json", record)
        if not cfg.train.keep_checkpoints:
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return record


def claim_run_dir(cfg: AnyRunConfig, force: bool) -> dict[str, Any] | None:
    """The finished record to return, or None to run. A directory made by another config is never
    reused silently: refused, or with ``force`` cleared; with ``force`` a finished one runs again."""
    changed = made_differently(cfg)
    if changed and not force:
        raise CleantuneError(
            f"run directory '{cfg.run_dir}' was made by a different config ({', '.join(changed)} changed); "
            "rerun with --force (force=True) to replace it, or give the run another name"
        )
    if force:
        return None
    done = finished(cfg.run_dir)
    if done is not None:
        log.info("%s is already finished; returning its results (--force reruns it)", cfg.run_dir)
    elif (cfg.run_dir / "checkpoints").is_dir():
        log.info("resuming the interrupted run in %s", cfg.run_dir)
    return done
