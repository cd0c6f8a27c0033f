"""Run configuration of the generative scenario (``task: generation``), validated like the
classification one and dispatched on ``task`` by :func:`cleantune.config.validate`."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal, Union

from pydantic import Field, PositiveInt

from cleantune.defenses.base import Scenario
from cleantune.generative.attacks import LLMAttackConfig
from cleantune.generative.base import LLMDefense
from cleantune.generative.crow import CROW, CROWConfig
from cleantune.generative.evaluation import LLMEvalConfig
from cleantune.generative.instructions import InstructionDataConfig
from cleantune.generative.pruning import PruneConfig, Pruning
from cleantune.generative.quantization import Quantization, QuantizeConfig
from cleantune.generative.sft import SFT, SFTConfig
from cleantune.generative.signature_purification import SignatureConfig, SignaturePurification
from cleantune.models import ModelConfig
from cleantune.offline import SMOLLM2_ID
from cleantune.schema import RunBase, StrictModel
from cleantune.training import TrainConfig


class NoDefenseConfig(StrictModel):
    name: Literal["none"] = "none"


class NoDefense(LLMDefense):
    """Evaluate the model as it is: the before-defense row."""

    scenarios: ClassVar[frozenset[Scenario]] = frozenset({"poisoned-llm"})


# Each config class with the defense it builds; a config's ``name`` picks it.
_CONFIGS = (NoDefenseConfig, SFTConfig, PruneConfig, QuantizeConfig, CROWConfig, SignatureConfig)
_CLASSES = (NoDefense, SFT, Pruning, Quantization, CROW, SignaturePurification)
LLMDefenseConfig = Annotated[Union[_CONFIGS], Field(discriminator="name")]  # noqa: UP007 - a union built from a tuple
LLM_DEFENSES: dict[type, type[LLMDefense]] = dict(zip(_CONFIGS, _CLASSES, strict=True))


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
    defense: LLMDefenseConfig = NoDefenseConfig()
    train: LLMTrainConfig = LLMTrainConfig()
    eval: LLMEvalConfig = LLMEvalConfig()


def build_llm_defense(cfg: LLMDefenseConfig) -> LLMDefense:
    return LLM_DEFENSES[type(cfg)](cfg)
