from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cleantune.config import DEFAULT_CONFIG, load_config
from cleantune.errors import CleantuneError


def write(tmp_path: Path, tree: dict) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_embedded_default_is_valid():
    cfg = load_config(DEFAULT_CONFIG)
    assert cfg.attack.name == "badnet" and cfg.defense.name == "cube" and cfg.defense.under.name == "lora"
    assert cfg.model.spec == "sentence-transformers/all-MiniLM-L6-v2" and cfg.data.dataset == "rotten_tomatoes"


def test_unknown_key_is_named(tmp_path: Path):
    with pytest.raises(CleantuneError, match=r"train.learning_rate: Extra inputs are not permitted"):
        load_config(write(tmp_path, {"train": {"learning_rate": 1e-3}}))


def test_mistyped_value_and_unknown_defense(tmp_path: Path):
    with pytest.raises(CleantuneError, match=r"train.epochs"):
        load_config(write(tmp_path, {"train": {"epochs": "many"}}))
    with pytest.raises(CleantuneError, match=r"defense: Input tag 'magic'"):
        load_config(write(tmp_path, {"defense": {"name": "magic"}}))


def test_out_of_range_attack_rate(tmp_path: Path):
    with pytest.raises(CleantuneError, match=r"attack.badnet.rate"):
        load_config(write(tmp_path, {"attack": {"name": "badnet", "rate": 1.5}}))


def test_overrides_set_nested_fields_and_sections(tmp_path: Path):
    cfg = load_config(DEFAULT_CONFIG, ["train.epochs=1", "defense={name: prefix, num_virtual_tokens: 4}", "seed=3"])
    assert cfg.train.epochs == 1 and cfg.seed == 3
    assert cfg.defense.name == "prefix" and cfg.defense.num_virtual_tokens == 4


def test_bad_overrides(tmp_path: Path):
    with pytest.raises(CleantuneError, match="key=value"):
        load_config(DEFAULT_CONFIG, ["epochs"])
    with pytest.raises(CleantuneError, match=r"train.epoch: Extra inputs"):
        load_config(DEFAULT_CONFIG, ["train.epoch=1"])


def test_missing_config_file(tmp_path: Path):
    with pytest.raises(CleantuneError, match="does not exist"):
        load_config(tmp_path / "none.yaml")
