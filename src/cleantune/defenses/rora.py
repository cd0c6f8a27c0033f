"""RoRA (regularised low-rank adaptation): make a weight-poisoned model forget its backdoor.

Scenario: the defender holds a possibly weight-poisoned model and clean data for the target task;
no trigger and no triggered validation data. Three components, each a switch so that every row of
the paper's ablation (Table 5) is one config, and each applies on top of LoRA, DoRA, PiSSA or
OLoRA from PEFT (Table 4):

- ``ci``, clean-strengthened regularisation (Eq. 8): dropout with rate ``p`` on the frozen weight
  during training only, so that the task has to be carried by the update ΔW.
  ``dropout_on="weight"`` masks elements of W_pre, one mask per batch (the paper's wording: "apply
  dropout to the pretrained weights when combining them with the LoRA updates");
  ``"output"`` drops elements of the frozen branch's output W_pre x, a fresh mask per example and
  token (Section 5.1 also speaks of "masking pretrained activations").
- ``tr``, trigger-insensitive regularisation (Eqs. 9-11): λ(‖U_kᵀB‖²_F + ‖A V_k‖²_F) with U_k, V_k
  singular vectors of W_pre, from one SVD per layer at the start. ``subspace="top_k"`` keeps the top
  ``top_k``; ``"full"`` keeps them all, as Eq. 10 literally writes it, which for a square W_pre is
  ‖B‖²_F + ‖A‖²_F, plain weight decay.
- ``pt``, post-training spectral rescaling (Eq. 12): on the adapted layers of the top
  ``rescale_layers`` blocks (a count, or a fraction of the depth: the paper's 3 of BERT-large's 24
  by default) the update is multiplied by s = σ_max(W_pre) / σ_max(ΔW). s multiplies the trained
  update including α/r, so σ_max of the final update equals σ_max(W_pre). Dev evaluation during
  training sees the rescaled model (``as_evaluated``), so the checkpoint kept is the best product.

ΔW is always the change of the layer's effective weight from W_pre, the weight as the defender
received it. On LoRA that is sBA, and s is folded into B so the product stays a plain adapter. On
DoRA it is the merged weight m·(W + sBA)/‖W + sBA‖_c minus W_pre: the rescale sets the frozen weight
and the magnitude so that the merged weight becomes W_pre + s·ΔW. PiSSA and OLoRA start from
B₀A₀ ≠ 0 (the principal part of W moved into the adapter), so their change is s(BA − B₀A₀): the
penalty acts on A − A₀ and B − B₀, and the rescale on that change (folded into the frozen weight).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any, Literal

import torch
from peft.tuners.lora import LoraLayer
from pydantic import Field, PositiveInt
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

from cleantune.defenses.base import Defense, DefenseContext
from cleantune.defenses.peft_baselines import ADAPTER, LoraTuningConfig, lora_layers, peft_model
from cleantune.errors import CleantuneError
from cleantune.lora import LoraSpec
from cleantune.registry import CLASSIFICATION
from cleantune.schema import StrictModel

BLOCK_INDEX = re.compile(r"\.(\d+)\.")
Fraction = Annotated[float, Field(gt=0, le=1)]


class RoRAConfig(StrictModel):
    name: Literal["rora"] = "rora"
    lora: LoraSpec = LoraSpec()  # the adapter RoRA trains; its DoRA / PiSSA / OLoRA flags give the variants
    ci: bool = True
    tr: bool = True
    pt: bool = True
    p: float = Field(0.1, ge=0, lt=1)  # the paper's p
    dropout_on: Literal["weight", "output"] = "weight"
    penalty: float = Field(10.0, ge=0)  # the paper's λ
    subspace: Literal["top_k", "full"] = "top_k"
    top_k: PositiveInt = 32  # the subspace the paper's Figure 2 measures alignment against
    rescale_layers: PositiveInt | Fraction = 0.125  # blocks, or a share of the depth (paper: 3 of 24)


class WeightDropout(nn.Module):
    """A parametrization: the weight, element-wise dropped while its module trains."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        # Eq. 8: W = Dropout_p(W_pre) + sΔW (the LoRA branch adds sΔW)
        return F.dropout(weight, self.p, self.training)


