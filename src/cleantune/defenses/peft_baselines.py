"""PEFT baselines the papers compare against, configured through Hugging Face PEFT.

LoRA and its variants (DoRA, PiSSA and OLoRA initialisation) and the virtual-token methods
(prefix tuning, prompt tuning, p-tuning). Reducing trainable capacity partly mitigates backdoor
learning (Zhu et al., 2022), which is why the defenses are judged against these.
"""

from __future__ import annotations

from typing import Literal

from peft import (
    PeftConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    TaskType,
    get_peft_model,
)
from peft.tuners.lora import LoraLayer
from pydantic import PositiveInt
from torch import nn

from cleantune.defenses.base import Defense, DefenseContext
from cleantune.lora import LoraSpec, lora_config
from cleantune.models import pad_for_embedded_prompts
from cleantune.registry import CLASSIFICATION
from cleantune.schema import StrictModel


class LoraTuningConfig(StrictModel):
    """LoRA, or with the spec's flags DoRA, PiSSA or OLoRA."""

    name: Literal["lora"] = "lora"
    lora: LoraSpec = LoraSpec()


class VirtualTokenConfig(StrictModel):
    name: Literal["prefix", "prompt", "ptuning"] = "prefix"
    num_virtual_tokens: PositiveInt = 20
    encoder_hidden_size: PositiveInt = 128  # p-tuning's prompt encoder


def virtual_token_config(cfg: VirtualTokenConfig, task_type: TaskType) -> PeftConfig:
    if cfg.name == "prefix":
        return PrefixTuningConfig(task_type=task_type, num_virtual_tokens=cfg.num_virtual_tokens)
    if cfg.name == "prompt":
        return PromptTuningConfig(task_type=task_type, num_virtual_tokens=cfg.num_virtual_tokens)
    return PromptEncoderConfig(
        task_type=task_type, num_virtual_tokens=cfg.num_virtual_tokens, encoder_hidden_size=cfg.encoder_hidden_size
    )


ADAPTER = "default"  # PEFT's name for the single adapter cleantune trains


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    """The LoRA-wrapped layers of a PEFT model, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer) and ADAPTER in m.lora_A}


def task_type(ctx: DefenseContext) -> TaskType:
    return TaskType.SEQ_CLS if ctx.num_labels > 0 else TaskType.CAUSAL_LM


def peft_model(model: nn.Module, cfg: LoraTuningConfig | VirtualTokenConfig, ctx: DefenseContext) -> PeftModel:
    """``model`` wrapped by PEFT as ``cfg`` says, with the padding its scoring needs."""
    if isinstance(cfg, LoraTuningConfig):
        return get_peft_model(model, lora_config(cfg.lora, model, task_type(ctx)))
    wrapped = get_peft_model(model, virtual_token_config(cfg, task_type(ctx)))
    pad_for_embedded_prompts(wrapped, ctx.tokenizer)
    return wrapped


class PeftBaseline(Defense):
    scenarios = frozenset({"poisoned-data", "poisoned-weights"})

    def prepare(self, model: nn.Module, ctx: DefenseContext) -> nn.Module:
        return peft_model(model, self.cfg, ctx)


CLASSIFICATION.register(LoraTuningConfig, PeftBaseline)
CLASSIFICATION.register(VirtualTokenConfig, PeftBaseline)
