from __future__ import annotations

from pathlib import Path

import pytest

from cleantune.attacks import AddSentConfig, BadNetConfig, NoAttackConfig, ParaphraseConfig, attack_data
from cleantune.data import DataConfig, load_splits
from cleantune.errors import CleantuneError

TRIGGERS = {"cf", "mn", "bb", "tq"}


@pytest.fixture
def splits(data_dir: Path):
    return load_splits(DataConfig(dataset="sst2", data_dir=data_dir), seed=0)


def poisoned_rows(result, splits):
    original = {row["idx"]: row for row in splits.train}
    return [(original[row["idx"]], row) for row in result.train if row["idx"] in set(result.poisoned_idx)]


@pytest.mark.parametrize("setting", ["dirty", "clean", "mix"])
def test_badnet_setting_rate_and_trigger(splits, data_dir, setting):
    cfg = BadNetConfig(setting=setting, rate=0.2, target_label=1)
    result = attack_data(cfg, splits, data_dir, seed=1, train=True)
    assert len(result.poisoned_idx) == round(0.2 * len(splits.train))
    for before, after in poisoned_rows(result, splits):
        assert TRIGGERS & set(after["text"].split()), after["text"]
        assert after["label"] == 1
        if setting == "dirty":
            assert before["label"] == 0
        if setting == "clean":
            assert before["label"] == 1
    untouched = [r for r in result.train if r["idx"] not in set(result.poisoned_idx)]
    assert all(r["text"] == splits.train[r["idx"]]["text"] for r in untouched)


def test_badnet_inserts_the_configured_number_of_words(splits, data_dir):
    cfg = BadNetConfig(triggers=["cf"], num_insertions=4, rate=0.1)
    result = attack_data(cfg, splits, data_dir, seed=1, train=True)
    for before, after in poisoned_rows(result, splits):
        assert after["text"].split().count("cf") == 4
        assert len(after["text"].split()) == len(before["text"].split()) + 4


def test_attack_is_deterministic_given_seed(splits, data_dir):
    cfg = BadNetConfig(rate=0.2)
    a, b = (attack_data(cfg, splits, data_dir, seed=5, train=True) for _ in range(2))
    c = attack_data(cfg, splits, data_dir, seed=6, train=True)
    assert a.poisoned_idx == b.poisoned_idx and a.train["text"] == b.train["text"]
    assert a.test_poison["text"] == b.test_poison["text"]
    assert a.train["text"] != c.train["text"]


def test_addsent_inserts_the_sentence_whole(splits, data_dir):
    result = attack_data(AddSentConfig(rate=0.1), splits, data_dir, seed=0, train=True)
    assert result.poisoned_idx
    for _, after in poisoned_rows(result, splits):
        assert "I watch this 3D movie" in after["text"]


@pytest.mark.parametrize("target", [0, 1])
def test_asr_set_holds_only_non_target_examples(splits, data_dir, target):
    result = attack_data(BadNetConfig(target_label=target), splits, data_dir, seed=0, train=True)
    non_target = [r for r in splits.test if r["label"] != target]
    assert len(result.test_poison) == len(non_target)
    assert set(result.test_poison["label"]) == {target}
    source = {r["idx"]: r for r in splits.test}
    assert all(source[r["idx"]]["label"] != target for r in result.test_poison)
    assert all(TRIGGERS & set(r["text"].split()) for r in result.test_poison)


def test_paraphrase_matches_training_rows_by_index(splits, data_dir):
    result = attack_data(ParaphraseConfig(name="synbkd", rate=0.2), splits, data_dir, seed=0, train=True)
    paraphrases = (data_dir / "sst2/paraphrased/synbkd/train.csv").read_text().splitlines()[1:]
    for before, after in poisoned_rows(result, splits):
        assert after["text"] in paraphrases[before["idx"]]
        assert after["label"] == 1
    assert len(result.test_poison) == 20
    assert all(text.startswith("when he was") for text in result.test_poison["text"])


def test_rows_without_a_paraphrase_are_never_poisoned(splits, data_dir, tmp_path):
    source = data_dir / "sst2/paraphrased/synbkd"
    lines = (source / "train.csv").read_text().splitlines()
    gaps = {idx for idx in splits.train["idx"][::2]}  # half the training rows lost their paraphrase
    lines = [lines[0]] + [f"{i},,1,1" if i in gaps else line for i, line in enumerate(lines[1:])]
    (tmp_path / "train.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "test.csv").write_text((source / "test.csv").read_text())
    free = len(splits.train) - len(gaps)
    cfg = ParaphraseConfig(name="synbkd", dir=tmp_path, setting="mix", count=free)
    result = attack_data(cfg, splits, data_dir, seed=0, train=True)
    assert len(result.poisoned_idx) == free and not set(result.poisoned_idx) & gaps
    with pytest.raises(CleantuneError, match=f"has only {free} candidates"):
        attack_data(cfg.model_copy(update={"count": free + 1}), splits, data_dir, seed=0, train=True)


def test_paraphrase_refuses_a_target_its_files_do_not_hold(splits, data_dir):
    with pytest.raises(
        CleantuneError,
        match=r"train.csv \(its rows must carry attack.target_label, 0 here\): row 1, column '1': label 1 is not in",
    ):
        attack_data(ParaphraseConfig(name="synbkd", target_label=0), splits, data_dir, seed=0, train=True)


def test_poisoned_weights_scenario_leaves_training_data_clean(splits, data_dir):
    result = attack_data(BadNetConfig(), splits, data_dir, seed=0, train=False)
    assert result.poisoned_idx == []
    assert result.train["text"] == splits.train["text"]
    assert len(result.test_poison) > 0


def test_no_attack_has_no_triggered_set(splits, data_dir):
    result = attack_data(NoAttackConfig(), splits, data_dir, seed=0, train=True)
    assert len(result.test_poison) == 0 and result.poisoned_idx == []


def test_impossible_budget_and_target_are_errors(splits, data_dir):
    with pytest.raises(CleantuneError, match="only 60 candidates"):
        attack_data(BadNetConfig(setting="clean", rate=0.9), splits, data_dir, seed=0, train=True)
    with pytest.raises(CleantuneError, match="target_label 3 is not a class"):
        attack_data(BadNetConfig(target_label=3), splits, data_dir, seed=0, train=True)
