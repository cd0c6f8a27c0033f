"""Supervised fine-tuning of an instruction LLM with LoRA or on all weights.

It injects a backdoor (poisoned-data: train on the poisoned instruction set; with LoRA the product
is the adapter of the adapter-only threat model) and is the "fine-tuning on clean samples" baseline
(poisoned-llm: train the suspicious model on the defender's clean samples; a suspicious adapter
keeps training as it is, a full model gets a LoRA or a full fine-tune).
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from peft import PeftModel, TaskType, get_peft_model
from torch import nn

from cleantune.defenses.base import Scenario
from cleantune.generative.base import LLMContext, LLMDefense
from cleantune.lora import LoraSpec, filled_from, lora_config
from cleantune.registry import GENERATION
from cleantune.schema import StrictModel

# The instruction-tuning LoRA: as the classification one with the usual 0.05 dropout of LLM recipes.
LLM_LORA = LoraSpec(dropout=0.05)
LLMLora = Annotated[LoraSpec, filled_from(LLM_LORA)]


class SFTConfig(StrictModel):
    name: Literal["sft"] = "sft"
    method: Literal["lora", "full"] = "lora"
    lora: LLMLora = LLM_LORA


def add_lora(model: nn.Module, spec: LoraSpec) -> PeftModel:
    return get_peft_model(model, lora_config(spec, model, TaskType.CAUSAL_LM))


def trainable_model(model: nn.Module, method: Literal["lora", "full"], lora: LoraSpec) -> nn.Module:
    """A suspicious adapter trains on (LoRA) or is merged first (full); a plain model gets a fresh LoRA."""
    if isinstance(model, PeftModel):
        if method == "full":
            return model.merge_and_unload()
        for name, param in model.named_parameters():
            param.requires_grad_("lora_" in name)
        return model
    return add_lora(model, lora) if method == "lora" else model


class SFT(LLMDefense):
    scenarios: ClassVar[frozenset[Scenario]] = frozenset({"poisoned-data", "poisoned-llm"})
    trains = True

    def prepare(self, model: nn.Module, ctx: LLMContext) -> nn.Module:
        return trainable_model(model, self.cfg.method, self.cfg.lora)


GENERATION.register(SFTConfig, SFT)
