"""BKI (Chen and Dai, 2021): backdoor keyword identification on the training set, then retraining.

A reference model is trained on the (possibly poisoned) training data as usual. For every training
sentence, a word's importance is how far the model's pooled representation moves when the word is
deleted (infinity norm); each sentence contributes its ``top_words`` most important words. A word's
keyword score is its mean importance times log10 of how many sentences nominated it, so a trigger
(important and frequent) outranks both rare outliers and common filler. Samples containing one of
the top ``keywords`` words are dropped and the model is trained again from scratch.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from typing import Literal

import numpy as np
from pydantic import PositiveInt
from tqdm.auto import tqdm

from cleantune.defenses.base import DefenseContext, TrainFilter, Victim
from cleantune.defenses.data_level import Under, deletion_variants, words
from cleantune.defenses.finetune import FineTuneConfig
from cleantune.registry import CLASSIFICATION
from cleantune.schema import StrictModel


class BkiConfig(StrictModel):
    name: Literal["bki"] = "bki"
    under: Under = FineTuneConfig(name="none")
    top_words: PositiveInt = 5  # words each sentence nominates
    keywords: PositiveInt = 1  # keywords treated as triggers


def word_importance(victim: Victim, texts: list[str], chunk: int = 64) -> list[np.ndarray]:
    """Per sentence, ||h(x) - h(x without word i)||_inf for each word i."""
    out = []
    for begin in tqdm(range(0, len(texts), chunk), desc="bki: word importance", unit="chunk"):
        variants, spans = deletion_variants(texts[begin : begin + chunk])
        features = victim.features(variants)
        out += [np.abs(features[at + 1 : at + 1 + n] - features[at]).max(axis=1) for at, n in spans]
    return out


def keyword_scores(texts: list[str], importance: list[np.ndarray], top_words: int) -> dict[str, float]:
    nominated: dict[str, list[float]] = defaultdict(list)
    for text, values in zip(texts, importance, strict=True):
        tokens = [w.lower() for w in words(text)]
        for i in np.argsort(-values, kind="stable")[:top_words]:
            nominated[tokens[i]].append(float(values[i]))
    return {word: float(np.mean(v)) * math.log10(len(v)) for word, v in nominated.items()}


class Bki(TrainFilter):
    scenarios = frozenset({"poisoned-data"})

    def filter_train(self, ctx: DefenseContext, reference: Callable[[], Victim]) -> np.ndarray:
        texts = list(ctx.train["text"])
        scores = keyword_scores(texts, word_importance(reference(), texts), self.cfg.top_words)
        ranked = sorted(scores, key=lambda w: (-scores[w], w))[: self.cfg.keywords]
        self.decided = {"keywords": {w: scores[w] for w in ranked}}
        found = set(ranked)
        return np.array([not found.intersection(w.lower() for w in words(text)) for text in texts])


CLASSIFICATION.register(BkiConfig, Bki)
