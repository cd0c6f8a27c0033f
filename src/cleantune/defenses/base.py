"""The seams a defense fills, one class per role.

A defense declares the threat models (scenarios) it handles and what it needs beyond the training
data. The pipeline builds a :class:`DefenseContext` holding only what that scenario allows: never
the trigger, the record of poisoned examples, or the triggered test set. Three roles:

- :class:`Defense`, a training method. Hooks, in the order the trainer calls them: ``prepare``
  (module replacement, PEFT wrapping), ``extra_loss`` (added to the task loss every step),
  ``edit_gradients`` (after gradients are accumulated and reduced across devices, before the
  optimizer step), ``as_evaluated`` (the model as ``finalize`` will deliver it, while dev data
  selects a checkpoint), ``finalize`` (post-training transform, before evaluation and saving).
- :class:`TrainFilter`, which drops suspicious training samples before training; it may ask for a
  reference model trained on the unfiltered data.
- :class:`InputScreen`, which fits thresholds on clean dev data once the model is trained, then
  rewrites or rejects each test input the model receives.

A filter or a screen runs around any training method (its config's ``under``); :class:`Roles` is
what the pipeline runs: one training method and, at most, one filter or one screen.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Literal, TypeVar

import numpy as np
import torch
from datasets import Dataset
from torch import nn
from transformers import PreTrainedTokenizerBase

from cleantune.errors import CleantuneError
from cleantune.training import SideEncoding, StepInfo

Scenario = Literal["poisoned-data", "poisoned-weights", "poisoned-llm"]
Need = Literal["clean_aux"]


@dataclass(frozen=True)
class DefenseContext:
    scenario: Scenario
    train: Dataset  # what the defender trains on (poisoned in poisoned-data); no poison record
    dev: Dataset  # clean data for checkpoint selection, disjoint from clean_aux
    clean_aux: Dataset | None  # a few trusted clean samples, when the defense declares it needs them
    tokenizer: PreTrainedTokenizerBase
    max_length: int  # the run's tokenization limit
    num_labels: int
    seed: int


def pooled(hidden: torch.Tensor, attention_mask: torch.Tensor, decoder: bool) -> torch.Tensor:
    """One vector per example: [CLS] for encoders, the last non-pad token for decoders. Virtual tokens
    that prompt or p-tuning prepend shift the positions by the length difference."""
    offset = hidden.shape[1] - attention_mask.shape[1]
    if not decoder:
        return hidden[:, offset]
    last = attention_mask.shape[1] - 1 - attention_mask.flip(1).argmax(dim=1)  # right or left padding
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), offset + last]


def is_decoder_classifier(model: nn.Module) -> bool:
    return hasattr(model, "score")  # HF decoder classifiers score the last token; encoders have a classifier


@dataclass(frozen=True)
class Victim:
    """A trained classifier that a data-level defense queries: class probabilities and pooled
    last-layer representations of raw texts, in batches sorted by length."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    max_length: int
    batch_size: int

    def _batches(self, texts: list[str]) -> Any:
        order = np.argsort([len(t) for t in texts], kind="stable")
        device = next(self.model.parameters()).device
        for start in range(0, len(texts), self.batch_size):
            chosen = order[start : start + self.batch_size]
            rows = [texts[i] for i in chosen]
            batch = self.tokenizer(rows, truncation=True, max_length=self.max_length, padding=True, return_tensors="pt")
            yield chosen, {k: v.to(device) for k, v in batch.items()}

    @torch.no_grad()
    def probs(self, texts: list[str]) -> np.ndarray:
        self.model.eval()
        out = np.zeros((len(texts), self.model.config.num_labels), dtype=np.float32)
        for chosen, batch in self._batches(texts):
            out[chosen] = torch.softmax(self.model(**batch).logits.float(), dim=-1).cpu().numpy()
        return out

    @torch.no_grad()
    def features(self, texts: list[str]) -> np.ndarray:
        self.model.eval()
        decoder = is_decoder_classifier(self.model)
        rows: list[tuple[np.ndarray, np.ndarray]] = []
        for chosen, batch in self._batches(texts):
            hidden = self.model(**batch, output_hidden_states=True).hidden_states[-1]
            rows.append((chosen, pooled(hidden, batch["attention_mask"], decoder).float().cpu().numpy()))
        out = np.zeros((len(texts), rows[0][1].shape[1]), dtype=np.float32)
        for chosen, values in rows:
            out[chosen] = values
        return out


