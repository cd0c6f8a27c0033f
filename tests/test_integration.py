"""The real packaged models on small real subsets. Slow: deselect with -m 'not slow'."""

from __future__ import annotations

import pytest
import torch

from cleantune.config import validate
from cleantune.models import MINILM_ID, SMOLLM2_ID, load_model
from cleantune.pipeline import run

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
