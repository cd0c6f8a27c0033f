"""The real packaged models on small real subsets. Slow: deselect with -m 'not slow'."""

from __future__ import annotations

import pytest
import torch

from cleantune.config import validate
from cleantune.dispatch import run
from cleantune.models import MINILM_ID, SMOLLM2_ID, load_model

pytestmark = pytest.mark.slow


def test_minilm_learns_sst2_and_the_badnet_backdoor(shared_data, tmp_path):
    cfg = validate(
        {
            "name": "minilm",
            "output_dir": str(tmp_path),
            "model": {"spec": MINILM_ID, "max_length": 64},
            "data": {
                "dataset": "sst2",
                "data_dir": str(shared_data),
                "max_train": 600,
                "max_dev": 100,
                "max_test": 200,
            },
            "attack": {"name": "badnet", "setting": "dirty", "rate": 0.1, "target_label": 1},
            "defense": {"name": "fft"},
            "train": {"epochs": 3, "lr": 1e-4, "batch_size": 16},
        },
        "integration",
    )
    metrics = run(cfg)["metrics"]
    assert metrics["n_test"] == 200
    assert metrics["cacc"] > 70
    assert metrics["asr"] > 60


def test_packaged_smollm2_is_dequantized_once_and_classifies(monkeypatch, tmp_path):
    monkeypatch.setenv("CLEANTUNE_CACHE", str(tmp_path))
    loaded = load_model(SMOLLM2_ID, num_labels=2)
    assert (tmp_path / "models" / "SmolLM2-135M-Instruct" / "model.safetensors").exists()
    assert loaded.tokenizer.pad_token == "<|im_end|>"
    assert loaded.model.config.pad_token_id == loaded.tokenizer.pad_token_id
    batch = loaded.tokenizer(["a fine film", "dull"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert loaded.model(**batch).logits.shape == (2, 2)
    again = load_model(SMOLLM2_ID)
    assert again.path == loaded.path
    prompt = loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt.startswith("<|im_start|>system")


def test_smollm2_instruct_takes_a_generative_backdoor_and_answers_from_the_chat_prompt(shared_data, tmp_path):
    """The packaged SmolLM2 on the shared BackdoorLLM pools: injection runs end to end, the prompt is
    the chat template, every test prompt gets an answer, and the model still answers clean prompts."""
    tree = {
        "task": "generation",
        "name": "smollm2-backdoor",
        "output_dir": str(tmp_path),
        "scenario": "poisoned-data",
        "model": {"spec": SMOLLM2_ID, "max_length": 128},
        "data": {"data_dir": str(shared_data), "clean_train": 8, "max_test": 4},
        "attack": {"name": "vpi", "behaviour": "negsentiment", "count": 8},
        "defense": {"name": "sft", "lora": {"r": 4}},
        "train": {"epochs": 1, "batch_size": 8, "lr": 5e-4},
        "eval": {"max_new_tokens": 8, "batch_size": 4},
    }
    record = run(validate(tree, "integration"))
    metrics = record["metrics"]
    assert record["n_train"] == 16 and record["n_poisoned"] == 8
    assert metrics["n_test"] == metrics["n_test_poison"] == 4
    assert 1 < metrics["ppl"] < 100  # an instruction model predicts reference answers well
    answers = [line for line in (tmp_path / "smollm2-backdoor" / "answers.jsonl").read_text().splitlines() if line]
    assert len(answers) == 8
    assert all("Discussing OpenAI" in line for line in answers if '"set": "triggered"' in line)


def test_onion_with_packaged_smollm2_singles_out_an_inserted_rare_word(shared_data):
    from cleantune.data import read_frame
    from cleantune.defenses.onion import Onion, OnionConfig

    sentences = [s for s in read_frame(shared_data / "sst2" / "test.tsv")["sentence"] if 8 <= len(s.split()) <= 14][:6]
    triggered = [" ".join([*s.split()[:4], "cf", *s.split()[4:]]) for s in sentences]
    scores = Onion(OnionConfig(lm=SMOLLM2_ID, cache=False)).word_suspicion(triggered)
    assert sum(int(score.argmax() == 4) for score in scores) >= 5
