"""Defense registry: a config's ``name`` picks the defense class."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from cleantune.defenses.base import Defense, DefenseContext, Scenario
from cleantune.defenses.bki import Bki, BkiConfig
from cleantune.defenses.cube import Cube, CubeConfig
from cleantune.defenses.finetune import FineTuneConfig, FullFineTune
from cleantune.defenses.muscle_lora import MuScleLoRA, MuScleLoRAConfig
from cleantune.defenses.onion import Onion, OnionConfig
from cleantune.defenses.peft_baselines import LoraFamilyConfig, PeftBaseline, VirtualTokenConfig
from cleantune.defenses.rap import Rap, RapConfig
from cleantune.defenses.rora import RoRA, RoRAConfig
from cleantune.defenses.strip import Strip, StripConfig
from cleantune.defenses.w2sdefense import W2SDefense, W2SDefenseConfig

DefenseConfig = Annotated[
    FineTuneConfig
    | LoraFamilyConfig
    | VirtualTokenConfig
    | MuScleLoRAConfig
    | RoRAConfig
    | W2SDefenseConfig
    | OnionConfig
    | StripConfig
    | RapConfig
    | BkiConfig
    | CubeConfig,
    Field(discriminator="name"),
]

REGISTRY: dict[type, type[Defense]] = {
    FineTuneConfig: FullFineTune,
    LoraFamilyConfig: PeftBaseline,
    VirtualTokenConfig: PeftBaseline,
    MuScleLoRAConfig: MuScleLoRA,
    RoRAConfig: RoRA,
    W2SDefenseConfig: W2SDefense,
    OnionConfig: Onion,
    StripConfig: Strip,
    RapConfig: Rap,
    BkiConfig: Bki,
    CubeConfig: Cube,
}


def build_defense(cfg: DefenseConfig) -> Defense:
    return REGISTRY[type(cfg)](cfg)


__all__ = ["Defense", "DefenseConfig", "DefenseContext", "Scenario", "build_defense"]