def orthogonality_penalty(A: torch.Tensor, B: torch.Tensor, U_k: torch.Tensor, V_k: torch.Tensor) -> torch.Tensor:
    # Eq. 10: Ω(A, B) = ‖U_kᵀ B‖²_F + ‖A V_k‖²_F  (B: out x r, A: r x in, U_k: out x k, V_k: in x k)
    return (U_k.T @ B).pow(2).sum() + (A @ V_k).pow(2).sum()


def rescale_factor(w_pre_sigma: float, delta: torch.Tensor) -> float:
    # Eq. 12: s = σ_max(W_pre) / σ_max(ΔW)
    sigma = float(torch.linalg.matrix_norm(delta.float(), ord=2))
    return w_pre_sigma / sigma if sigma > 0 else 1.0


def block_count(depth: int, rescale_layers: int | float) -> int:
    """How many top blocks to rescale: a count as given, a fraction of ``depth`` rounded (at least one)."""
    if isinstance(rescale_layers, int):
        return rescale_layers
    return max(1, round(rescale_layers * depth))


def top_blocks(names: list[str], rescale_layers: int | float) -> set[str]:
    """The layers of the top blocks; every layer when names carry no block index."""
    index = {name: int(m.group(1)) for name in names if (m := BLOCK_INDEX.search(f".{name}."))}
    if not index:
        return set(names)
    blocks = sorted(set(index.values()))
    keep = blocks[-block_count(len(blocks), rescale_layers) :]
    return {name for name, i in index.items() if i in keep}


def frozen_weight(layer: LoraLayer) -> torch.Tensor:
    """The frozen weight as stored, without the training-time dropout parametrization."""
    base = layer.get_base_layer()
    return base.parametrizations.weight.original if parametrize.is_parametrized(base, "weight") else base.weight


def effective_weight(layer: LoraLayer) -> torch.Tensor:
    """The weight the layer computes with at inference (DoRA's magnitude and column norm included)."""
    merged = frozen_weight(layer) + layer.get_delta_weight(ADAPTER)
    if layer.use_dora.get(ADAPTER):
        magnitude = layer.lora_magnitude_vector[ADAPTER].weight
        merged = (magnitude / torch.linalg.norm(merged, dim=1))[:, None] * merged
    return merged


def set_effective_weight(layer: LoraLayer, target: torch.Tensor) -> None:
    """Make the layer compute with ``target``, leaving A and B as trained."""
    frozen_weight(layer).copy_(target - layer.get_delta_weight(ADAPTER))
    if layer.use_dora.get(ADAPTER):
        # m = ‖target‖_c makes DoRA's factor m / ‖W + sBA‖_c one
        layer.lora_magnitude_vector[ADAPTER].weight.copy_(torch.linalg.norm(target, dim=1))


