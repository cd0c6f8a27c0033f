"""STRIP (Gao et al., 2021), text version: reject inputs whose prediction survives heavy perturbation.

Each input is copied ``copies`` times; in each copy a share ``swap_ratio`` of its words is replaced
by the highest-TF-IDF words of a random clean dev sentence. A clean input's prediction wavers, so
the mean entropy of the copies' class distributions is high; a triggered input keeps predicting
the target, so its entropy is low. The rejection threshold is the ``frr`` quantile of clean dev
entropies: it rejects that share of clean inputs. Perturbations are seeded by the run seed and the
text, so an input is perturbed the same way wherever it appears.
"""

from __future__ import annotations

import hashlib
from typing import Literal

import numpy as np
from pydantic import Field, PositiveInt
from sklearn.feature_extraction.text import TfidfVectorizer

from cleantune.defenses.base import DefenseContext, InputScreen, Screened, Victim
from cleantune.defenses.data_level import Under, dev_sample, low_threshold, words
from cleantune.defenses.finetune import FineTuneConfig
from cleantune.registry import CLASSIFICATION
from cleantune.schema import StrictModel


class StripConfig(StrictModel):
    name: Literal["strip"] = "strip"
    under: Under = FineTuneConfig(name="none")
    copies: PositiveInt = 10
    swap_ratio: float = Field(0.5, gt=0, le=1)
    frr: float = Field(0.01, gt=0, lt=1)  # false-rejection rate on clean dev data
    dev_samples: PositiveInt = 500


def replacement_words(texts: list[str]) -> list[list[str]]:
    """Per clean sentence, its words by decreasing TF-IDF weight (the replacements STRIP draws)."""
    vectorizer = TfidfVectorizer(token_pattern=r"\S+", lowercase=False)
    weights = vectorizer.fit_transform(texts)
    vocabulary = vectorizer.get_feature_names_out()
    ranked = []
    for row in range(weights.shape[0]):
        entries = weights.getrow(row)
        order = np.argsort(-entries.data, kind="stable")
        ranked.append([str(vocabulary[entries.indices[i]]) for i in order])
    return [r for r in ranked if r]


def entropy(probs: np.ndarray) -> np.ndarray:
    return -(probs * np.log(np.clip(probs, 1e-12, None))).sum(axis=-1)


class Strip(InputScreen):
    scenarios = frozenset({"poisoned-data", "poisoned-weights"})

    def __init__(self, cfg: StripConfig) -> None:
        super().__init__(cfg)
        self.donors: list[list[str]] = []
        self.threshold: float | None = None
        self.seed = 0

    def perturb(self, text: str) -> list[str]:
        tokens = words(text) or [""]
        digest = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)
        rng = np.random.default_rng([self.seed, digest])
        swaps = max(1, round(self.cfg.swap_ratio * len(tokens)))
        copies = []
        for _ in range(self.cfg.copies):
            donor = self.donors[rng.integers(len(self.donors))]
            changed = list(tokens)
            for k, position in enumerate(rng.choice(len(tokens), size=min(swaps, len(tokens)), replace=False)):
                changed[position] = donor[k % len(donor)]
            copies.append(" ".join(changed))
        return copies

    def entropies(self, victim: Victim, texts: list[str]) -> np.ndarray:
        copies = [copy for text in texts for copy in self.perturb(text)]
        per_copy = entropy(victim.probs(copies)).reshape(len(texts), self.cfg.copies)
        return per_copy.mean(axis=1)

    def calibrate(self, victim: Victim, ctx: DefenseContext) -> None:
        self.seed = ctx.seed
        texts = list(dev_sample(ctx, self.cfg.dev_samples)["text"])
        self.donors = replacement_words(texts)
        clean = self.entropies(victim, texts)
        self.threshold = low_threshold(clean, self.cfg.frr)
        self.decided = {"threshold": self.threshold, "dev_rejected_pct": float(np.mean(clean < self.threshold) * 100)}

    def screen(self, victim: Victim, texts: list[str]) -> Screened:
        if self.threshold is None:
            raise RuntimeError("STRIP screens inputs only after calibrate() has set its threshold")
        return Screened(list(texts), self.entropies(victim, texts) < self.threshold)


CLASSIFICATION.register(StripConfig, Strip)
