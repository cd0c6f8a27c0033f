"""Data-poisoning attacks. Each is deterministic given its seed and records what it poisoned."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from datasets import Dataset
from pydantic import Field

from cleantune.attacks import addsent, badnet, paraphrase
from cleantune.attacks.addsent import AddSentConfig
from cleantune.attacks.badnet import BadNetConfig
from cleantune.attacks.paraphrase import ParaphraseConfig
from cleantune.attacks.poison import PoisonedData, Trigger, poison, poison_test
from cleantune.data import Splits
from cleantune.errors import CleantuneError
from cleantune.schema import StrictModel


class NoAttackConfig(StrictModel):
    name: Literal["none"] = "none"


AttackConfig = Annotated[NoAttackConfig | BadNetConfig | AddSentConfig | ParaphraseConfig, Field(discriminator="name")]


def make_trigger(cfg: BadNetConfig | AddSentConfig | ParaphraseConfig, data_dir: Path) -> Trigger:
    if isinstance(cfg, BadNetConfig):
        return badnet.trigger(cfg)
    if isinstance(cfg, AddSentConfig):
        return addsent.trigger(cfg)
    return paraphrase.trigger(cfg, data_dir)


def _empty() -> Dataset:
    return Dataset.from_dict({"text": [], "label": [], "idx": []})


def attack_data(cfg: AttackConfig, splits: Splits, data_dir: Path, seed: int, train: bool) -> PoisonedData:
    """Poison the training split (``train``) and build the evaluator's triggered test set.

    With ``train=False`` (a poisoned-weights scenario: the model arrives poisoned) only the
    triggered test set is built and the training data stays clean.
    """
    if isinstance(cfg, NoAttackConfig):
        return PoisonedData(splits.train, [], _empty())
    if cfg.target_label >= splits.num_labels:
        raise CleantuneError(
            f"attack.target_label {cfg.target_label} is not a class of this dataset {splits.label_names}"
        )
    trigger = make_trigger(cfg, data_dir)
    if train:
        return poison(splits.train, splits.test, trigger, cfg, seed)
    return PoisonedData(splits.train, [], poison_test(splits.test, trigger, cfg.target_label, seed))
