"""RAP (Yang et al., 2021): robustness-aware perturbations, a test-time detector.

A rare word (``trigger``, "cf" as in the paper) is given a learned embedding such that inserting it
in front of a clean input of the protected label lowers that label's probability by between
``prob_range[0]`` and ``prob_range[1]``; only the word's embedding rows change. A triggered input is
held by the backdoor and barely moves, so inputs predicted as the protected label whose probability
drops less than a threshold are rejected; the threshold is the ``frr`` quantile of the drops of
clean dev inputs. RAP assumes the defender knows which label needs protecting (the label an
attacker would want, e.g. "not spam"): ``protect_label`` is that assumption, made explicit.
The learned rows live in the defense and are swapped in only to measure the drop, so the
classifier's own predictions are those of the trained model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import numpy as np
import torch
from pydantic import Field, NonNegativeInt, PositiveInt, model_validator

from cleantune.defenses.base import DefenseContext, InputScreen, Screened, Victim
from cleantune.defenses.data_level import Under, dev_sample, low_threshold
from cleantune.defenses.finetune import FineTuneConfig
from cleantune.errors import CleantuneError
from cleantune.registry import CLASSIFICATION
from cleantune.schema import StrictModel


class RapConfig(StrictModel):
    name: Literal["rap"] = "rap"
    under: Under = FineTuneConfig(name="none")
    protect_label: NonNegativeInt
    trigger: str = "cf"
    prob_range: tuple[float, float] = (0.1, 0.3)  # wanted drop of the protected label's probability
    epochs: PositiveInt = 5
    lr: float = Field(1e-2, gt=0)  # length of each step of the trigger's embedding
    batch_size: PositiveInt = 32
    frr: float = Field(0.01, gt=0, lt=1)  # false-rejection rate on clean dev data
    dev_samples: PositiveInt = 500

    @model_validator(mode="after")
    def _ordered_range(self) -> RapConfig:
        low, high = self.prob_range
        if not 0 <= low < high <= 1:
            raise ValueError(f"prob_range must satisfy 0 <= low < high <= 1, got {self.prob_range}")
        return self


def rap_loss(drop: torch.Tensor, low: float, high: float) -> torch.Tensor:
    # Yang et al. (2021): zero while the drop of the protected probability lies in [low, high]
    return (torch.relu(low - drop) + torch.relu(drop - high)).mean()


class Rap(InputScreen):
    scenarios = frozenset({"poisoned-data", "poisoned-weights"})

    def __init__(self, cfg: RapConfig) -> None:
        super().__init__(cfg)
        self.rows: torch.Tensor | None = None
        self.ids: list[int] = []
        self.threshold: float | None = None

    def _with_trigger(self, texts: list[str]) -> list[str]:
        return [f"{self.cfg.trigger} {text}" for text in texts]

    @contextmanager
    def _perturbed(self, victim: Victim) -> Iterator[None]:
        weight = victim.model.get_input_embeddings().weight
        original = weight.data[self.ids].clone()
        weight.data[self.ids] = self.rows.to(weight.device, weight.dtype)
        try:
            yield
        finally:
            weight.data[self.ids] = original

    def drops(self, victim: Victim, texts: list[str]) -> np.ndarray:
        label = self.cfg.protect_label
        before = victim.probs(texts)[:, label]
        with self._perturbed(victim):
            after = victim.probs(self._with_trigger(texts))[:, label]
        return before - after

    def learn(self, victim: Victim, texts: list[str]) -> None:
        model, label = victim.model, self.cfg.protect_label
        weight = model.get_input_embeddings().weight
        was_trainable = {name: p.requires_grad for name, p in model.named_parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        weight.requires_grad_(True)
        self.rows = weight.data[self.ids].clone()
        try:
            for _ in range(self.cfg.epochs):
                for begin in range(0, len(texts), self.cfg.batch_size):
                    chunk = texts[begin : begin + self.cfg.batch_size]
                    before = torch.as_tensor(victim.probs(chunk)[:, label], device=weight.device)
                    with self._perturbed(victim):
                        model.eval()
                        batch = victim.tokenizer(
                            self._with_trigger(chunk),
                            truncation=True,
                            max_length=victim.max_length,
                            padding=True,
                            return_tensors="pt",
                        ).to(weight.device)
                        after = torch.softmax(model(**batch).logits.float(), dim=-1)[:, label]
                        loss = rap_loss(before - after, *self.cfg.prob_range)
                        step = torch.autograd.grad(loss, weight)[0][self.ids].to(self.rows.dtype)
                        # A step of fixed length: lr does not depend on the model's embedding scale.
                        self.rows = self.rows - self.cfg.lr * step / step.norm().clamp_min(1e-12)
        finally:
            weight.requires_grad_(False)
            for name, p in model.named_parameters():
                p.requires_grad_(was_trainable[name])

    def calibrate(self, victim: Victim, ctx: DefenseContext) -> None:
        label = self.cfg.protect_label
        if label >= ctx.num_labels:
            raise CleantuneError(f"rap: protect_label {label} is not a class of this task ({ctx.num_labels} labels)")
        self.ids = victim.tokenizer(self.cfg.trigger, add_special_tokens=False)["input_ids"]
        if not self.ids:
            raise CleantuneError(f"rap: the trigger '{self.cfg.trigger}' encodes to no tokens")
        dev = dev_sample(ctx, self.cfg.dev_samples)
        protected = [text for text, y in zip(dev["text"], dev["label"], strict=True) if y == label]
        if not protected:
            raise CleantuneError(f"rap: the clean dev data holds no example of label {label}")
        self.learn(victim, protected)
        predicted = victim.probs(protected).argmax(axis=1) == label
        clean = self.drops(victim, protected)[predicted]
        self.threshold = low_threshold(clean, self.cfg.frr)
        low, high = self.cfg.prob_range
        self.decided = {
            "threshold": self.threshold,
            "trigger_tokens": len(self.ids),
            "dev_mean_drop": float(clean.mean()),
            "dev_drop_in_range_pct": float(np.mean((clean >= low) & (clean <= high)) * 100),
        }

    def screen(self, victim: Victim, texts: list[str]) -> Screened:
        if self.threshold is None:
            raise RuntimeError("RAP screens inputs only after calibrate() has learned its perturbation")
        protected = victim.probs(texts).argmax(axis=1) == self.cfg.protect_label
        return Screened(list(texts), protected & (self.drops(victim, texts) < self.threshold))


CLASSIFICATION.register(RapConfig, Rap)
