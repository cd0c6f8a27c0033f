"""Run configuration of the generative scenario (``task: generation``), validated like the
classification one and dispatched on ``task`` by :func:`cleantune.config.validate`."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, PositiveInt

from cleantune.defenses.base import Scenario
from cleantune.generative import (  # noqa: F401 - imported to register
    crow,
    pruning,
    quantization,
    sft,
    signature_purification,
)
from cleantune.generative.attacks import LLMAttackConfig
from cleantune.generative.base import LLMDefense
from cleantune.generative.evaluation import LLMEvalConfig
from cleantune.generative.instructions import InstructionDataConfig
from cleantune.models import ModelConfig
from cleantune.offline import SMOLLM2_ID
from cleantune.registry import GENERATION
from cleantune.schema import RunBase, StrictModel
from cleantune.training import TrainConfig


class AsIsConfig(StrictModel):
    name: Literal["as-is"] = "as-is"


class AsIs(LLMDefense):
    """Evaluate the model as it is: the before-defense row (classification's ``none`` trains instead)."""

    scenarios: ClassVar[frozenset[Scenario]] = frozenset({"poisoned-llm"})


GENERATION.register(AsIsConfig, AsIs)
LLMDefenseConfig = GENERATION.union()  # every generative defense module is imported above
LLM_DEFENSES = GENERATION.defenses


class LLMModelConfig(ModelConfig):
    spec: str = SMOLLM2_ID
    max_length: PositiveInt = 384


class LLMTrainConfig(TrainConfig):
    epochs: float = Field(3.0, gt=0)
    lr: float = Field(2e-4, gt=0)
    batch_size: PositiveInt = 8
    eval_batch_size: PositiveInt = 16
    select_best: bool = False  # no clean dev loss is tracked; the papers train a fixed schedule
    logging_steps: PositiveInt = 10


class LLMRunConfig(RunBase):
    task: Literal["generation"] = "generation"
    # poisoned-data: train on the poisoned instruction set (backdoor injection, or a defense that
    # trains on untrusted data); poisoned-llm: a suspicious model and the defender's clean samples.
    scenario: Literal["poisoned-data", "poisoned-llm"] = "poisoned-llm"
    model: LLMModelConfig = LLMModelConfig()
    data: InstructionDataConfig = InstructionDataConfig()
    attack: LLMAttackConfig | None = None  # triggered test prompts (and, in poisoned-data, the poisons)
    defense: LLMDefenseConfig = AsIsConfig()  # type: ignore[valid-type]  # a union built from the registry
    train: LLMTrainConfig = LLMTrainConfig()
    eval: LLMEvalConfig = LLMEvalConfig()


def build_llm_defense(cfg: object) -> LLMDefense:
    return GENERATION.build(cfg)
