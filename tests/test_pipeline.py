from __future__ import annotations

import dataclasses
import json

import pytest
import safetensors.torch
import torch
import yaml
from conftest import kill_cleantune_when, record_contexts, run_tree
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from cleantune import defenses
from cleantune.config import validate
from cleantune.defenses.peft_baselines import LoraTuningConfig, PeftBaseline
from cleantune.dispatch import evaluate, run
from cleantune.errors import CleantuneError
from cleantune.io import read_json
from cleantune.models import load_model


def config(tree: dict, **changes):
    return validate({**tree, **changes}, "test")


def test_lora_run_writes_a_complete_run_directory(tiny_tree):
    cfg = config(tiny_tree)
    record = run(cfg)
    run_dir = cfg.run_dir
    assert {"config.yaml", "metrics.json", "adapter", "attack_record.json"} <= {p.name for p in run_dir.iterdir()}
    assert not (run_dir / "checkpoints").exists()
    saved = read_json(run_dir / "metrics.json")
    assert saved == record
    for key in ("cacc", "asr", "delta"):
        assert 0 <= abs(saved["metrics"][key]) <= 100
    assert saved["metrics"]["delta"] == pytest.approx(saved["metrics"]["cacc"] - saved["metrics"]["asr"])
    assert 0 < saved["trainable_params"] < saved["total_params"]
    assert saved["seed"] == 7 and saved["wall_s"] > 0 and saved["peak_rss_mb"] > 0
    assert {"torch", "transformers", "peft"} <= set(saved["versions"])
    assert saved["commit"] is None or len(saved["commit"].removesuffix("+dirty")) >= 7
    assert saved["hardware"]["cpus"] >= 1 and saved["hardware"]["gpus"] == torch.cuda.device_count()
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["defense"]["lora"]["r"] == 4


def test_adapter_loads_natively_and_reproduces_predictions(tiny_tree, tiny_bert):
    cfg = config(tiny_tree)
    record = run(cfg)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    model = PeftModel.from_pretrained(base, cfg.run_dir / "adapter").eval()
    tok = AutoTokenizer.from_pretrained(cfg.run_dir / "adapter")
    assert evaluate(cfg, str(cfg.run_dir / "adapter"))["cacc"] == pytest.approx(record["metrics"]["cacc"])
    with torch.no_grad():
        logits = model(**tok(["good great movie"], return_tensors="pt")).logits
    assert logits.shape == (1, 2)


def test_full_fine_tuning_saves_a_safetensors_model(tiny_tree):
    cfg = config(tiny_tree, defense={"name": "fft"})
    record = run(cfg)
    assert (cfg.run_dir / "model" / "model.safetensors").exists()
    assert record["trainable_params"] == record["total_params"]


def test_same_seed_same_result(tiny_tree, tmp_path):
    first = run(config(tiny_tree, output_dir=str(tmp_path / "a")))
    second = run(config(tiny_tree, output_dir=str(tmp_path / "b")))
    assert first["metrics"] == second["metrics"]
    assert first["train"]["train_loss"] == second["train"]["train_loss"]


@pytest.mark.parametrize("model", ["tiny_bert", "tiny_llama"])
@pytest.mark.parametrize(
    "defense",
    [{"name": "lora", "lora": {"r": 2, **flag}} for flag in ({"use_dora": True}, {"init": "pissa"}, {"init": "olora"})]
    + [{"name": name, "num_virtual_tokens": 4} for name in ("prefix", "prompt", "ptuning")],
    ids=["dora", "pissa", "olora", "prefix", "prompt", "ptuning"],
)
def test_every_peft_baseline_trains_an_encoder_and_a_decoder(defense, model, data_dir, tmp_path, request):
    tree = run_tree(data_dir, request.getfixturevalue(model), tmp_path, defense=defense)
    tree["train"] = {"epochs": 1, "lr": 5e-3, "batch_size": 16}
    cfg = validate(tree, "test")
    record = run(cfg)
    assert 0 < record["trainable_params"] < record["total_params"]
    assert evaluate(cfg, record["product"])["cacc"] == pytest.approx(record["metrics"]["cacc"])


def test_decoder_model_trains_as_a_classifier(data_dir, tiny_llama, tmp_path):
    record = run(validate(run_tree(data_dir, tiny_llama, tmp_path), "test"))
    assert record["metrics"]["n_test"] == 40


def test_bad_input_leaves_no_run_directory(tiny_tree, tmp_path):
    broken = tmp_path / "broken.tsv"
    broken.write_text("sentence\tlabel\nok\t1\n\t0\n")
    local = {"dataset": "local", "train": str(broken), "dev": str(broken), "test": str(broken)}
    cfg = config(tiny_tree, data=local)
    with pytest.raises(CleantuneError, match="row 2, column 'sentence': empty text"):
        run(cfg)
    assert not cfg.run_dir.exists()
    cfg = config(tiny_tree, model={"spec": "./no/such/model"})
    with pytest.raises(CleantuneError, match="does not exist"):
        run(cfg)
    assert not cfg.run_dir.exists()


def test_finished_runs_are_not_redone(tiny_tree):
    cfg = config(tiny_tree)
    first = run(cfg)
    stamp = (cfg.run_dir / "metrics.json").stat().st_mtime_ns
    assert run(cfg) == first
    assert (cfg.run_dir / "metrics.json").stat().st_mtime_ns == stamp


