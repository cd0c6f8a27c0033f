"""MuScleLoRA (Wu et al., 2024): multi-scale low-rank adaptation and gradient alignment.

Scenario: the defender trains on a poisoned dataset and holds a few clean auxiliary samples.
Three switches make every row of the paper's ablation (Table 3) one config:

- ``ms``: multiple radial scalings, a multi-scale low-rank module on the penultimate linear layer
  before the classifier (Eq. 6);
- ``lr``: low-rank adaptation (PEFT LoRA on the attention layers; the rest of the model frozen).
  Without it the whole model trains;
- ``ga``: gradient alignment to the clean auxiliary gradient, per parameter tensor (Eqs. 7-8).

Choices the paper leaves open follow the authors' code (see ``shared/notes``): placement on
BERT's pooler dense layer, RoBERTa's ``classifier.dense``, and for decoders a new two-layer score
head (hidden -> 16 -> classes) whose first layer is wrapped; Kaiming-uniform L and R (so
ΔW ≠ 0 at start, unlike LoRA); the classification head frozen; the gradient of one shuffled
clean batch per step; the pure aligned gradient while the clean loss is above ``aux_loss_gate``
and, from epoch ``ga_start_epoch`` on, μ rising per epoch (``mu_schedule``) to ``mu_max``. The default scale
vectors are the paper's Table 6 (the authors' code stops BERT-base at 28, not 32).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from pydantic import Field, NonNegativeFloat, PositiveInt
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding

from cleantune.defenses.base import Defense, DefenseContext
from cleantune.errors import CleantuneError
from cleantune.lora import LoraSpec, filled_from, lora_config
from cleantune.registry import CLASSIFICATION
from cleantune.schema import StrictModel
from cleantune.training import StepInfo

log = logging.getLogger("cleantune")

# model_type -> (module wrapped by the multi-scale layer, alpha), from the authors' code (B.4).
PLACEMENT: dict[str, tuple[str, float]] = {
    "bert": ("bert.pooler.dense", 6.0),
    "roberta": ("classifier.dense", 6.0),
    "llama": ("score.0", 4.0),
}
# (model_type, hidden size) -> S. The paper tunes S per model (Table 6; Limitations, Figure 10).
SCALES: dict[tuple[str, int], list[float]] = {
    ("bert", 768): [1, 4, 8, 12, 16, 20, 24, 28, 32],  # BERT-base
    ("bert", 1024): [1, 2, 3, 4, 5, 6, 7, 8, 9],  # BERT-large
    ("roberta", 768): [1, 2, 4, 6, 8, 10, 12, 14, 16],  # RoBERTa-base
    ("roberta", 1024): [1, 2, 3, 4, 5, 6, 7, 8, 9],  # RoBERTa-large
    ("llama", 4096): [1, 2, 3, 4],  # Llama-2-7B
}
# A size Table 6 does not list takes the family's base vector, with a warning that it is untuned.
FALLBACK_WIDTH = {"bert": 768, "roberta": 768, "llama": 4096}
DECODER_HEAD_WIDTH = 16


# The authors' LoRA: r 8, alpha 32, no dropout, on the attention's query / value.
AUTHORS_LORA = LoraSpec(alpha=32.0, dropout=0.0)


class MuScleLoRAConfig(StrictModel):
    name: Literal["muscle-lora"] = "muscle-lora"
    ms: bool = True
    lr: bool = True
    ga: bool = True
    scales: list[float] | None = Field(None, min_length=1)  # default: per model family (Table 6)
    rank: PositiveInt = 1  # bandwidth r of each scale
    alpha: float | None = Field(None, gt=0)  # default: per model family
    placement: str | None = None  # module to wrap; default: per model family
    lora: Annotated[LoraSpec, filled_from(AUTHORS_LORA)] = AUTHORS_LORA
    train_head: bool = False  # the authors keep the freshly initialised head frozen
    clean_aux: PositiveInt = 96
    # The extra backward pass costs in proportion to this; a smaller clean batch is the cheaper way
    # to cut it (every step keeps a fresh clean direction).
    aux_batch_size: PositiveInt = 32
    mu_max: float = Field(0.1, ge=0, le=1)
    ga_start_epoch: int = Field(1, ge=0)
    # "epoch" steps μ once per epoch as the authors' code does; "step" raises it every optimizer step,
    # which is what a run of one or two epochs needs for μ to leave 0 at all.
    mu_schedule: Literal["epoch", "step"] = "epoch"
    aux_loss_gate: NonNegativeFloat = 0.4
    # The authors' code departs from Eq. 7-8 in two small ways, kept as options: a tensor whose clean
    # gradient is zero keeps its raw gradient ("raw"; the paper's reading aligns it to zero), and
    # before ``ga_start_epoch`` an open gate (clean loss below the threshold) takes the raw gradient
    # ("raw"; the paper's reading keeps aligning until μ starts).
    zero_clean_gradient: Literal["zero", "raw"] = "zero"
    open_gate_before_start: Literal["aligned", "raw"] = "aligned"
    # Recompute the clean gradient every k steps and reuse it in between. In the muscle-lora suite
    # k = 4 left the model at chance level; our likely explanation: Eq. 7's |g·g_c| keeps every step
    # on +g_c, so a stale g_c is followed past its minimum while Adam keeps the step size.
    clean_every: PositiveInt = 1


@dataclass
class Regime:
    """Which regime a run trained in: how often the clean loss kept the gate closed (pure alignment),
    how well the poisoned-batch gradient agreed with the clean one, where μ ended, and how often no
    gradient reached any trained weight (a saturated tanh after the multi-scale module: the run is dead)."""

    steps: int = 0
    gated: int = 0
    cosine_sum: torch.Tensor | float = 0.0
    dead_sum: torch.Tensor | float = 0.0
    mu: float = 0.0

    def record(self, gated: bool, cosine: torch.Tensor, dead: torch.Tensor, mu: float) -> None:
        self.steps += 1
        self.gated += gated
        self.cosine_sum = self.cosine_sum + cosine.detach()
        self.dead_sum = self.dead_sum + dead
        self.mu = mu

    def summary(self) -> dict[str, float]:
        return {
            "gate_closed_share": self.gated / self.steps,
            # per tensor, averaged over the tensors and the steps this process trained
            "mean_cosine": float(self.cosine_sum) / self.steps,
            "dead_share": float(self.dead_sum) / self.steps,
            "final_mu": self.mu,
        }


class MultiScaleLinear(nn.Module):
    """A frozen linear layer plus a multi-scale low-rank update."""

    def __init__(self, base: nn.Linear, scales: list[float], rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        for parameter in base.parameters():
            parameter.requires_grad_(False)
        width = len(scales) * rank
        self.lora_L = nn.Parameter(torch.empty(width, base.in_features, dtype=base.weight.dtype))
        self.lora_R = nn.Parameter(torch.empty(base.out_features, width, dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_L, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.lora_R, a=math.sqrt(5))
        self.register_buffer("S", torch.tensor(scales, dtype=base.weight.dtype).repeat_interleave(rank))
        self.scaling = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Eq. 6: h = W0 x + R((L x) ⊙ S)
        return self.base(x) + self.scaling * F.linear(F.linear(x, self.lora_L) * self.S, self.lora_R)

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * self.lora_R @ (self.lora_L * self.S[:, None])

    def merged(self) -> nn.Linear:
        """The plain linear layer W0 + R(L ⊙ S), for inference without extra latency."""
        merged = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None)
        with torch.no_grad():
            merged.weight.copy_(self.base.weight + self.delta_weight())
            if self.base.bias is not None:
                merged.bias.copy_(self.base.bias)
        return merged.to(self.base.weight.device, self.base.weight.dtype)


def align(g: torch.Tensor, g_clean: torch.Tensor) -> torch.Tensor:
    """Eq. 7: g_a = |g · g_c| / ||g_c||² g_c; zero when the clean gradient is zero."""
    norm = g_clean.pow(2).sum()
    if norm == 0:
        return torch.zeros_like(g)
    return (g * g_clean).sum().abs() / norm * g_clean


def mix(g_aligned: torch.Tensor, g: torch.Tensor, mu: float) -> torch.Tensor:
    """Eq. 8: ĝ = (1 − μ) g_a + μ g."""
    return (1 - mu) * g_aligned + mu * g


def mu_at(epoch: float, num_epochs: float, cfg: MuScleLoRAConfig) -> float:
    """μ: 0 before ``ga_start_epoch``, then linear towards ``mu_max``, per epoch or per step."""
    done = math.floor(epoch) if cfg.mu_schedule == "epoch" else epoch
    span = num_epochs - cfg.ga_start_epoch
    if done < cfg.ga_start_epoch or span <= 0:
        return 0.0
    return cfg.mu_max * (done - cfg.ga_start_epoch) / span


def _family(model: nn.Module) -> tuple[str, list[float], float]:
    """Placement, S and alpha for ``model``: Table 6's row for its type and width."""
    config = getattr(model, "config", None)
    model_type, width = getattr(config, "model_type", None), getattr(config, "hidden_size", None)
    if model_type not in PLACEMENT:
        raise CleantuneError(
            f"muscle-lora has no default placement for model type '{model_type}'; set defense.placement, "
            "defense.scales and defense.alpha"
        )
    placement, alpha = PLACEMENT[model_type]
    scales = SCALES.get((model_type, width))
    if scales is None:
        fallback = (model_type, FALLBACK_WIDTH[model_type])
        scales = SCALES[fallback]
        log.warning(
            "muscle-lora: Table 6 has no scale vector for a %s of width %s; using the width-%s one %s, "
            "untuned for this model (the paper tunes S per model: set defense.scales)",
            model_type,
            width,
            fallback[1],
            scales,
        )
    return placement, scales, alpha


