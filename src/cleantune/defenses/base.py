"""The seam every defense fills.

A defense declares the threat models (scenarios) it handles and what it needs beyond the training
data. The pipeline builds a :class:`DefenseContext` holding only what that scenario allows: never
the trigger, the record of poisoned examples, or the triggered test set. Hooks, in the order the
trainer calls them: ``prepare`` (module replacement, PEFT wrapping), ``extra_loss`` (added to the
task loss every step), ``edit_gradients`` (after gradients are accumulated and reduced across
devices, before the optimizer step), ``finalize`` (post-training transform, before evaluation and
saving).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from datasets import Dataset
from torch import nn
from transformers import PreTrainedTokenizerBase

from cleantune.errors import CleantuneError

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


SIDE = "side_"  # prefix of the side-encoding columns in a batch; popped before the model's forward


@dataclass(frozen=True)
class SideEncoding:
    """A second tokenizer whose encoding of each training text rides along in the batch (a teacher's)."""

    tokenizer: PreTrainedTokenizerBase
    max_length: int


@dataclass(frozen=True)
class StepInfo:
    """Where training stands when ``edit_gradients`` runs."""

    epoch: float  # fractional epochs done, as the Trainer counts them
    num_epochs: float
    global_step: int
    reduce_mean: Callable[[torch.Tensor], torch.Tensor]  # average a tensor over processes (identity on one)


class Defense:
    scenarios: ClassVar[frozenset[Scenario]]
    needs: ClassVar[frozenset[Need]] = frozenset()

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

    def check_scenario(self, scenario: str) -> None:
        if scenario not in self.scenarios:
            raise CleantuneError(
                f"defense '{self.cfg.name}' does not handle scenario '{scenario}' "
                f"(it handles: {', '.join(sorted(self.scenarios))})"
            )

    @property
    def clean_aux_size(self) -> int:
        return int(getattr(self.cfg, "clean_aux", 0)) if "clean_aux" in self.needs else 0

    def prepare(self, model: nn.Module, ctx: DefenseContext) -> nn.Module:
        return model

    def side_encoding(self) -> SideEncoding | None:
        """Set after ``prepare`` when ``extra_loss`` needs the batch encoded for a second model too."""
        return None

    def extra_loss(self, model: nn.Module, inputs: dict[str, torch.Tensor], outputs: Any) -> torch.Tensor | None:
        """Added to the task loss of each training batch; ``inputs`` include the side encoding, if any."""
        return None

    def edit_gradients(self, model: nn.Module, step: StepInfo) -> None:
        return None

    def finalize(self, model: nn.Module) -> nn.Module:
        return model

    def info(self) -> dict[str, Any]:
        """What the defense decided during the run (e.g. scale factors), for the run's record."""
        return {}
