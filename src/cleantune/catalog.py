"""What `cleantune list` shows: every defense with the threat models it handles, every attack, and
the models that resolve offline, read from the registries and configs themselves."""

from __future__ import annotations

import typing

from cleantune.attacks import AttackConfig
from cleantune.defenses import REGISTRY
from cleantune.generative.attacks import LLMAttackConfig
from cleantune.generative.config import LLM_DEFENSES
from cleantune.offline import offline_models

Rows = list[tuple[str, ...]]


def _names(config: type) -> list[str]:
    return list(typing.get_args(config.model_fields["name"].annotation))


def _union(annotated: object) -> tuple[type, ...]:
    return typing.get_args(typing.get_args(annotated)[0])  # Annotated[A | B | ..., Field(...)]


def defenses() -> Rows:
    rows = [
        (name, "classification", ", ".join(sorted(cls.scenarios)))
        for cfg, cls in REGISTRY.items()
        for name in _names(cfg)
    ]
    rows += [
        (name, "generation", ", ".join(sorted(cls.scenarios)))
        for cfg, cls in LLM_DEFENSES.items()
        for name in _names(cfg)
    ]
    return rows


def attacks() -> Rows:
    classification = [(n, "classification") for cfg in _union(AttackConfig) for n in _names(cfg) if n != "none"]
    generation = [(n, "generation") for n in _names(LLMAttackConfig)]
    return classification + generation


def catalog() -> list[tuple[str, tuple[str, ...], Rows]]:
    return [
        ("Defenses", ("name", "task", "threat models"), defenses()),
        ("Attacks", ("name", "task"), attacks()),
        ("Models available offline", ("hub id", "packaged copy"), list(offline_models().items())),
    ]