def test_a_changed_config_under_the_same_name_is_refused_then_forced(tiny_tree):
    first = run(config(tiny_tree))
    changed = config(tiny_tree, train={**tiny_tree.get("train", {}), "lr": 2e-3, "epochs": 1})
    with pytest.raises(CleantuneError, match=r"different config \(train.epochs, train.lr changed\)"):
        run(changed)
    assert read_json(changed.run_dir / "metrics.json") == first  # refused: nothing touched
    again = run(changed, force=True)
    assert 2 * again["train"]["steps"] == first["train"]["steps"]
    assert yaml.safe_load((changed.run_dir / "config.yaml").read_text())["train"]["lr"] == 2e-3


def test_a_defense_cannot_reach_the_trigger(tiny_tree, monkeypatch):
    seen = record_contexts(monkeypatch, LoraTuningConfig)
    tree = {**tiny_tree, "attack": {"name": "badnet", "triggers": ["cf"], "rate": 0.2, "target_label": 1}}
    cfg = config(tree)
    run(cfg)
    ctx = seen[0]
    fields = {f.name for f in dataclasses.fields(ctx)}
    assert fields == {"scenario", "train", "dev", "clean_aux", "tokenizer", "max_length", "num_labels", "seed"}
    assert ctx.train.column_names == ["text", "label"]  # no idx to match against the poison record
    assert ctx.dev.column_names == ["text", "label"]
    assert not any("cf" in text.split() for text in ctx.dev["text"])  # dev is clean: no triggered test rows
    assert sum("cf" in text.split() for text in ctx.train["text"]) == round(0.2 * 120)  # it sees poisoned data only
    assert not any(isinstance(v, (list, set)) for v in vars(ctx).values())  # no poisoned-index record


def test_a_defense_declares_its_scenarios(tiny_tree, monkeypatch):
    class DataOnly(PeftBaseline):
        scenarios = frozenset({"poisoned-data"})

    monkeypatch.setitem(defenses.REGISTRY, LoraTuningConfig, DataOnly)
    with pytest.raises(CleantuneError, match="does not handle scenario 'poisoned-weights'"):
        run(config(tiny_tree, scenario="poisoned-weights"))


def test_a_run_killed_mid_training_resumes_and_finishes(tiny_tree, tmp_path):
    tree = {**tiny_tree, "train": {"epochs": 8, "lr": 1e-3, "batch_size": 8, "eval_steps": 15, "logging_steps": 15}}
    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump(tree))
    cfg = config(tree)
    checkpoints = cfg.run_dir / "checkpoints"
    kill_cleantune_when(["run", str(path)], lambda: any(checkpoints.glob("checkpoint-*/trainer_state.json")))
    assert not (cfg.run_dir / "metrics.json").exists()
    record = run(cfg)
    assert record["train"]["resumed_from"].startswith("checkpoint-")
    assert record["train"]["steps"] == 8 * 120 // 8


@pytest.mark.parametrize(
    "defense", [{"name": "lora", "lora": {"r": 2}}, {"name": "rora", "lora": {"r": 2}, "rescale_layers": 1}]
)
def test_a_purified_adapter_loads_with_plain_peft_onto_the_same_base(tiny_tree, tiny_bert, defense):
    suspicious = run(config(tiny_tree, name="suspicious"))["product"]
    tree = {**tiny_tree, "name": "purified", "scenario": "poisoned-weights", "defense": defense}
    cfg = config(tree, model={"spec": suspicious, "max_length": 32})
    record = run(cfg)
    product = cfg.run_dir / "adapter"
    saved = json.loads((product / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(tiny_bert)
    keys = safetensors.torch.load_file(product / "adapter_model.safetensors")
    assert keys and not any(k.count("base_model.model") > 1 for k in keys)  # not an adapter on an adapter
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    model = PeftModel.from_pretrained(base, product).eval()
    tok = AutoTokenizer.from_pretrained(product)
    texts = ["good great movie", "the plot was dull and cold"]
    logits = model(**tok(texts, return_tensors="pt", padding=True)).logits.argmax(-1)
    loaded = load_model(str(product), num_labels=2)
    assert torch.equal(loaded.model.eval()(**tok(texts, return_tensors="pt", padding=True)).logits.argmax(-1), logits)
    assert evaluate(cfg, str(product))["cacc"] == pytest.approx(record["metrics"]["cacc"])


def test_a_product_names_its_base_by_the_hub_id_given_not_where_its_copy_lies(tiny_tree, tiny_bert, monkeypatch):
    from cleantune import models

    monkeypatch.setitem(models.PACKAGED, "org/tiny-bert", lambda: tiny_bert)  # offline copy of a hub id
    cfg = config(tiny_tree, model={"spec": "org/tiny-bert", "max_length": 32})
    record = run(cfg)
    product = record["product"]
    assert json.loads((cfg.run_dir / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == (
        "org/tiny-bert"
    )
    assert "base_model: org/tiny-bert" in (cfg.run_dir / "adapter" / "README.md").read_text()
    assert evaluate(cfg, product)["cacc"] == pytest.approx(record["metrics"]["cacc"])  # loads back through that id
