"""One run: data -> attack -> model -> defense -> train -> evaluate -> run directory.

Everything that can be wrong with the input (config, data files, model path, weights format) is
checked before the run directory is created, so a bad run leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import random
import resource
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import PartialState
from datasets import Dataset
from transformers import DataCollatorWithPadding, Trainer, set_seed

from cleantune.analysis.fourier import FourierCallback, make_probe
from cleantune.attacks import attack_data
from cleantune.attacks.poison import PoisonedData
from cleantune.config import AnyRunConfig, RunConfig, made_differently
from cleantune.data import Splits, load_splits, split_off
from cleantune.defenses import Defense, DefenseContext, build_defense
from cleantune.defenses.base import Victim
from cleantune.errors import CleantuneError
from cleantune.evaluation import REJECTED, classification_metrics, predict
from cleantune.io import atomic_write_json, atomic_write_yaml, read_json
from cleantune.models import Loaded, check_weights_are_safe, load_model, merged_adapter, resolve
from cleantune.product import as_delivered, describe, save_product
from cleantune.training import build_trainer, fit, tokenize

log = logging.getLogger("cleantune")
PACKAGES = ("cleantune", "torch", "transformers", "peft", "accelerate", "datasets")


@dataclass(frozen=True)
class Prepared:
    """Validated inputs of a run; ``poisoned`` and ``eval_splits`` stay on the evaluator's side."""

    cfg: RunConfig
    model_path: Path  # the model spec resolved once: hub snapshot, local directory or packaged copy
    splits: Splits
    poisoned: PoisonedData
    eval_splits: Splits
    eval_poisoned: PoisonedData
    defense: Defense


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def source_commit() -> str | None:
    """The commit of the cleantune source that ran ("+dirty" with uncommitted edits), for benchmark rows."""
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


def prepare(cfg: RunConfig) -> Prepared:
    defense = build_defense(cfg.defense)
    defense.check_scenario(cfg.scenario)
    model_path = resolve(cfg.model.spec, cfg.model.allow_pickle)
    check_weights_are_safe(model_path, cfg.model.allow_pickle)
    splits = load_splits(cfg.data, cfg.seed)
    if defense.clean_aux_size >= len(splits.dev):
        raise CleantuneError(
            f"defense.clean_aux asks for {defense.clean_aux_size} clean examples from the dev split, which has "
            f"{len(splits.dev)} (some must stay for checkpoint selection): lower defense.clean_aux or add dev data"
        )
    poison_train = cfg.scenario == "poisoned-data"
    poisoned = attack_data(cfg.attack, splits, cfg.data.data_dir, cfg.seed, train=poison_train)
    if cfg.eval_data is None:
        return Prepared(cfg, model_path, splits, poisoned, splits, poisoned, defense)
    eval_splits = load_splits(cfg.eval_data, cfg.seed)
    if eval_splits.label_names != splits.label_names:
        raise CleantuneError(
            f"eval_data labels {eval_splits.label_names} differ from the training labels {splits.label_names}"
        )
    eval_poisoned = attack_data(cfg.attack, eval_splits, cfg.eval_data.data_dir, cfg.seed, train=False)
    return Prepared(cfg, model_path, splits, poisoned, eval_splits, eval_poisoned, defense)


def defense_context(prepared: Prepared, loaded: Loaded) -> DefenseContext:
    """Only what the scenario allows: the training data as the defender receives it, clean dev data."""
    cfg, defense = prepared.cfg, prepared.defense
    dev, aux = prepared.splits.dev, None
    if defense.clean_aux_size:
        aux, dev = split_off(prepared.splits.dev, defense.clean_aux_size, cfg.seed)
    train = prepared.poisoned.train.select_columns(["text", "label"])
    return DefenseContext(
        scenario=cfg.scenario,
        train=train,
        dev=dev.select_columns(["text", "label"]),
        clean_aux=aux.select_columns(["text", "label"]) if aux is not None else None,
        tokenizer=loaded.tokenizer,
        max_length=cfg.model.max_length,
        num_labels=prepared.splits.num_labels,
        seed=cfg.seed,
    )


def fourier_callback(prepared: Prepared, model: torch.nn.Module, loaded: Loaded, run_dir: Path) -> FourierCallback:
    """Probes of the clean and the backdoor mapping: clean and poisoned training rows (or, when the
    training data is clean, the triggered test set). Evaluator side: the defense never sees them."""
    cfg = prepared.cfg
    assert cfg.fourier is not None
    poisoned = set(prepared.poisoned.poisoned_idx)
    train = prepared.poisoned.train
    clean = train.filter(lambda row: row["idx"] not in poisoned)
    backdoor = train.filter(lambda row: row["idx"] in poisoned) if poisoned else prepared.poisoned.test_poison
    num_labels = prepared.splits.num_labels
    probes = [
        make_probe(name, data, model, loaded.tokenizer, num_labels, cfg.fourier, cfg.seed)
        for name, data in (("clean", clean), ("backdoor", backdoor))
        if len(data)
    ]
    return FourierCallback(probes, cfg.fourier, run_dir / "fourier.jsonl")


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


