"""Classification metrics: CACC on the clean test split, ASR on triggered non-target examples.

ASR is the share of triggered non-target examples classified as the target label; Δ = CACC − ASR.
All three are percentages in [0, 100]. When a test-time defense rejects an input, it is scored as
OpenBackdoor does: a rejected clean input counts as wrong for CACC, a rejected triggered input as a
failed attack for ASR; the rejection rates are reported next to them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from datasets import Dataset
from transformers import Trainer

REJECTED = -1  # the prediction recorded for an input a defense refused to classify

Predict = Callable[[Dataset], tuple[np.ndarray, np.ndarray | None]]  # predictions, rejected mask (None: none)


def predict(trainer: Trainer, data: Dataset) -> np.ndarray:
    output = trainer.predict(data, metric_key_prefix="predict")
    logits = output.predictions[0] if isinstance(output.predictions, tuple) else output.predictions
    return np.asarray(logits).argmax(axis=-1)


def cacc(predictions: np.ndarray, labels: np.ndarray) -> float:
    return float((predictions == labels).mean() * 100)


def asr(predictions: np.ndarray, target_label: int) -> float:
    return float((predictions == target_label).mean() * 100)


def classification_metrics(
    predict_fn: Predict, test: Dataset, test_poison: Dataset, target_label: int | None
) -> dict[str, float | int | None]:
    """``test`` and ``test_poison`` hold raw texts; ``test_poison`` may be empty (no attack)."""
    predictions, rejected = predict_fn(test)
    clean = cacc(predictions, np.asarray(test["label"]))
    metrics: dict[str, float | int | None] = {"cacc": clean, "asr": None, "delta": None}
    if len(test_poison) and target_label is not None:
        poison_predictions, poison_rejected = predict_fn(test_poison)
        attack = asr(poison_predictions, target_label)
        metrics["asr"], metrics["delta"] = attack, clean - attack
        if poison_rejected is not None:
            metrics["rejected_test_poison"] = float(poison_rejected.mean() * 100)
    if rejected is not None:
        metrics["rejected_test"] = float(rejected.mean() * 100)
    return metrics | {"n_test": len(test), "n_test_poison": len(test_poison)}
