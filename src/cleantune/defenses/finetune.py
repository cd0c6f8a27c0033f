"""Full fine-tuning: the vanilla, undefended baseline ("none") and clean full fine-tuning ("fft")."""

from __future__ import annotations

from typing import Literal

from cleantune.defenses.base import Defense
from cleantune.registry import CLASSIFICATION
from cleantune.schema import StrictModel


class FineTuneConfig(StrictModel):
    name: Literal["none", "fft"] = "fft"


class FullFineTune(Defense):
    scenarios = frozenset({"poisoned-data", "poisoned-weights"})


CLASSIFICATION.register(FineTuneConfig, FullFineTune)
