"""What the data-level baselines share (ONION, STRIP, RAP at test time; BKI, CUBE on the training set).

They leave training alone: the model trains exactly as ``under`` says (full fine-tuning by default,
the victim the papers defend; any other training method, so a filter or a screen can be stacked on
a PEFT defense), and the defense acts on the inputs before or after. Thresholds come from clean dev
data only.
"""

from __future__ import annotations

from typing import Annotated

import numpy as np
from datasets import Dataset
from pydantic import Field

from cleantune.defenses.base import DefenseContext, Victim
from cleantune.defenses.finetune import FineTuneConfig
from cleantune.defenses.muscle_lora import MuScleLoRAConfig
from cleantune.defenses.peft_baselines import LoraTuningConfig, VirtualTokenConfig
from cleantune.defenses.rora import RoRAConfig
from cleantune.defenses.w2sdefense import W2SDefenseConfig

# Every training method; a contract test checks that none registered is missing.
Under = Annotated[
    FineTuneConfig | LoraTuningConfig | VirtualTokenConfig | MuScleLoRAConfig | RoRAConfig | W2SDefenseConfig,
    Field(discriminator="name"),
]


def words(text: str) -> list[str]:
    return text.split()


def deletion_variants(texts: list[str]) -> tuple[list[str], list[tuple[int, int]]]:
    """Each text followed by its copies with one word deleted, and per text (where it starts, its
    word count): what ONION and BKI score a word by."""
    variants: list[str] = []
    spans: list[tuple[int, int]] = []
    for text in texts:
        tokens = words(text)
        spans.append((len(variants), len(tokens)))
        variants += [text, *(" ".join(tokens[:i] + tokens[i + 1 :]) for i in range(len(tokens)))]
    return variants, spans


def dev_sample(ctx: DefenseContext, size: int | None) -> Dataset:
    """Up to ``size`` clean dev rows, the same for a given seed."""
    return ctx.dev if size is None or size >= len(ctx.dev) else ctx.dev.shuffle(seed=ctx.seed).select(range(size))


def accuracy(victim: Victim, texts: list[str], labels: list[int]) -> float:
    return float((victim.probs(texts).argmax(axis=1) == np.asarray(labels)).mean() * 100)


def low_threshold(clean_scores: np.ndarray, frr: float) -> float:
    """The score below which a share ``frr`` of clean inputs falls: rejecting inputs under it
    rejects that share of clean data (the false-rejection rate)."""
    return float(np.quantile(clean_scores, frr))
