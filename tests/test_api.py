import importlib
from pathlib import Path

import pytest

import cleantune
from cleantune.api import detect_task, purify_tree, utility_warning, verdict
from cleantune.config import validate
from cleantune.generative.config import LLMRunConfig


def test_the_task_is_read_from_the_model(tiny_bert, tiny_chat_llama):
    assert detect_task(str(tiny_bert)) == "classification"
    assert detect_task(str(tiny_chat_llama)) == "generation"


def test_a_generative_model_is_purified_by_signature_purification(tiny_chat_llama, tmp_path: Path):
    tree = purify_tree(str(tiny_chat_llama), tmp_path / "clean.json", tmp_path / "out", None, 42)
    cfg = validate(tree, "test")
    assert isinstance(cfg, LLMRunConfig) and cfg.scenario == "poisoned-llm"
    assert cfg.defense.name == "signature" and cfg.defense.heads == 8
    assert cfg.run_dir == tmp_path / "out" and not cfg.eval.enabled


def test_a_chosen_method_replaces_the_default_one(tiny_bert, tmp_path: Path):
    cfg = validate(purify_tree(str(tiny_bert), tmp_path / "c.csv", tmp_path / "out", "lora", 1), "test")
    assert cfg.defense.name == "lora" and cfg.scenario == "poisoned-weights" and cfg.seed == 1
    assert cfg.train.epochs == 3  # the threat's training settings stay


@pytest.mark.parametrize(
    "asr, words", [(5.0, "removed the backdoor"), (60.0, "weakened the backdoor"), (95.0, "did not remove")]
)
def test_the_demo_verdict_says_what_the_defense_did(asr: float, words: str):
    line = verdict({"cacc": 80.0, "asr": 99.0}, {"cacc": 78.0, "asr": asr}, "cube")
    assert words in line and "ASR 99.0 -> " in line and "CACC 80.0 -> 78.0" in line


def test_the_python_api_is_importable_from_the_package():
    assert callable(cleantune.purify) and callable(cleantune.train) and callable(cleantune.run)
    importlib.import_module("cleantune.scanner")  # loading the module must not shadow the function

    assert callable(cleantune.scan) and cleantune.ScanConfig(threshold=90).threshold == 90
    with pytest.raises(AttributeError):
        cleantune.nothing  # noqa: B018


def test_a_purification_that_costs_clean_accuracy_is_flagged():
    assert utility_warning({"cacc": 80.0}, {"cacc": 76.0}) is None
    warning = utility_warning({"cacc": 77.5}, {"cacc": 47.5})
    assert warning and "fell from 77.50 to 47.50" in warning and "not a usable model" in warning