def _replace(model: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _two_layer_score_head(model: nn.Module) -> None:
    """Decoders classify through ``score``; the authors replace it by hidden -> 16 -> classes."""
    old = model.get_submodule("score")
    head = nn.Sequential(
        nn.Linear(old.in_features, DECODER_HEAD_WIDTH, bias=False),
        nn.Dropout(0.1),
        nn.Linear(DECODER_HEAD_WIDTH, old.out_features, bias=False),
    ).to(old.weight.device, old.weight.dtype)
    model.score = head


class MuScleLoRA(Defense):
    scenarios = frozenset({"poisoned-data"})
    needs = frozenset({"clean_aux"})

    def prepare(self, model: nn.Module, ctx: DefenseContext) -> nn.Module:
        cfg: MuScleLoRAConfig = self.cfg
        placement, scales, alpha = _family(model) if cfg.placement is None else (cfg.placement, [], 0.0)
        scales, alpha = cfg.scales or scales, cfg.alpha or alpha
        if cfg.ms and (not scales or not alpha):
            raise CleantuneError("defense.placement is set: give defense.scales and defense.alpha as well")
        if getattr(model.config, "model_type", None) == "llama" and cfg.placement is None:
            _two_layer_score_head(model)
        if cfg.ms:
            base = model.get_submodule(placement)
            if not isinstance(base, nn.Linear):
                raise CleantuneError(f"defense.placement '{placement}' is a {type(base).__name__}, not a linear layer")
            _replace(model, placement, MultiScaleLinear(base, scales, cfg.rank, alpha))
        if cfg.lr:
            model = self._with_lora(model)
        self._set_head_trainable(model)
        self._clean_batches = self._clean_loader(ctx) if cfg.ga else None
        self._drawn = 0  # clean batches taken from the stream so far
        self._clean_grads: list[torch.Tensor] | None = None
        self._clean_loss = math.inf
        self._regime = Regime()
        return model

    def _with_lora(self, model: nn.Module) -> nn.Module:
        from peft import get_peft_model

        spec: LoraSpec = self.cfg.lora
        trainable = {name for name, p in model.named_parameters() if p.requires_grad and "lora_" in name}
        # No task type, so PEFT leaves the head frozen; the multi-scale module is excluded from LoRA's
        # targets by its own parameter names.
        if spec.target_modules is None:
            spec = spec.model_copy(update={"target_modules": _attention_targets(model)})
        peft_model = get_peft_model(model, lora_config(spec, model))
        for name, parameter in peft_model.named_parameters():
            if any(name.endswith(keep) for keep in trainable):
                parameter.requires_grad_(True)
        return peft_model

    def _set_head_trainable(self, model: nn.Module) -> None:
        for name, parameter in model.named_parameters():
            if ".classifier." in f".{name}" or ".score." in f".{name}":
                if "lora_" not in name:
                    parameter.requires_grad_(self.cfg.train_head)

    def _clean_loader(self, ctx: DefenseContext) -> Iterator[dict[str, torch.Tensor]]:
        if ctx.clean_aux is None or len(ctx.clean_aux) == 0:
            raise CleantuneError("gradient alignment needs clean auxiliary samples (defense.clean_aux)")
        encoded = ctx.clean_aux.map(
            lambda batch: ctx.tokenizer(batch["text"], truncation=True, max_length=ctx.max_length),
            batched=True,
            remove_columns=["text"],
        ).rename_column("label", "labels")
        generator = torch.Generator().manual_seed(ctx.seed)
        loader = DataLoader(
            encoded,
            batch_size=self.cfg.aux_batch_size,
            shuffle=True,
            generator=generator,
            collate_fn=DataCollatorWithPadding(ctx.tokenizer),
        )
        while True:
            yield from loader

    def _clean_batch(self, global_step: int) -> dict[str, torch.Tensor]:
        """The clean batch an uninterrupted run draws at this step (the (step // clean_every)-th of the
        seeded stream): a run resumed from a checkpoint skips what was drawn before it, instead of
        starting the stream again."""
        assert self._clean_batches is not None
        while self._drawn < global_step // self.cfg.clean_every:
            next(self._clean_batches)
            self._drawn += 1
        self._drawn += 1
        return next(self._clean_batches)

    def _clean_gradients(self, model: nn.Module, params: list[nn.Parameter], step: StepInfo) -> list[torch.Tensor]:
        device = params[0].device
        batch = {k: v.to(device) for k, v in self._clean_batch(step.global_step).items()}
        loss = model(**batch).loss
        # autograd.grad leaves .grad (the poisoned-batch gradient) untouched.
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        self._clean_loss = float(step.reduce_mean(loss.detach()))
        return [
            step.reduce_mean(g) if g is not None else torch.zeros_like(p) for g, p in zip(grads, params, strict=True)
        ]

    def edit_gradients(self, model: nn.Module, step: StepInfo) -> None:
        if not self.cfg.ga:
            return
        params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
        if self._clean_grads is None or step.global_step % self.cfg.clean_every == 0:
            self._clean_grads = self._clean_gradients(model, params, step)
        gated = self._clean_loss > self.cfg.aux_loss_gate
        mu = 0.0 if gated else mu_at(step.epoch, step.num_epochs, self.cfg)
        raw = not gated and step.epoch < self.cfg.ga_start_epoch and self.cfg.open_gate_before_start == "raw"
        cosines, largest = [], []
        with torch.no_grad():
            for p, g_clean in zip(params, self._clean_grads, strict=True):
                cosines.append(F.cosine_similarity(p.grad.flatten(), g_clean.flatten(), dim=0))
                largest.append(p.grad.abs().max())
                if raw:
                    continue
                edited = mix(align(p.grad, g_clean), p.grad, mu)
                if self.cfg.zero_clean_gradient == "raw":
                    edited = torch.where(g_clean.any(), edited, p.grad)
                p.grad.copy_(edited)
        # Kept on the device: reading a value every step would stall a GPU.
        dead = (torch.stack(largest).max() == 0).float()
        self._regime.record(gated, torch.stack(cosines).mean(), dead, mu)

    def info(self) -> dict[str, Any]:
        return {"regime": self._regime.summary()} if self.cfg.ga and self._regime.steps else {}

    def finalize(self, model: nn.Module) -> nn.Module:
        """Merge LoRA and the multi-scale module into the weights: the product is a plain model."""
        if self.cfg.lr:
            model = model.merge_and_unload()
        for name, module in list(model.named_modules()):
            if isinstance(module, MultiScaleLinear):
                _replace(model, name, module.merged())
        return model


def _attention_targets(model: nn.Module) -> list[str]:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as TARGETS

    model_type = getattr(model.config, "model_type", None)
    if model_type not in TARGETS:
        raise CleantuneError(f"no default LoRA targets for model type '{model_type}'; set defense.lora.target_modules")
    return list(TARGETS[model_type])


CLASSIFICATION.register(MuScleLoRAConfig, MuScleLoRA)
