"""What `cleantune list` shows: every defense with the threat models it handles, every attack, and
the models that resolve offline, read from the registries and configs themselves."""

from __future__ import annotations

import typing

from cleantune.attacks import AttackConfig
from cleantune.defenses import CLASSIFICATION
from cleantune.generative.attacks import LLMAttackConfig
from cleantune.generative.config import GENERATION
from cleantune.offline import offline_models
from cleantune.registry import config_names

Rows = list[tuple[str, ...]]


def _union(annotated: object) -> tuple[type, ...]:
    return typing.get_args(typing.get_args(annotated)[0])  # Annotated[A | B | ..., Field(...)]


def defenses() -> Rows:
    return [
        (name, registry.task, ", ".join(sorted(defense.scenarios)))
        for registry in (CLASSIFICATION, GENERATION)
        for name, defense in registry.names().items()
    ]


def attacks() -> Rows:
    classification: Rows = [
        (n, "classification") for cfg in _union(AttackConfig) for n in config_names(cfg) if n != "none"
    ]
    generation: Rows = [(n, "generation") for n in config_names(LLMAttackConfig)]
    return classification + generation


def catalog() -> list[tuple[str, tuple[str, ...], Rows]]:
    return [
        ("Defenses", ("name", "task", "threat models"), defenses()),
        ("Attacks", ("name", "task"), attacks()),
        ("Models available offline", ("hub id", "packaged copy"), list(offline_models().items())),
    ]
