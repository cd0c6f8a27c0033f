"""RoRA (regularised low-rank adaptation): make a weight-poisoned model forget its backdoor.

Scenario: the defender holds a possibly weight-poisoned model and clean data for the target task;
no trigger and no triggered validation data. Three components, each a switch so that every row of
the paper's ablation (Table 5) is one config, and each applies on top of LoRA, DoRA, PiSSA or
OLoRA from PEFT (Table 4):

- ``ci``, clean-strengthened regularisation (Eq. 8): dropout with rate ``p`` on the frozen weight
  during training only, so that the task has to be carried by the update ΔW.
  ``dropout_on="weight"`` masks elements of W_pre (the paper's wording: "apply dropout to the
  pretrained weights when combining them with the LoRA updates", W = Dropout_p(W_pre) + sΔW);
  ``"output"`` drops elements of the frozen branch's output W_pre x instead.
- ``tr``, trigger-insensitive regularisation (Eqs. 9-11): λ(‖U_kᵀB‖²_F + ‖A V_k‖²_F) with U_k, V_k
  the top-``top_k`` singular vectors of W_pre, from one SVD per layer at the start. Truncation is
  what gives it meaning: with the full U and V the penalty is ‖B‖²_F + ‖A‖²_F, plain weight decay.
- ``pt``, post-training spectral rescaling (Eq. 12): on the adapted layers of the top
  ``rescale_layers`` blocks, the update is multiplied by s = σ_max(W_pre) / σ_max(ΔW), with ΔW the
  trained update including LoRA's α/r. s multiplies α/r (the two readings coincide: either way
  σ_max of the final update equals σ_max(W_pre)), and it is folded into B so the product stays a
  plain PEFT adapter.

W_pre is the layer's weight as the defender received it. PiSSA and OLoRA move the principal part of
W into A and B at initialisation; W_pre is then taken back as W_res + sB₀A₀. The penalty acts on A
and B themselves, as Eqs. 9-11 write it, so on those variants it starts large (B₀ and A₀ span W_pre's
top singular directions) and pulls the principal part out of the adapter during training; the
logged ``orthogonality`` term shows how much (the paper does not say how it combined the two).
"""

from __future__ import annotations

import re
from typing import Any, Literal

import torch
from peft import get_peft_model
from pydantic import Field, PositiveInt
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

from cleantune.defenses.base import Defense, DefenseContext
from cleantune.defenses.peft_baselines import ADAPTER, LoraFamilyConfig, lora_config, lora_layers, task_type
from cleantune.errors import CleantuneError
from cleantune.registry import CLASSIFICATION
from cleantune.schema import StrictModel

BLOCK_INDEX = re.compile(r"\.(\d+)\.")


class RoRAConfig(StrictModel):
    name: Literal["rora"] = "rora"
    variant: Literal["lora", "dora", "pissa", "olora"] = "lora"
    r: PositiveInt = 8
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.1, ge=0, lt=1)  # LoRA's own dropout on the adapter input
    target_modules: list[str] | None = None  # None: PEFT's default for the architecture (query/value)
    ci: bool = True
    tr: bool = True
    pt: bool = True
    p: float = Field(0.1, ge=0, lt=1)  # the paper's p
    dropout_on: Literal["weight", "output"] = "weight"
    penalty: float = Field(10.0, ge=0)  # the paper's λ
    top_k: PositiveInt = 32  # the subspace the paper's Figure 2 measures alignment against
    rescale_layers: PositiveInt = 3  # the paper rescales the top three layers


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


def top_blocks(names: list[str], count: int) -> set[str]:
    """The layers of the ``count`` highest-numbered blocks; every layer when names carry no index."""
    index = {name: int(m.group(1)) for name in names if (m := BLOCK_INDEX.search(f".{name}."))}
    if not index:
        return set(names)
    keep = sorted(set(index.values()))[-count:]
    return {name for name, i in index.items() if i in keep}


class RoRA(Defense):
    scenarios = frozenset({"poisoned-weights"})  # it assumes the training data is clean

    def prepare(self, model: nn.Module, ctx: DefenseContext) -> nn.Module:
        cfg: RoRAConfig = self.cfg
        family = LoraFamilyConfig(
            name=cfg.variant, r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, target_modules=cfg.target_modules
        )
        peft_model = get_peft_model(model, lora_config(family, task_type(ctx)))
        self.layers = lora_layers(peft_model)
        self.subspaces: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.sigma_pre: dict[str, float] = {}
        self.hooks: list[Any] = []
        for name, layer in self.layers.items():
            base = layer.get_base_layer()
            if not isinstance(base, nn.Linear):
                raise CleantuneError(f"rora adapts linear layers only; '{name}' is a {type(base).__name__}")
            with torch.no_grad():
                w_pre = (base.weight + layer.get_delta_weight(ADAPTER)).float()
                U, S, Vh = torch.linalg.svd(w_pre, full_matrices=False)
            k = min(cfg.top_k, S.numel())
            self.subspaces[name] = (U[:, :k].contiguous(), Vh[:k].T.contiguous())
            self.sigma_pre[name] = float(S[0])
            if cfg.ci:
                self._add_weight_dropout(base)
        self.scales: dict[str, float] = {}
        return peft_model

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
            term = orthogonality_penalty(A, B, U_k, V_k)
            total = term if total is None else total + term
        # Eq. 11: L = L_sup + λ Ω(A, B)
        return {} if total is None else {"orthogonality": self.cfg.penalty * total}

    def finalize(self, model: nn.Module) -> nn.Module:
        for layer in self.layers.values():
            base = layer.get_base_layer()
            if parametrize.is_parametrized(base, "weight"):
                parametrize.remove_parametrizations(base, "weight", leave_parametrized=False)
        for hook in self.hooks:
            hook.remove()
        self.hooks = []
        if self.cfg.pt:
            for name in sorted(top_blocks(list(self.layers), self.cfg.rescale_layers)):
                layer = self.layers[name]
                with torch.no_grad():
                    s = rescale_factor(self.sigma_pre[name], layer.get_delta_weight(ADAPTER))
                    layer.lora_B[ADAPTER].weight.mul_(s)
                self.scales[name] = s
        return model

    def info(self) -> dict[str, Any]:
        return {"rescale": self.scales} if self.scales else {}


CLASSIFICATION.register(RoRAConfig, RoRA)
