"""AddSent / InSent (Dai et al., 2019): a fixed sentence inserted at a random position."""

from __future__ import annotations

import random
from typing import Literal

from pydantic import Field

from cleantune.attacks.poison import PoisonConfig, Trigger, insert_words


class AddSentConfig(PoisonConfig):
    name: Literal["addsent", "insent"] = "addsent"
    sentence: str = Field("I watch this 3D movie", min_length=1)


def trigger(cfg: AddSentConfig) -> Trigger:
    words = cfg.sentence.split()

    def insert(text: str, idx: int, rng: random.Random) -> str:
        return insert_words(text, words, rng)

    return Trigger(insert)
