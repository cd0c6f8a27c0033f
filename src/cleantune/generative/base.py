"""What a defense of an instruction-tuned LLM receives, and the MLP channels it may edit.

The defender of a suspicious LLM holds the model (full weights, or only a LoRA adapter on a base it
can run) and clean instruction data; never the trigger, the target behaviour or triggered prompts.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
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


class LLMDefense(Defense[LLMContext]):
    trains: bool = False  # whether the pipeline fine-tunes the prepared model on ``training_rows``

    def training_rows(self, ctx: LLMContext) -> Dataset:
        return ctx.train


@dataclass(frozen=True)
class ChannelSlice:
    """Where channel j of a layer lives in one weight: rows (axis 0) or columns (axis 1)
    j * span to (j + 1) * span - 1 (span 1 for an MLP channel, the head size for an attention head)."""

    module: nn.Module
    axis: int
    span: int = 1

    def indices(self, channels: torch.Tensor) -> torch.Tensor:
        """The rows or columns of ``channels`` (local indices) in this weight."""
        offsets = torch.arange(self.span, device=channels.device)
        return (channels[:, None] * self.span + offsets).flatten()


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(getattr(base, "model", base), "layers", None)
    if layers is None:
        raise CleantuneError(f"{type(base).__name__} has no decoder layers at .model.layers (Llama-style models only)")
    return layers


def _slice(linear: nn.Module, axis: int, adapter_only: bool, adapter: str, span: int = 1) -> ChannelSlice | None:
    """In the adapter-only setting a weight's rows are written by its lora_B and its columns read by its
    lora_A, so those factors stand for it and the base stays as it is; None where it has no LoRA."""
    if not adapter_only:
        return ChannelSlice(linear, axis, span)
    factor = getattr(linear, "lora_B" if axis == 0 else "lora_A", None)
    return ChannelSlice(factor[adapter], axis, span) if factor is not None else None


def mlp_channels(model: nn.Module, adapter_only: bool, adapter: str = "default") -> Iterator[list[ChannelSlice]]:
    """Per decoder layer, the weights that hold its MLP channels: a channel is a row of gate/up and
    the matching column of down (in the adapter-only setting, the LoRA factors that write them)."""
    for layer in decoder_layers(model):
        mlp = layer.mlp
        found = [_slice(mlp.gate_proj, 0, adapter_only, adapter), _slice(mlp.up_proj, 0, adapter_only, adapter)]
        found.append(_slice(mlp.down_proj, 1, adapter_only, adapter))
        yield [s for s in found if s is not None]


def head_channels(model: nn.Module, adapter_only: bool, adapter: str = "default") -> Iterator[list[ChannelSlice]]:
    """Per decoder layer, the weights that hold its attention heads: a head is its block of q_proj rows
    and the matching block of o_proj columns. Keys and values stay out: under grouped-query attention
    a group of heads shares them, so they belong to no single head."""
    for layer in decoder_layers(model):
        attn = layer.self_attn
        found = [_slice(attn.q_proj, 0, adapter_only, adapter, attn.head_dim)]
        found.append(_slice(attn.o_proj, 1, adapter_only, adapter, attn.head_dim))
        yield [s for s in found if s is not None]
