"""One run: data -> attack -> model -> defense -> train -> evaluate -> run directory.

Everything that can be wrong with the input (config, data files, model path, weights format) is
checked before the run directory is created, so a bad run leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase, Trainer, set_seed

from cleantune.analysis.fourier import FourierCallback, make_probe
from cleantune.attacks import attack_data
from cleantune.attacks.poison import PoisonedData
from cleantune.config import RunConfig
from cleantune.data import Splits, load_splits, split_off
from cleantune.defenses import DefenseContext, Roles, build_defense
from cleantune.defenses.base import Victim
from cleantune.errors import CleantuneError
from cleantune.evaluation import REJECTED, classification_metrics, predict
from cleantune.io import atomic_write_json, read_json
from cleantune.models import Loaded, check_weights_are_safe, load_model, merged_adapter, resolve
from cleantune.product import as_delivered, save_product
from cleantune.rundir import close_run, count_parameters, fingerprint, open_run_dir
from cleantune.training import build_trainer, fit, tokenize, trained_model

log = logging.getLogger("cleantune")


@dataclass(frozen=True)
class Prepared:
    """Validated inputs of a run; ``poisoned`` and ``eval_splits`` stay on the evaluator's side."""

    cfg: RunConfig
    model_path: Path  # the model spec resolved once: hub snapshot, local directory or packaged copy
    splits: Splits
    poisoned: PoisonedData
    eval_splits: Splits
    eval_poisoned: PoisonedData
    defense: Roles


def prepare(cfg: RunConfig) -> Prepared:
    defense = build_defense(cfg.defense)
    defense.check_scenario(cfg.scenario)
    model_path = resolve(cfg.model.spec, cfg.model.allow_pickle)
    check_weights_are_safe(model_path, cfg.model.allow_pickle)
    splits = load_splits(cfg.data, cfg.seed)
    aux_size = defense.training.clean_aux_size
    if aux_size >= len(splits.dev):
        raise CleantuneError(
            f"defense.clean_aux asks for {aux_size} clean examples from the dev split, which has "
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
    cfg, training = prepared.cfg, prepared.defense.training
    dev, aux = prepared.splits.dev, None
    if training.clean_aux_size:
        aux, dev = split_off(prepared.splits.dev, training.clean_aux_size, cfg.seed)
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


def score(trainer: Trainer, prepared: Prepared, ctx: DefenseContext) -> dict[str, Any]:
    """CACC/ASR of the trained model; a test-time defense first calibrates on clean dev data, then
    rewrites or rejects every test input, clean or triggered alike."""
    cfg, screen = prepared.cfg, prepared.defense.screen
    victim = Victim(trained_model(trainer), ctx.tokenizer, cfg.model.max_length, cfg.train.eval_batch_size)
    if screen is not None:
        screen.calibrate(victim, ctx)

    def predict_fn(data: Dataset) -> tuple[np.ndarray, np.ndarray | None]:
        if screen is None:
            return predict(trainer, tokenize(data, ctx.tokenizer, cfg.model.max_length)), None
        screened = screen.screen(victim, list(data["text"]))
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
    loaded = merged_adapter(load_model(prepared.model_path, len(labels), cfg.model.allow_pickle, named=cfg.model.spec))
    loaded.model.config.id2label = dict(enumerate(labels))
    loaded.model.config.label2id = {name: i for i, name in enumerate(labels)}
    return loaded


def train_reference(prepared: Prepared, ctx: DefenseContext, out_dir: Path) -> Victim:
    """The model the defense trains, on the unfiltered data: what a data filter inspects."""
    cfg, training = prepared.cfg, prepared.defense.training
    loaded = load_start(prepared)
    model = training.prepare(loaded.model, ctx)
    trainer = build_trainer(
        model,
        loaded.tokenizer,
        training,
        cfg.train,
        out_dir,
        cfg.seed,
        train=tokenize(ctx.train, loaded.tokenizer, cfg.model.max_length),
        dev=tokenize(ctx.dev, loaded.tokenizer, cfg.model.max_length),
    )
    fit(trainer, out_dir)
    return Victim(trained_model(trainer), loaded.tokenizer, cfg.model.max_length, cfg.train.eval_batch_size)


def filter_training(prepared: Prepared, ctx: DefenseContext, run_dir: Path) -> tuple[DefenseContext, dict | None]:
    """The training data a data-filtering defense keeps. Its decision is saved with the run, so an
    interrupted run does not train the reference model again; detection precision and recall
    against the attack's record are computed here, on the evaluator's side."""
    train_filter = prepared.defense.train_filter
    if train_filter is None:
        return ctx, None
    saved, key = run_dir / "train_filter.json", config_key(prepared.cfg)
    decision = read_json(saved) if saved.exists() else None
    if decision is None or decision.get("config_key") != key:
        trained: list[Victim] = []

        def reference() -> Victim:
            trained.append(train_reference(prepared, ctx, run_dir / "checkpoints" / "reference"))
            return trained[-1]

        keep = train_filter.filter_train(ctx, reference)
        decision = {"config_key": key, "keep": keep.tolist(), "info": train_filter.info()}
        # The reference is the undefended model: its scores show what the filter changed (a
        # training-set filter screens no test input, so this is the model as it is).
        reference_model = trained[0] if trained else None
        decision["reference_metrics"] = (
            score_model(reference_model.model, reference_model.tokenizer, prepared, ctx) if reference_model else None
        )
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
        "reference_metrics": decision.get("reference_metrics"),
    }
    return replace(ctx, train=ctx.train.select(np.flatnonzero(keep))), report


