"""Quantization baseline: weight-only round-to-nearest quantization of the decoder's linear layers.

Each output row is split into groups of ``group_size`` inputs with one symmetric scale per group
(absmax / (2^(bits-1) - 1)); weights are rounded to that grid and stored dequantized, which gives
the numerics of int8 / int4 weight-only kernels on any device, CPU included. An adapter is merged
first: quantization acts on the deployed weights, so the product is a full model.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from peft import PeftModel
from pydantic import PositiveInt
from torch import nn

from cleantune.defenses.base import Scenario
from cleantune.generative.base import LLMContext, LLMDefense, decoder_layers
from cleantune.registry import GENERATION
from cleantune.schema import StrictModel


class QuantizeConfig(StrictModel):
    name: Literal["quantize"] = "quantize"
    bits: Literal[4, 8] = 8
    group_size: PositiveInt = 128


def round_to_grid(weight: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    rows, cols = weight.shape
    pad = (-cols) % group_size
    groups = nn.functional.pad(weight.float(), (0, pad)).view(rows, -1, group_size)
    levels = 2 ** (bits - 1) - 1
    scale = groups.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / levels
    quantized = (groups / scale).round().clamp(-levels - 1, levels) * scale
    return quantized.view(rows, -1)[:, :cols].to(weight.dtype)


class Quantization(LLMDefense):
    scenarios: ClassVar[frozenset[Scenario]] = frozenset({"poisoned-llm"})

    def __init__(self, cfg: QuantizeConfig) -> None:
        super().__init__(cfg)
        self.layers = 0

    def prepare(self, model: nn.Module, ctx: LLMContext) -> nn.Module:
        if isinstance(model, PeftModel):
            model = model.merge_and_unload()
        linears = [m for layer in decoder_layers(model) for m in layer.modules() if isinstance(m, nn.Linear)]
        with torch.no_grad():
            for module in linears:
                module.weight.copy_(round_to_grid(module.weight, self.cfg.bits, self.cfg.group_size))
        self.layers = len(linears)
        return model

    def info(self) -> dict[str, Any]:
        return {"quantized_layers": self.layers, "bits": self.cfg.bits}


GENERATION.register(QuantizeConfig, Quantization)
