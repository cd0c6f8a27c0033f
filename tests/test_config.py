from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cleantune.config import DEFAULT_CONFIG, load_config, validate
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


# Shapes from before the one LoRA spec, as saved run configs and older suites hold them, and today's.
LEGACY = [
    ({"name": "dora", "r": 4}, {"name": "lora", "lora": {"r": 4, "use_dora": True}}),
    ({"name": "pissa", "alpha": 8}, {"name": "lora", "lora": {"alpha": 8, "init": "pissa"}}),
    (
        {"name": "rora", "variant": "olora", "r": 2, "p": 0.2},
        {"name": "rora", "lora": {"r": 2, "init": "olora"}, "p": 0.2},
    ),
    (
        {"name": "muscle-lora", "lora_r": 4, "lora_targets": ["query"]},
        {"name": "muscle-lora", "lora": {"r": 4, "target_modules": ["query"]}},
    ),
    (
        {"name": "w2sdefense", "student": {"name": "lora", "r": 64}},
        {"name": "w2sdefense", "student": {"name": "lora", "lora": {"r": 64}}},
    ),
    (
        {"name": "cube", "under": {"name": "olora", "r": 2}},
        {"name": "cube", "under": {"name": "lora", "lora": {"r": 2, "init": "olora"}}},
    ),
]


@pytest.mark.parametrize(("old", "new"), LEGACY, ids=[old["name"] for old, _ in LEGACY])
def test_a_config_in_the_shape_before_the_one_lora_spec_reads_as_today(old, new):
    assert validate({"defense": old}, "old").model_dump() == validate({"defense": new}, "new").model_dump()


def test_a_partial_lora_section_keeps_the_methods_own_defaults():
    muscle = validate({"defense": {"name": "muscle-lora", "lora": {"r": 4}}}, "x").defense.lora
    assert (muscle.r, muscle.alpha, muscle.dropout) == (4, 32.0, 0.0)  # the authors' alpha and dropout
    sft = validate({"task": "generation", "defense": {"name": "sft", "lora": {"r": 4}}}, "x").defense.lora
    assert (sft.r, sft.dropout) == (4, 0.05)
    with pytest.raises(CleantuneError, match="choose one"):
        validate({"defense": {"name": "lora", "lora": {"use_dora": True, "init": "pissa"}}}, "x")