def evaluate(cfg: RunConfig, spec: str) -> dict[str, Any]:
    """CACC/ASR of a trained model or adapter (``spec``) on the data and attack ``cfg`` describes."""
    prepared = prepare(cfg)
    loaded = load_model(spec, num_labels=prepared.eval_splits.num_labels, allow_pickle=cfg.model.allow_pickle)
    return evaluate_loaded(prepared, loaded)


def evaluate_loaded(prepared: Prepared, loaded: Loaded) -> dict[str, Any]:
    """CACC/ASR of a model in memory, for analyses that score one model under several edits."""
    return score_model(loaded.model, loaded.tokenizer, prepared, defense_context(prepared, loaded))


def score_model(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prepared: Prepared, ctx: DefenseContext
) -> dict[str, Any]:
    """CACC/ASR of a model outside its training run, through a throwaway Trainer."""
    cfg = prepared.cfg
    with tempfile.TemporaryDirectory() as scratch:
        trainer = build_trainer(model, tokenizer, prepared.defense.training, cfg.train, Path(scratch), cfg.seed)
        return score(trainer, prepared, ctx)


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
    cfg, training = prepared.cfg, prepared.defense.training
    started = time.time()
    run_dir = open_run_dir(cfg, cfg.attack.model_dump(mode="json"), prepared.poisoned.poisoned_idx)

    set_seed(cfg.seed)
    loaded = load_start(prepared)
    with random_state_kept():  # the same initialisation whether or not a reference model was trained first
        ctx, filtering = filter_training(prepared, defense_context(prepared, loaded), run_dir)
    model = training.prepare(loaded.model, ctx)
    trainable, total = count_parameters(model)

    def encode(data: Dataset) -> Dataset:
        return tokenize(data, loaded.tokenizer, cfg.model.max_length)

    checkpoints = run_dir / "checkpoints"
    trainer = build_trainer(
        model,
        loaded.tokenizer,
        training,
        cfg.train,
        checkpoints,
        cfg.seed,
        train=tokenize(ctx.train, loaded.tokenizer, cfg.model.max_length, training.side_encoding()),
        dev=encode(ctx.dev),
        callbacks=[fourier_callback(prepared, model, loaded, run_dir)] if cfg.fourier else None,
    )
    train_info = fit(trainer, checkpoints)
    trainer.model = training.finalize(trained_model(trainer))
    metrics = score(trainer, prepared, ctx)
    product = None
    if trainer.is_world_process_zero():
        probe = ctx.dev["text"][:16]  # where an adapter handed back is checked against the purified model
        delivered = as_delivered(trainer.model, loaded, prepared.splits.num_labels, probe, cfg.model.max_length)
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
