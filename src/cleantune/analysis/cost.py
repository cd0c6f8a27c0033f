"""Per-step training time of several defenses, measured in one process on the same data.

Defenses alternate over ``repeats`` rounds (A B A B ...) so that drift in machine load hits them
alike; the median seconds per step is reported with the ratio to the first defense.
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError
from transformers import set_seed

from cleantune.config import RunConfig
from cleantune.defenses import DefenseConfig, build_defense
from cleantune.errors import CleantuneError
from cleantune.lora import upgrade
from cleantune.models import load_model
from cleantune.pipeline import defense_context, prepare
from cleantune.training import TrainConfig, build_trainer, fit, tokenize


def parse_defense(tree: Any) -> DefenseConfig:
    try:
        return TypeAdapter(DefenseConfig).validate_python(upgrade(tree) if isinstance(tree, dict) else tree)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise CleantuneError(f"invalid defense {tree!r}: {problems}") from None


def seconds_per_step(cfg: RunConfig, defense: DefenseConfig, steps: int) -> float:
    prepared = prepare(cfg.model_copy(update={"defense": defense}))
    prepared = dataclasses.replace(prepared, defense=build_defense(defense))
    set_seed(cfg.seed)
    loaded = load_model(prepared.model_path, num_labels=prepared.splits.num_labels, allow_pickle=cfg.model.allow_pickle)
    ctx = defense_context(prepared, loaded)
    training = prepared.defense.training
    model = training.prepare(loaded.model, ctx)
    size = min(len(ctx.train), steps * cfg.train.batch_size * cfg.train.grad_accum)
    side = training.side_encoding()
    train = tokenize(ctx.train.select(range(size)), loaded.tokenizer, cfg.model.max_length, side)
    args = TrainConfig(**{**cfg.train.model_dump(), "epochs": 1, "select_best": False})
    with tempfile.TemporaryDirectory() as scratch:
        trainer = build_trainer(model, loaded.tokenizer, training, args, Path(scratch), cfg.seed, train=train)
        info = fit(trainer, Path(scratch) / "none")
    return info["train_runtime_s"] / max(info["steps"], 1)


def label(defense: DefenseConfig) -> str:
    """The defense's name and the settings it changes, so two configs of one defense stay apart."""
    changed = flat(defense.model_dump(exclude_defaults=True, exclude={"name"}))
    return defense.name + (f"({', '.join(f'{k}={v}' for k, v in changed.items())})" if changed else "")


def flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as dotted keys (``lora.r``)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out |= flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value}
    return out


def compare(cfg: RunConfig, defenses: list[DefenseConfig], steps: int, repeats: int) -> dict[str, Any]:
    labels = [label(d) for d in defenses]
    if len(set(labels)) < len(labels):
        raise CleantuneError(f"the same defense config is given twice: {', '.join(labels)}")
    times: dict[str, list[float]] = {name: [] for name in labels}
    for _ in range(repeats):
        for name, defense in zip(labels, defenses, strict=True):
            times[name].append(seconds_per_step(cfg, defense, steps))
    medians = {name: statistics.median(values) for name, values in times.items()}
    reference = labels[0]
    return {
        "steps": steps,
        "repeats": repeats,
        "seconds_per_step": medians,
        "all_runs": times,
        "reference": reference,
        "ratio_to_reference": {name: value / medians[reference] for name, value in medians.items()},
    }
