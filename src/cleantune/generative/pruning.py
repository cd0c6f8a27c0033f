"""Pruning baselines for a suspicious LLM: magnitude pruning, and fine-pruning (Liu et al., 2018):
prune the MLP channels least active on clean inputs, then fine-tune on the clean samples.

In the adapter-only setting only the adapter is pruned (its LoRA factors; for channels, the rows
and columns of the factors that write them). Masks come from ``torch.nn.utils.prune`` so pruned
weights stay zero during the fine-tune and are made permanent before the product is saved.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, PositiveInt
from torch import nn
from torch.nn.utils import prune

from cleantune.data import subsample
from cleantune.defenses.base import Scenario
from cleantune.generative.base import LLMContext, LLMDefense, decoder_layers, mlp_channels
from cleantune.generative.instructions import prompt_ids
from cleantune.generative.sft import LLM_LORA, trainable_model
from cleantune.registry import GENERATION
from cleantune.schema import StrictModel


class PruneConfig(StrictModel):
    name: Literal["prune"] = "prune"
    criterion: Literal["magnitude", "activation"] = "magnitude"
    sparsity: float = Field(0.3, gt=0, lt=1)  # per weight (magnitude) or per layer's channels (activation)
    fine_tune: bool = False  # fine-pruning = activation + fine_tune
    activation_samples: PositiveInt = 64  # clean prompts whose MLP activations rank the channels


def _prunable(model: nn.Module, adapter_only: bool) -> list[nn.Linear]:
    """Linear layers of the decoder blocks (embeddings and the LM head stay); only the LoRA factors
    when the adapter is all the defender may change."""
    linears = [(n, m) for layer in decoder_layers(model) for n, m in layer.named_modules() if isinstance(m, nn.Linear)]
    return [m for n, m in linears if not adapter_only or ".lora_" in f".{n}"]


@torch.no_grad()
def channel_activity(model: nn.Module, ctx: LLMContext, samples: int) -> list[torch.Tensor]:
    """Mean |input| of each layer's down projection (one value per MLP channel) over clean prompts."""
    model.eval()
    device = next(model.parameters()).device
    layers = decoder_layers(model)
    sums = [torch.zeros(layer.mlp.down_proj.in_features, device=device) for layer in layers]

    def hook(index: int) -> Any:
        def record(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            sums[index] += args[0].detach().abs().flatten(0, -2).sum(0)

        return record

    handles = [layer.mlp.down_proj.register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)]
    tokens = 0
    try:
        for row in subsample(ctx.train, samples, ctx.seed):
            ids = torch.tensor([prompt_ids(ctx.tokenizer, row["instruction"], row["input"])], device=device)
            model(input_ids=ids)
            tokens += ids.shape[1]
    finally:
        for handle in handles:
            handle.remove()
    return [total / max(tokens, 1) for total in sums]


class Pruning(LLMDefense):
    scenarios: ClassVar[frozenset[Scenario]] = frozenset({"poisoned-llm"})

    def __init__(self, cfg: PruneConfig) -> None:
        super().__init__(cfg)
        self.trains = cfg.fine_tune
        self.pruned: list[nn.Module] = []

    def prepare(self, model: nn.Module, ctx: LLMContext) -> nn.Module:
        if self.cfg.criterion == "magnitude":
            for module in _prunable(model, ctx.adapter_only):
                prune.l1_unstructured(module, "weight", amount=self.cfg.sparsity)
                self.pruned.append(module)
        else:
            activity = channel_activity(model, ctx, self.cfg.activation_samples)
            for layer_activity, slices in zip(activity, mlp_channels(model, ctx.adapter_only), strict=True):
                dormant = layer_activity.argsort()[: int(self.cfg.sparsity * len(layer_activity))]
                for piece in slices:
                    mask = torch.ones_like(piece.module.weight)
                    mask.index_fill_(piece.axis, piece.indices(dormant.to(mask.device)), 0.0)
                    prune.custom_from_mask(piece.module, "weight", mask)
                    self.pruned.append(piece.module)
        if not self.trains:
            return model
        return trainable_model(model, "lora" if ctx.adapter_only else "full", LLM_LORA)

    def finalize(self, model: nn.Module) -> nn.Module:
        for module in self.pruned:
            prune.remove(module, "weight")
        return model

    def info(self) -> dict[str, Any]:
        return {"pruned_modules": len(self.pruned)}


GENERATION.register(PruneConfig, Pruning)