@dataclass(frozen=True)
class Screened:
    """Test inputs after a test-time defense: rewritten texts, and the inputs it refuses to classify."""

    texts: list[str]
    rejected: np.ndarray  # bool per input


# What ``prepare`` is given: a classification defense's DefenseContext, a generative one's LLMContext.
Context = TypeVar("Context")


class Role:
    """What every role shares: its config, the threat models it handles, what it decided."""

    scenarios: ClassVar[frozenset[Scenario]]

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

    def check_scenario(self, scenario: str) -> None:
        if scenario not in self.scenarios:
            raise CleantuneError(
                f"defense '{self.cfg.name}' does not handle scenario '{scenario}' "
                f"(it handles: {', '.join(sorted(self.scenarios))})"
            )

    def info(self) -> dict[str, Any]:
        """What the defense decided during the run (e.g. scale factors), for the run's record."""
        return {}


class Defense(Role, Generic[Context]):
    """A training method."""

    needs: ClassVar[frozenset[Need]] = frozenset()

    @property
    def clean_aux_size(self) -> int:
        return int(getattr(self.cfg, "clean_aux", 0)) if "clean_aux" in self.needs else 0

    def prepare(self, model: nn.Module, ctx: Context) -> nn.Module:
        return model

    def side_encoding(self) -> SideEncoding | None:
        """Set after ``prepare`` when ``extra_loss`` needs the batch encoded for a second model too."""
        return None

    def extra_loss(self, model: nn.Module, inputs: dict[str, torch.Tensor], outputs: Any) -> dict[str, torch.Tensor]:
        """Named terms, already weighted, added to the task loss of each training batch and logged
        beside it; ``inputs`` include the side encoding, if any."""
        return {}

    def edit_gradients(self, model: nn.Module, step: StepInfo) -> None:
        return None

    def as_evaluated(self, model: nn.Module) -> AbstractContextManager[None]:
        """While dev data is scored for checkpoint selection: ``model`` as ``finalize`` would deliver it."""
        return nullcontext()

    def finalize(self, model: nn.Module) -> nn.Module:
        return model


class TrainFilter(Role):
    """Chooses the training samples to keep; the training method then trains on those alone."""

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.decided: dict[str, Any] = {}

    def filter_train(self, ctx: DefenseContext, reference: Callable[[], Victim]) -> np.ndarray:
        """A keep-mask over ``ctx.train``. ``reference()`` trains (once) the model the training
        method would train without filtering and returns it."""
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        return self.decided


class InputScreen(Role):
    """Rewrites or rejects the test inputs the trained model receives."""

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.decided: dict[str, Any] = {}

    def calibrate(self, victim: Victim, ctx: DefenseContext) -> None:
        """Fit test-time thresholds on ``ctx.dev`` (clean) once the model is trained."""
        raise NotImplementedError

    def screen(self, victim: Victim, texts: list[str]) -> Screened:
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        return self.decided


@dataclass(frozen=True)
class Roles:
    """A classification defense as the pipeline runs it: a training method, with a training-set
    filter before it or a test-input screen after it."""

    training: Defense
    train_filter: TrainFilter | None = None
    screen: InputScreen | None = None

    def parts(self) -> list[Role]:
        return [part for part in (self.train_filter, self.training, self.screen) if part is not None]

    def check_scenario(self, scenario: str) -> None:
        guard = self.train_filter or self.screen
        if guard is not None:
            guard.check_scenario(scenario)
        try:
            self.training.check_scenario(scenario)
        except CleantuneError as err:
            if guard is None:
                raise
            raise CleantuneError(f"defense '{guard.cfg.name}' runs under '{self.training.cfg.name}': {err}") from None

    def info(self) -> dict[str, Any]:
        return {key: value for part in self.parts() for key, value in part.info().items()}
