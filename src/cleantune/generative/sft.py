"""Supervised fine-tuning of an instruction LLM with LoRA or on all weights.

It injects a backdoor (poisoned-data: train on the poisoned instruction set; with LoRA the product
is the adapter of the adapter-only threat model) and is the "fine-tuning on clean samples" baseline
(poisoned-llm: train the suspicious model on the defender's clean samples; a suspicious adapter
keeps training as it is, a full model gets a LoRA or a full fine-tune).
"""

from __future__ import annotations

from typing import ClassVar, Literal

from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from pydantic import Field, PositiveInt
from torch import nn

from cleantune.defenses.base import Scenario
from cleantune.generative.base import LLMContext, LLMDefense
from cleantune.registry import GENERATION
from cleantune.schema import StrictModel


class LLMLoraConfig(StrictModel):
    r: PositiveInt = 8
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    # PEFT's default for the model type when None (q_proj/v_proj for Llama); "all-linear" adds the MLP.
    targets: list[str] | Literal["all-linear"] | None = None


class SFTConfig(StrictModel):
    name: Literal["sft"] = "sft"
    method: Literal["lora", "full"] = "lora"
    lora: LLMLoraConfig = LLMLoraConfig()


def add_lora(model: nn.Module, cfg: LLMLoraConfig) -> PeftModel:
    return get_peft_model(
        model,
        LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            r=cfg.r,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=cfg.targets,
        ),
    )


def trainable_model(model: nn.Module, method: Literal["lora", "full"], lora: LLMLoraConfig) -> nn.Module:
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

    def prepare(self, model: nn.Module, ctx: LLMContext) -> nn.Module:  # type: ignore[override]
        return trainable_model(model, self.cfg.method, self.cfg.lora)


GENERATION.register(SFTConfig, SFT)
