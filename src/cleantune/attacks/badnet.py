"""BadNet for text (Kurita et al., 2020): rare words inserted at random positions."""

from __future__ import annotations

import random
from typing import Literal

from pydantic import Field, PositiveInt

from cleantune.attacks.poison import PoisonConfig, Trigger, insert_words


class BadNetConfig(PoisonConfig):
    name: Literal["badnet"] = "badnet"
    triggers: list[str] = Field(default_factory=lambda: ["cf", "mn", "bb", "tq"], min_length=1)
    num_insertions: PositiveInt = 1  # the MuScleLoRA authors insert 4


def trigger(cfg: BadNetConfig) -> Trigger:
    def insert(text: str, idx: int, rng: random.Random) -> str:
        for _ in range(cfg.num_insertions):
            text = insert_words(text, [rng.choice(cfg.triggers)], rng)
        return text

    return Trigger(insert)
