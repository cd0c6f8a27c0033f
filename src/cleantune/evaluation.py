"""Classification metrics: CACC on the clean test split, ASR on triggered non-target examples.

ASR is the share of triggered non-target examples classified as the target label; Δ = CACC − ASR.
All three are percentages in [0, 100].
"""

from __future__ import annotations

import numpy as np
from datasets import Dataset
from transformers import Trainer


def predict(trainer: Trainer, data: Dataset) -> np.ndarray:
    output = trainer.predict(data, metric_key_prefix="predict")
    logits = output.predictions[0] if isinstance(output.predictions, tuple) else output.predictions
    return np.asarray(logits).argmax(axis=-1)


def cacc(predictions: np.ndarray, labels: np.ndarray) -> float:
    return float((predictions == labels).mean() * 100)


def asr(predictions: np.ndarray, target_label: int) -> float:
    return float((predictions == target_label).mean() * 100)


def classification_metrics(
    trainer: Trainer, test: Dataset, test_poison: Dataset, target_label: int | None
) -> dict[str, float | int | None]:
    """``test`` and ``test_poison`` are tokenized; ``test_poison`` may be empty (no attack)."""
    clean = cacc(predict(trainer, test), np.asarray(test["label"]))
    attack = asr(predict(trainer, test_poison), target_label) if len(test_poison) and target_label is not None else None
    return {
        "cacc": clean,
        "asr": attack,
        "delta": clean - attack if attack is not None else None,
        "n_test": len(test),
        "n_test_poison": len(test_poison),
    }
