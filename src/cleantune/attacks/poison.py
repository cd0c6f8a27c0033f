"""The data-poisoning procedure every trigger shares (OpenBackdoor conventions).

The poison budget is ``rate`` x the whole training set. Candidates depend on the setting:
``dirty`` poisons non-target examples and relabels them, ``clean`` (clean-label) poisons
target-label examples and keeps their labels, ``mix`` draws from all examples. The evaluator's
triggered set holds only non-target test examples, relabelled to the target.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from datasets import Dataset
from pydantic import Field, NonNegativeInt

from cleantune.errors import CleantuneError
from cleantune.schema import StrictModel

Setting = Literal["dirty", "clean", "mix"]
# (text, row index in the source split, per-example rng) -> triggered text
InsertFn = Callable[[str, int, random.Random], str]


class PoisonConfig(StrictModel):
    setting: Setting = "dirty"
    rate: float = Field(0.1, ge=0.0, le=1.0)
    count: NonNegativeInt | None = None  # an absolute number of poisoned examples; overrides rate
    target_label: NonNegativeInt = 1


@dataclass(frozen=True)
class Trigger:
    insert: InsertFn
    # Pre-generated triggered test texts (paraphrase attacks); None means: insert into the test split.
    test_texts: list[str] | None = None
    # Example ids the trigger cannot go into (a paraphrase the generator failed to produce).
    unavailable: frozenset[int] = frozenset()


@dataclass(frozen=True)
class PoisonedData:
    """``train`` is what a poisoned-data defender receives; the rest is for the evaluator only."""

    train: Dataset
    poisoned_idx: list[int]
    test_poison: Dataset


def example_rng(seed: int, idx: int) -> random.Random:
    # Seeded per example so a trigger's position does not depend on which other rows were drawn.
    return random.Random(f"{seed}:{idx}")


def choose_poisoned(labels: list[int], cfg: PoisonConfig, seed: int, blocked: set[int] | None = None) -> list[int]:
    """Row positions to poison, sorted, drawn with ``seed``; ``blocked`` positions cannot be poisoned."""
    candidates = {
        "dirty": [i for i, y in enumerate(labels) if y != cfg.target_label],
        "clean": [i for i, y in enumerate(labels) if y == cfg.target_label],
        "mix": list(range(len(labels))),
    }[cfg.setting]
    candidates = [i for i in candidates if i not in (blocked or set())]
    wanted = cfg.count if cfg.count is not None else round(cfg.rate * len(labels))
    if wanted > len(candidates):
        raise CleantuneError(
            f"attack wants {wanted} poisoned examples but the '{cfg.setting}' setting has only "
            f"{len(candidates)} candidates (target label {cfg.target_label})"
        )
    return sorted(random.Random(seed).sample(candidates, wanted))


def poison_train(train: Dataset, trigger: Trigger, cfg: PoisonConfig, seed: int) -> tuple[Dataset, list[int]]:
    blocked = {position for position, idx in enumerate(train["idx"]) if idx in trigger.unavailable}
    chosen = set(choose_poisoned(train["label"], cfg, seed, blocked))

    def apply(example: dict, position: int) -> dict:
        if position not in chosen:
            return example
        text = trigger.insert(example["text"], example["idx"], example_rng(seed, example["idx"]))
        return {**example, "text": text, "label": cfg.target_label}

    poisoned = train.map(apply, with_indices=True)
    return poisoned, [train[i]["idx"] for i in sorted(chosen)]


def poison_test(test: Dataset, trigger: Trigger, target_label: int, seed: int) -> Dataset:
    non_target = test.filter(lambda ex: ex["label"] != target_label)
    if trigger.test_texts is not None:
        texts = trigger.test_texts
        if len(texts) > len(non_target):
            texts = random.Random(seed).sample(texts, len(non_target))
        return Dataset.from_dict(
            {"text": list(texts), "label": [target_label] * len(texts), "idx": list(range(len(texts)))}
        )
    seed = seed + 1  # test positions independent of the training positions of the same rows
    return non_target.map(
        lambda ex: {
            **ex,
            "text": trigger.insert(ex["text"], ex["idx"], example_rng(seed, ex["idx"])),
            "label": target_label,
        }
    )


def poison(train: Dataset, test: Dataset, trigger: Trigger, cfg: PoisonConfig, seed: int) -> PoisonedData:
    poisoned, idx = poison_train(train, trigger, cfg, seed)
    return PoisonedData(poisoned, idx, poison_test(test, trigger, cfg.target_label, seed))


def insert_words(text: str, words: list[str], rng: random.Random) -> str:
    """Insert ``words`` as one unit at a uniformly random word boundary of ``text``."""
    tokens = text.split()
    position = rng.randint(0, len(tokens))
    return " ".join(tokens[:position] + words + tokens[position:])
