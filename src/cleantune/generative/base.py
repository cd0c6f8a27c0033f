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
    j * span to (j + 1) * span - 1 (span 1 for an MLP channel, the head size for an attention head).
    A block shared by ``group`` channels (a key / value head under grouped-query attention) is block
    j // group."""

    module: nn.Module
    axis: int
    span: int = 1
    group: int = 1
    owner: nn.Module | None = None  # adapter-only: the LoRA layer whose factor ``module`` is
    adapter: str = "default"

    def indices(self, channels: torch.Tensor) -> torch.Tensor:
        """The rows or columns of ``channels`` (local indices) in this weight."""
        blocks = torch.unique(channels // self.group) if self.group > 1 else channels
        offsets = torch.arange(self.span, device=channels.device)
        return (blocks[:, None] * self.span + offsets).flatten()

    def vectors(self, delta: bool = False) -> torch.Tensor:
        """(channels, features): each channel's rows or columns of the weight, or with ``delta`` (adapter
        only) of the update ΔW = BA its LoRA layer makes; a shared block repeats for each channel."""
        owner = self.owner
        weight = owner.get_delta_weight(self.adapter) if delta and owner is not None else self.module.weight
        weight = weight.detach().float()
        weight = weight if self.axis == 0 else weight.T
        return weight.reshape(weight.shape[0] // self.span, -1).repeat_interleave(self.group, dim=0)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(getattr(base, "model", base), "layers", None)
    if layers is None:
        raise CleantuneError(f"{type(base).__name__} has no decoder layers at .model.layers (Llama-style models only)")
    return layers


def _slice(
    linear: nn.Module, axis: int, adapter_only: bool, adapter: str, span: int = 1, group: int = 1
) -> ChannelSlice | None:
    """In the adapter-only setting a weight's rows are written by its lora_B and its columns read by its
    lora_A, so those factors stand for it and the base stays as it is; None where it has no LoRA."""
    if not adapter_only:
        return ChannelSlice(linear, axis, span, group)
    factor = getattr(linear, "lora_B" if axis == 0 else "lora_A", None)
    return ChannelSlice(factor[adapter], axis, span, group, linear, adapter) if factor is not None else None


def mlp_channels(model: nn.Module, adapter_only: bool, adapter: str = "default") -> Iterator[list[ChannelSlice]]:
    """Per decoder layer, the weights that hold its MLP channels: a channel is a row of gate/up and
    the matching column of down (in the adapter-only setting, the LoRA factors that write them)."""
    for layer in decoder_layers(model):
        mlp = layer.mlp
        found = [_slice(mlp.gate_proj, 0, adapter_only, adapter), _slice(mlp.up_proj, 0, adapter_only, adapter)]
        found.append(_slice(mlp.down_proj, 1, adapter_only, adapter))
        yield [s for s in found if s is not None]


def head_channels(
    model: nn.Module, adapter_only: bool, adapter: str = "default", kv: bool = False
) -> Iterator[list[ChannelSlice]]:
    """Per decoder layer, the weights that hold its attention heads: a head is its block of q_proj rows
    and the matching block of o_proj columns; with ``kv`` also the k_proj and v_proj rows of its key /
    value head, which under grouped-query attention a group of query heads shares."""
    for layer in decoder_layers(model):
        attn = layer.self_attn
        found = [_slice(attn.q_proj, 0, adapter_only, adapter, attn.head_dim)]
        if kv:
            group = int(getattr(attn, "num_key_value_groups", 1))
            found += [_slice(p, 0, adapter_only, adapter, attn.head_dim, group) for p in (attn.k_proj, attn.v_proj)]
        found.append(_slice(attn.o_proj, 1, adapter_only, adapter, attn.head_dim))
        yield [s for s in found if s is not None]
