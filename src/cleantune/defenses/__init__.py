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
from cleantune.defenses.base import Defense, DefenseContext, InputScreen, Roles, Scenario, TrainFilter
from cleantune.registry import CLASSIFICATION

DefenseConfig = CLASSIFICATION.union()
REGISTRY = CLASSIFICATION.defenses


def build_defense(cfg: object) -> Roles:
    """The roles ``cfg`` asks for: a training method, or a filter or a screen around its ``under``."""
    built = CLASSIFICATION.build(cfg)
    if isinstance(built, Defense):
        return Roles(built)
    training = CLASSIFICATION.build(cfg.under)
    if isinstance(built, TrainFilter):
        return Roles(training, train_filter=built)
    assert isinstance(built, InputScreen)
    return Roles(training, screen=built)


__all__ = ["CLASSIFICATION", "Defense", "DefenseConfig", "DefenseContext", "Roles", "Scenario", "build_defense"]
