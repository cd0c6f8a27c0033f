"""One registration for every defense of either task: a method registers its config class and its
defense class beside its code, once (as PEFT's ``register_peft_method``), and each task's config
union is built from what was registered."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, Union

from pydantic import Field


def config_names(config: type) -> tuple[str, ...]:
    """The ``name`` values a defense config accepts (its ``Literal``)."""
    return typing.get_args(config.model_fields["name"].annotation)  # type: ignore[attr-defined]


@dataclass
class Registry:
    task: str
    defenses: dict[type, type] = field(default_factory=dict)

    def register(self, config: type, defense: type) -> None:
        taken = {n for known in self.defenses for n in config_names(known)} & set(config_names(config))
        if taken:
            raise ValueError(f"{self.task} defense name(s) {sorted(taken)} registered twice")
        self.defenses[config] = defense

    def union(self) -> Any:
        """The config union a run config's ``defense`` field takes, told apart by ``name``; in name order,
        so that the schema (and the config reference made from it) does not depend on import order."""
        ordered = sorted(self.defenses, key=lambda config: config_names(config)[0])
        return Annotated[Union[tuple(ordered)], Field(discriminator="name")]  # noqa: UP007 - built at run time

    def build(self, cfg: Any) -> Any:
        return self.defenses[type(cfg)](cfg)

    def names(self) -> dict[str, type[Any]]:
        """Each accepted name -> its defense class."""
        return {n: defense for config, defense in self.defenses.items() for n in config_names(config)}


CLASSIFICATION = Registry("classification")
GENERATION = Registry("generation")
