"""What the data-level baselines share (ONION, STRIP, RAP at test time; BKI, CUBE on the training set).

They leave training alone: the model trains exactly as ``under`` says (full fine-tuning by default,
the victim the papers defend; LoRA when a suite compares against a LoRA fine-tune), and the
defense acts on the inputs before or after. Thresholds come from clean dev data only.
"""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from datasets import Dataset
from pydantic import Field
from torch import nn

from cleantune.defenses.base import Defense, DefenseContext, Victim
from cleantune.defenses.finetune import FineTuneConfig, FullFineTune
from cleantune.defenses.peft_baselines import LoraTuningConfig, PeftBaseline, VirtualTokenConfig

Under = Annotated[FineTuneConfig | LoraTuningConfig | VirtualTokenConfig, Field(discriminator="name")]


class DataLevelDefense(Defense):
    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        under = cfg.under
        self.training = FullFineTune(under) if isinstance(under, FineTuneConfig) else PeftBaseline(under)
        self.decided: dict[str, Any] = {}

    def prepare(self, model: nn.Module, ctx: DefenseContext) -> nn.Module:
        return self.training.prepare(model, ctx)

    def info(self) -> dict[str, Any]:
        return self.decided


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
