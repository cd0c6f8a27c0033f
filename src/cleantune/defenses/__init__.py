"""The classification defenses: each registers beside its code (cleantune.registry); importing them
here completes the registry, and the ``defense`` config union is built from it."""

from __future__ import annotations

from cleantune.defenses import (  # noqa: F401 - imported to register
    bki,
    cube,
    finetune,
    muscle_lora,
    onion,
    peft_baselines,
    rap,
    rora,
    strip,
    w2sdefense,
)
from cleantune.defenses.base import Defense, DefenseContext, Scenario
from cleantune.registry import CLASSIFICATION

DefenseConfig = CLASSIFICATION.union()
REGISTRY = CLASSIFICATION.defenses


def build_defense(cfg: object) -> Defense:
    return CLASSIFICATION.build(cfg)


__all__ = ["CLASSIFICATION", "Defense", "DefenseConfig", "DefenseContext", "Scenario", "build_defense"]