def score(trainer: Trainer, prepared: Prepared, ctx: DefenseContext) -> dict[str, Any]:
    """CACC/ASR of the trained model; a test-time defense first calibrates on clean dev data, then
    rewrites or rejects every test input, clean or triggered alike."""
    cfg, defense = prepared.cfg, prepared.defense
    victim = Victim(trainer.model, ctx.tokenizer, cfg.model.max_length, cfg.train.eval_batch_size)
    defense.calibrate(victim, ctx)

    def predict_fn(data: Dataset) -> tuple[np.ndarray, np.ndarray | None]:
        screened = defense.screen(victim, list(data["text"]))
        if screened is None:
            return predict(trainer, tokenize(data, ctx.tokenizer, cfg.model.max_length)), None
        rewritten = data.remove_columns("text").add_column("text", screened.texts)
        predictions = predict(trainer, tokenize(rewritten, ctx.tokenizer, cfg.model.max_length))
        predictions[screened.rejected] = REJECTED
        return predictions, screened.rejected

    target = getattr(cfg.attack, "target_label", None)
    return classification_metrics(predict_fn, prepared.eval_splits.test, prepared.eval_poisoned.test_poison, target)


def config_key(cfg: RunConfig) -> str:
    return hashlib.sha256(json.dumps(cfg.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def load_start(prepared: Prepared) -> Loaded:
    """The model the defense starts from (a suspicious adapter merged into its base), its head
    named after the task's labels so the product describes itself."""
    cfg, labels = prepared.cfg, prepared.splits.label_names
    loaded = merged_adapter(
        load_model(prepared.model_path, num_labels=len(labels), allow_pickle=cfg.model.allow_pickle)
    )
    loaded.model.config.id2label = dict(enumerate(labels))
    loaded.model.config.label2id = {name: i for i, name in enumerate(labels)}
    return loaded


def train_reference(prepared: Prepared, ctx: DefenseContext, out_dir: Path) -> Victim:
    """The model the defense trains, on the unfiltered data: what a data filter inspects."""
    cfg = prepared.cfg
    loaded = load_start(prepared)
    model = prepared.defense.prepare(loaded.model, ctx)
    trainer = build_trainer(
        model,
        loaded.tokenizer,
        prepared.defense,
        cfg.train,
        out_dir,
        cfg.seed,
        train=tokenize(ctx.train, loaded.tokenizer, cfg.model.max_length),
        dev=tokenize(ctx.dev, loaded.tokenizer, cfg.model.max_length),
    )
    fit(trainer, out_dir)
    return Victim(trainer.model, loaded.tokenizer, cfg.model.max_length, cfg.train.eval_batch_size)


def filter_training(prepared: Prepared, ctx: DefenseContext, run_dir: Path) -> tuple[DefenseContext, dict | None]:
    """The training data a data-filtering defense keeps. Its decision is saved with the run, so an
    interrupted run does not train the reference model again; detection precision and recall
    against the attack's record are computed here, on the evaluator's side."""
    saved, key = run_dir / "train_filter.json", config_key(prepared.cfg)
    decision = read_json(saved) if saved.exists() else None
    if decision is None or decision.get("config_key") != key:
        reference = run_dir / "checkpoints" / "reference"
        keep = prepared.defense.filter_train(ctx, lambda: train_reference(prepared, ctx, reference))
        if keep is None:
            return ctx, None
        decision = {"config_key": key, "keep": keep.tolist(), "info": prepared.defense.info()}
        atomic_write_json(saved, decision)
    keep = np.asarray(decision["keep"], dtype=bool)
    poisoned = np.isin(np.asarray(prepared.poisoned.train["idx"]), prepared.poisoned.poisoned_idx)
    caught = int((~keep & poisoned).sum())
    report = {
        "removed": int((~keep).sum()),
        "kept": int(keep.sum()),
        "precision": caught / max(int((~keep).sum()), 1) * 100,
        "recall": caught / poisoned.sum() * 100 if poisoned.any() else None,
        **decision["info"],
    }
    return replace(ctx, train=ctx.train.select(np.flatnonzero(keep))), report


def evaluate(cfg: AnyRunConfig, spec: str) -> dict[str, Any]:
    """CACC/ASR (judged ASR, false-trigger rate, perplexity for generation) of a trained model or
    adapter (``spec``) on the data and attack ``cfg`` describes."""
    if not isinstance(cfg, RunConfig):
        from cleantune.generative.pipeline import evaluate as evaluate_llm

        return evaluate_llm(cfg, spec)
    prepared = prepare(cfg)
    loaded = load_model(spec, num_labels=prepared.eval_splits.num_labels, allow_pickle=cfg.model.allow_pickle)
    return evaluate_loaded(prepared, loaded)


def evaluate_loaded(prepared: Prepared, loaded: Loaded) -> dict[str, Any]:
    """CACC/ASR of a model in memory, for analyses that score one model under several edits."""
    cfg = prepared.cfg
    with tempfile.TemporaryDirectory() as scratch:
        trainer = build_trainer(loaded.model, loaded.tokenizer, prepared.defense, cfg.train, Path(scratch), cfg.seed)
        return score(trainer, prepared, defense_context(prepared, loaded))


def claim_run_dir(cfg: AnyRunConfig, force: bool) -> dict[str, Any] | None:
    """The finished record to return, or None to run. A directory made by another config is never
    reused silently: refused, or with ``force`` cleared, as is a finished one."""
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


def run(cfg: AnyRunConfig, force: bool = False) -> dict[str, Any]:
    """Run ``cfg`` (classification or generation). A finished run is returned as it is and an
    interrupted one resumes, if the same config made it; ``force`` starts afresh."""
    done = claim_run_dir(cfg, force)
    if done is not None:
        return done
    if isinstance(cfg, RunConfig):
        prepared: Any = prepare(cfg)
        execute_prepared = execute
    else:
        from cleantune.generative import pipeline as generative

        prepared, execute_prepared = generative.prepare(cfg), generative.execute
    if force:  # only once the inputs are known to be good: a bad rerun keeps the old results
        shutil.rmtree(cfg.run_dir, ignore_errors=True)
    fresh = not cfg.run_dir.exists()
    try:
        return execute_prepared(prepared)
    except Exception:
        if fresh and not (cfg.run_dir / "checkpoints").exists():  # nothing to resume: leave nothing behind
            shutil.rmtree(cfg.run_dir, ignore_errors=True)
        raise


@contextmanager
def random_state_kept() -> Iterator[None]:
    """Python's, NumPy's and torch's random states as they were before the block. Seeding again
    instead would make a defense's new modules repeat the random numbers that initialised the
    model's fresh classifier head, so the two would start correlated."""
    python, numpy = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
            yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy)


def execute(prepared: Prepared) -> dict[str, Any]:
    cfg = prepared.cfg
    started = time.time()
    run_dir = open_run_dir(cfg, cfg.attack.model_dump(mode="json"), prepared.poisoned.poisoned_idx)

    set_seed(cfg.seed)
    loaded = load_start(prepared)
    with random_state_kept():  # the same initialisation whether or not a reference model was trained first
        ctx, filtering = filter_training(prepared, defense_context(prepared, loaded), run_dir)
    model = prepared.defense.prepare(loaded.model, ctx)
    trainable, total = count_parameters(model)

    def encode(data: Dataset) -> Dataset:
        return tokenize(data, loaded.tokenizer, cfg.model.max_length)

    checkpoints = run_dir / "checkpoints"
    trainer = build_trainer(
        model,
        loaded.tokenizer,
        prepared.defense,
        cfg.train,
        checkpoints,
        cfg.seed,
        train=tokenize(ctx.train, loaded.tokenizer, cfg.model.max_length, prepared.defense.side_encoding()),
        dev=encode(ctx.dev),
        callbacks=[fourier_callback(prepared, model, loaded, run_dir)] if cfg.fourier else None,
    )
    train_info = fit(trainer, checkpoints)
    trainer.model = prepared.defense.finalize(trainer.model)
    metrics = score(trainer, prepared, ctx)
    product = None
    if trainer.is_world_process_zero():
        probe = DataCollatorWithPadding(loaded.tokenizer)(list(encode(ctx.dev.select(range(min(16, len(ctx.dev)))))))
        probe.pop("labels", None)
        delivered = as_delivered(trainer.model, loaded, prepared.splits.num_labels, dict(probe))
        product = save_product(delivered, loaded, run_dir)
    record = {
        "metrics": metrics,
        "train": train_info,
        "model_path": str(loaded.path),
        "product": str(product) if product else None,
        "base_model": loaded.base_id,
        "n_train": len(ctx.train),
        "data_sha256": fingerprint(ctx.train),
        "labels": prepared.splits.label_names,
        "n_poisoned": len(prepared.poisoned.poisoned_idx),
        "defense_info": prepared.defense.info(),
        "train_filter": filtering,
        "trainable_params": trainable,
        "total_params": total,
    }
    return close_run(cfg, record, started, trainer.is_world_process_zero())
