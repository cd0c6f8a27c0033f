"""SynBkd / HiddenKiller (Qi et al., 2021c) and StyleBkd (Qi et al., 2021b) from pre-generated paraphrases.

Their paraphrasers (SCPN with a Java parser; a GPT-2 style-transfer model) cannot run offline, so
the attack reads files of paraphrases: ``train.csv`` with one paraphrase per training row, in the
training file's order, and ``test.csv`` with paraphrased non-target test examples. Columns as the
MuScleLoRA repository writes them: index, text (``0``), label already set to the target (``1``).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Literal

from cleantune.attacks.poison import PoisonConfig, Trigger
from cleantune.data import frame_to_dataset, read_frame
from cleantune.errors import CleantuneError


class ParaphraseConfig(PoisonConfig):
    name: Literal["synbkd", "stylebkd"] = "synbkd"
    dir: Path | None = None  # default: <data_dir>/sst2/paraphrased/<name>


def _texts(path: Path, target_label: int) -> list[str]:
    # Every row must carry the target label: the files hold only examples relabelled to it.
    return list(frame_to_dataset(read_frame(path), str(path), "0", "1", labels=[target_label])[0]["text"])


def trigger(cfg: ParaphraseConfig, data_dir: Path) -> Trigger:
    folder = cfg.dir or data_dir / "sst2" / "paraphrased" / cfg.name
    train_texts = _texts(folder / "train.csv", cfg.target_label)
    test_texts = _texts(folder / "test.csv", cfg.target_label)

    def insert(text: str, idx: int, rng: random.Random) -> str:
        if idx >= len(train_texts):
            raise CleantuneError(
                f"{folder / 'train.csv'} has {len(train_texts)} paraphrases but training row {idx} was chosen; "
                "the paraphrase files must match the training file row for row"
            )
        return train_texts[idx]

    return Trigger(insert, test_texts=test_texts)
