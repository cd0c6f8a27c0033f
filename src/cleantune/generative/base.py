"""What a defense of an instruction-tuned LLM receives, and the MLP channels it may edit.

The defender of a suspicious LLM holds the model (full weights, or only a LoRA adapter on a base it
can run) and clean instruction data; never the trigger, the target behaviour or triggered prompts.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset
from torch import nn
from transformers import PreTrainedTokenizerBase

from cleantune.defenses.base import Defense
from cleantune.errors import CleantuneError


@dataclass(frozen=True)
class LLMContext:
    train: Dataset  # instruction/input/output rows the defense trains on (clean in poisoned-llm)
    tokenizer: PreTrainedTokenizerBase
    max_length: int
    adapter_only: bool  # the suspicious model arrived as a PEFT adapter: only the adapter may change
    seed: int
    model_path: Path  # the suspicious model or adapter as resolved, for defenses that fine-tune copies of it


class LLMDefense(Defense):
    trains: bool = False  # whether the pipeline fine-tunes the prepared model on ``training_rows``

    def training_rows(self, ctx: LLMContext) -> Dataset:
        return ctx.train


@dataclass(frozen=True)
class ChannelSlice:
    """Where MLP channel j of a layer lives in one weight: row j (axis 0) or column j (axis 1)."""

    module: nn.Module
    axis: int


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(getattr(base, "model", base), "layers", None)
    if layers is None:
        raise CleantuneError(f"{type(base).__name__} has no decoder layers at .model.layers (Llama-style models only)")
    return layers


def mlp_channels(model: nn.Module, adapter_only: bool, adapter: str = "default") -> Iterator[list[ChannelSlice]]:
    """Per decoder layer, the weights that hold its MLP channels: a channel is a row of gate/up and
    the matching column of down. In the adapter-only setting these are the LoRA factors that write
    those rows and columns (lora_B of gate/up, lora_A of down), so the base stays as it is."""
    for layer in decoder_layers(model):
        mlp = layer.mlp
        if not adapter_only:
            yield [ChannelSlice(mlp.gate_proj, 0), ChannelSlice(mlp.up_proj, 0), ChannelSlice(mlp.down_proj, 1)]
            continue
        found = [
            ChannelSlice(getattr(mlp, name).lora_B[adapter], 0)
            for name in ("gate_proj", "up_proj")
            if hasattr(getattr(mlp, name), "lora_B")
        ]
        if hasattr(mlp.down_proj, "lora_A"):
            found.append(ChannelSlice(mlp.down_proj.lora_A[adapter], 1))
        yield found
