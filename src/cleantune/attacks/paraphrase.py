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


def _texts(path: Path, target_label: int) -> list[str | None]:
    """The paraphrases in file order; None where the generator produced nothing (the shared SynBkd
    training file lacks one). Every row must carry the target label: the files hold only examples
    relabelled to it."""
    frame = read_frame(path)
    if "0" in frame.columns:
        missing = frame["0"].isna() | (frame["0"].astype(str).str.strip() == "")
        frame = frame.assign(**{"0": frame["0"].where(~missing, "(missing)")})
    else:
        missing = None
    source = f"{path} (its rows must carry attack.target_label, {target_label} here)"
    texts = list(frame_to_dataset(frame, source, "0", "1", labels=[target_label])[0]["text"])
    return [None if missing is not None and missing.iloc[i] else t for i, t in enumerate(texts)]


def trigger(cfg: ParaphraseConfig, data_dir: Path) -> Trigger:
    folder = cfg.dir or data_dir / "sst2" / "paraphrased" / cfg.name
    train_texts = _texts(folder / "train.csv", cfg.target_label)
    test_texts = [t for t in _texts(folder / "test.csv", cfg.target_label) if t is not None]

    def insert(text: str, idx: int, rng: random.Random) -> str:
        if idx >= len(train_texts):
            raise CleantuneError(
                f"{folder / 'train.csv'} has {len(train_texts)} paraphrases but training row {idx} was chosen; "
                "the paraphrase files must match the training file row for row"
            )
        paraphrase = train_texts[idx]
        assert paraphrase is not None, "rows without a paraphrase are never chosen"
        return paraphrase

    unavailable = frozenset(i for i, t in enumerate(train_texts) if t is None)
    return Trigger(insert, test_texts=test_texts, unavailable=unavailable)
