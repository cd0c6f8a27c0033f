from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cleantune import models
from cleantune.errors import CleantuneError
from cleantune.models import MINILM_ID, load_model, resolve


def pickled_copy(src: Path, dst: Path) -> Path:
    """The same model saved the way old checkpoints are: pytorch_model.bin, no safetensors."""
    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    (dst / "model.safetensors").unlink()
    torch.save(state, dst / "pytorch_model.bin")
    return dst


@pytest.mark.parametrize("fixture", ["tiny_bert", "tiny_llama"])
def test_tiny_models_tokenize_their_words(fixture: str, request: pytest.FixtureRequest):
    tokenizer = load_model(str(request.getfixturevalue(fixture)), num_labels=2).tokenizer
    ids = tokenizer("good film mn", add_special_tokens=False)["input_ids"]
    assert len(ids) == 3 and tokenizer.unk_token_id not in ids


def test_pickle_weights_are_refused_by_default(tiny_bert: Path, tmp_path: Path):
    path = pickled_copy(tiny_bert, tmp_path / "pickled")
    with pytest.raises(CleantuneError, match=r"pickle weights \(pytorch_model.bin\).*allow_pickle"):
        load_model(str(path), num_labels=2)


def test_pickle_weights_load_when_the_user_opts_in(tiny_bert: Path, tmp_path: Path):
    path = pickled_copy(tiny_bert, tmp_path / "pickled")
    assert load_model(str(path), num_labels=2, allow_pickle=True).model.num_labels == 2


def test_missing_path_and_missing_weights(tmp_path: Path):
    with pytest.raises(CleantuneError, match="model path './nope/model' does not exist"):
        resolve("./nope/model")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CleantuneError, match="holds no model weights"):
        load_model(str(tmp_path), num_labels=2)


def test_hub_ids_fall_back_to_packaged_copies_when_the_hub_is_unreachable(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def unreachable(spec: str, allow_pickle: bool) -> Path:
        raise ConnectionError("no route to host")

    monkeypatch.setattr(models, "_download", unreachable)
    packaged = Path(models.PACKAGED[MINILM_ID]())
    assert resolve(MINILM_ID) == packaged
    assert (packaged / "model.safetensors").exists()
    with pytest.raises(CleantuneError, match="neither a local directory nor reachable"):
        resolve("someone/unknown-model")


def test_offline_mode_never_tries_the_hub(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(models, "_download", lambda *a: pytest.fail("offline mode must not download"))
    assert resolve(MINILM_ID).name == "model"
    with pytest.raises(CleantuneError, match="HF_HUB_OFFLINE=1 and model 'x/y' has no offline copy"):
        resolve("x/y")


def test_decoder_classifier_pools_the_last_real_token(tiny_llama: Path):
    loaded = load_model(str(tiny_llama), num_labels=2)
    tok, model = loaded.tokenizer, loaded.model.eval()
    assert tok.pad_token is not None and model.config.pad_token_id == tok.pad_token_id
    texts = ["good movie", "the plot was very dull and boring"]
    with torch.no_grad():
        batched = model(**tok(texts, padding=True, return_tensors="pt")).logits
        alone = torch.cat([model(**tok([t], return_tensors="pt")).logits for t in texts])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-4)


def test_causal_lm_loads_without_labels(tiny_llama: Path):
    loaded = load_model(str(tiny_llama))
    assert type(loaded.model).__name__ == "LlamaForCausalLM"


def test_only_a_fresh_head_draws_random_numbers_when_a_classifier_loads(tiny_llama: Path, tmp_path: Path):
    """Why rows on a weight-poisoned model (head saved with it) did not move with the seeding fix
    of fc514ac, and rows whose head is new did."""

    def draws(spec: Path) -> tuple[models.Loaded, bool]:
        torch.manual_seed(0)
        before = torch.get_rng_state()
        loaded = load_model(str(spec), num_labels=2)
        return loaded, not torch.equal(before, torch.get_rng_state())

    loaded, fresh_head_draws = draws(tiny_llama)
    loaded.model.save_pretrained(tmp_path)
    loaded.tokenizer.save_pretrained(tmp_path)
    assert fresh_head_draws
    assert not draws(tmp_path)[1]


def test_an_adapter_that_names_no_base_model_is_refused(tmp_path: Path):
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None, "r": 2}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")  # never read: the config is refused first
    with pytest.raises(CleantuneError, match=r"adapter_config.json: base_model_name_or_path is empty"):
        load_model(str(tmp_path))