class RoRA(Defense):
    scenarios = frozenset({"poisoned-weights"})  # it assumes the training data is clean

    def prepare(self, model: nn.Module, ctx: DefenseContext) -> nn.Module:
        cfg: RoRAConfig = self.cfg
        wrapped = peft_model(model, LoraTuningConfig(lora=cfg.lora), ctx)
        self.layers = lora_layers(wrapped)
        self.top = top_blocks(list(self.layers), cfg.rescale_layers)
        self.subspaces: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.w_pre: dict[str, torch.Tensor] = {}
        self.sigma_pre: dict[str, float] = {}
        # PiSSA and OLoRA start away from zero; the penalty measures the change from that start.
        self.start: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.hooks: list[Any] = []
        for name, layer in self.layers.items():
            base = layer.get_base_layer()
            if not isinstance(base, nn.Linear):
                raise CleantuneError(f"rora adapts linear layers only; '{name}' is a {type(base).__name__}")
            with torch.no_grad():
                w_pre = effective_weight(layer).detach().clone()
                U, S, Vh = torch.linalg.svd(w_pre.float(), full_matrices=False)
            k = min(cfg.top_k, S.numel()) if cfg.subspace == "top_k" else S.numel()
            self.subspaces[name] = (U[:, :k].contiguous(), Vh[:k].T.contiguous())
            self.sigma_pre[name] = float(S[0])
            if name in self.top:
                self.w_pre[name] = w_pre
            if cfg.lora.init != "default":
                self.start[name] = (
                    layer.lora_A[ADAPTER].weight.detach().clone(),
                    layer.lora_B[ADAPTER].weight.detach().clone(),
                )
            if cfg.ci:
                self._add_weight_dropout(base)
        self.scales: dict[str, float] = {}
        return wrapped

    def _add_weight_dropout(self, base: nn.Linear) -> None:
        if self.cfg.dropout_on == "weight":
            parametrize.register_parametrization(base, "weight", WeightDropout(self.cfg.p))
            return

        def drop_output(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
            return F.dropout(output, self.cfg.p, module.training)

        self.hooks.append(base.register_forward_hook(drop_output))

    def extra_loss(self, model: nn.Module, inputs: dict[str, torch.Tensor], outputs: Any) -> dict[str, torch.Tensor]:
        if not self.cfg.tr or self.cfg.penalty == 0:
            return {}
        total = None
        for name, layer in self.layers.items():
            A, B = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
            U_k, V_k = (t.to(A.device, A.dtype) for t in self.subspaces[name])
            self.subspaces[name] = (U_k, V_k)
            if name in self.start:
                A0, B0 = (t.to(A.device, A.dtype) for t in self.start[name])
                self.start[name] = (A0, B0)
                A, B = A - A0, B - B0
            term = orthogonality_penalty(A, B, U_k, V_k)
            total = term if total is None else total + term
        # Eq. 11: L = L_sup + λ Ω(A, B)
        return {} if total is None else {"orthogonality": self.cfg.penalty * total}

    @torch.no_grad()
    def _rescale(self) -> dict[str, float]:
        scales = {}
        for name in sorted(self.top):
            layer = self.layers[name]
            w_pre = self.w_pre[name].to(frozen_weight(layer).device)
            delta = effective_weight(layer) - w_pre
            s = rescale_factor(self.sigma_pre[name], delta)
            if self.cfg.lora.variant == "lora":
                layer.lora_B[ADAPTER].weight.mul_(s)  # ΔW = sBA: the product stays a plain adapter
            else:
                set_effective_weight(layer, w_pre + s * delta)
            scales[name] = s
        return scales

    @contextmanager
    def as_evaluated(self, model: nn.Module) -> Iterator[None]:
        if not self.cfg.pt:
            yield
            return
        kept = [t.detach().clone() for t in self._rescaled_tensors()]
        self._rescale()
        try:
            yield
        finally:
            with torch.no_grad():
                for tensor, value in zip(self._rescaled_tensors(), kept, strict=True):
                    tensor.copy_(value)

    def _rescaled_tensors(self) -> list[torch.Tensor]:
        tensors = []
        for name in sorted(self.top):
            layer = self.layers[name]
            if self.cfg.lora.variant == "lora":  # the rescale multiplies B alone
                tensors.append(layer.lora_B[ADAPTER].weight)
                continue
            tensors.append(frozen_weight(layer))
            if layer.use_dora.get(ADAPTER):
                tensors.append(layer.lora_magnitude_vector[ADAPTER].weight)
        return tensors

    def finalize(self, model: nn.Module) -> nn.Module:
        for layer in self.layers.values():
            base = layer.get_base_layer()
            if parametrize.is_parametrized(base, "weight"):
                parametrize.remove_parametrizations(base, "weight", leave_parametrized=False)
        for hook in self.hooks:
            hook.remove()
        self.hooks = []
        if self.cfg.pt:
            self.scales = self._rescale()
        return model

    def info(self) -> dict[str, Any]:
        return {"rescale": self.scales} if self.scales else {}


CLASSIFICATION.register(RoRAConfig, RoRA)
