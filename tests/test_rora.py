"""RoRA on a tiny BERT: the penalty (Eq. 10), weight dropout (Eq. 8), rescaling (Eq. 12), the product."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_context
from torch.nn.utils import parametrize
from typer.testing import CliRunner

from cleantune.cli import app
from cleantune.config import validate
from cleantune.defenses.rora import RoRA, RoRAConfig, effective_weight, orthogonality_penalty, top_blocks
from cleantune.dispatch import run
from cleantune.lora import LoraSpec
from cleantune.models import load_model


def prepared(tiny_bert, data_dir, **settings):
    loaded = load_model(str(tiny_bert), num_labels=2)
    defense = RoRA(RoRAConfig(**settings))
    model = defense.prepare(loaded.model, tiny_context(loaded.tokenizer, data_dir, "poisoned-weights"))
    return defense, model, loaded


def spec(variant: str) -> LoraSpec:
    """PEFT's flags for a LoRA variant."""
    return LoraSpec(use_dora=variant == "dora", init=variant if variant in ("pissa", "olora") else "default")


def randomise_updates(defense: RoRA) -> None:
    torch.manual_seed(3)
    with torch.no_grad():
        for layer in defense.layers.values():
            layer.lora_B["default"].weight.normal_()


def test_penalty_vanishes_only_off_the_top_subspaces():
    torch.manual_seed(0)
    w_pre = torch.randn(10, 12)
    U, _, Vh = torch.linalg.svd(w_pre, full_matrices=True)
    U_k, V_k = U[:, :4], Vh[:4].T
    B = U[:, 4:7] @ torch.randn(3, 2)  # columns outside span(U_k)
    A = torch.randn(2, 3) @ Vh[4:7]  # rows outside span(V_k)
    assert float(orthogonality_penalty(A, B, U_k, V_k)) == pytest.approx(0.0, abs=1e-8)
    assert float(orthogonality_penalty(torch.randn(2, 12), torch.randn(10, 2), U_k, V_k)) > 0.1
    # With the full bases the penalty is plain weight decay, which is why top_k must truncate.
    full = orthogonality_penalty(A, B, U, Vh.T)
    assert float(full) == pytest.approx(float(A.pow(2).sum() + B.pow(2).sum()), rel=1e-5)


def test_penalty_is_added_to_the_loss_scaled_by_lambda(tiny_bert, data_dir):
    defense, model, _ = prepared(tiny_bert, data_dir, penalty=2.0, top_k=4)
    loss = defense.extra_loss(model, {}, None)["orthogonality"]
    assert float(loss.detach()) > 0 and loss.requires_grad
    unscaled = sum(
        orthogonality_penalty(layer.lora_A["default"].weight, layer.lora_B["default"].weight, *defense.subspaces[name])
        for name, layer in defense.layers.items()
    )
    assert float(loss.detach()) == pytest.approx(2.0 * float(unscaled.detach()), rel=1e-5)
    assert RoRA(RoRAConfig(tr=False)).extra_loss(model, {}, None) == {}


@pytest.mark.parametrize("dropout_on", ["weight", "output"])
def test_frozen_weight_dropout_acts_in_training_only(tiny_bert, data_dir, dropout_on):
    defense, model, loaded = prepared(tiny_bert, data_dir, p=0.5, dropout_on=dropout_on)
    base = next(iter(defense.layers.values())).get_base_layer()
    weight = (base.parametrizations.weight.original if dropout_on == "weight" else base.weight).detach().clone()
    x = torch.randn(4, base.in_features)
    clean = torch.nn.functional.linear(x, weight, base.bias)
    model.train()
    torch.manual_seed(0)
    dropped = base(x)
    assert not torch.allclose(dropped, clean) and (dropped == 0).any() == (dropout_on == "output")
    model.eval()
    torch.testing.assert_close(base(x), clean)
    batch = loaded.tokenizer(["good film", "bad plot here"], return_tensors="pt", padding=True)
    kept = model(**batch).logits
    defense.finalize(model)  # removes the dropout; eval outputs do not move
    assert not parametrize.is_parametrized(base) and not base._forward_hooks
    torch.testing.assert_close(model(**batch).logits, kept)
    torch.testing.assert_close(base.weight, weight)


def test_the_full_subspace_reading_is_weight_decay(tiny_bert, data_dir):
    defense, model, _ = prepared(tiny_bert, data_dir, subspace="full", penalty=1.0)
    loss = float(defense.extra_loss(model, {}, None)["orthogonality"].detach())
    decay = sum(
        float((layer.lora_A["default"].weight.pow(2).sum() + layer.lora_B["default"].weight.pow(2).sum()).detach())
        for layer in defense.layers.values()
    )
    assert loss == pytest.approx(decay, rel=1e-4)  # the tiny BERT's query/value weights are square


@pytest.mark.parametrize(
    ("names", "rescale_layers", "blocks"),
    [
        ([f"layer.{i}.q" for i in range(24)], 0.125, {21, 22, 23}),  # the paper: 3 of BERT-large's 24
        ([f"layer.{i}.q" for i in range(6)], 0.125, {5}),  # MiniLM: one block, not half the model
        ([f"layer.{i}.q" for i in range(6)], 3, {3, 4, 5}),
        ([f"layer.{i}.q" for i in range(6)], 1.0, set(range(6))),
    ],
)
def test_rescaled_blocks_by_count_or_share_of_depth(names, rescale_layers, blocks):
    assert {int(n.split(".")[1]) for n in top_blocks(names, rescale_layers)} == blocks


def test_rescaling_matches_the_top_blocks_to_the_pretrained_spectral_norm(tiny_bert, data_dir):
    defense, model, _ = prepared(tiny_bert, data_dir, rescale_layers=1)
    randomise_updates(defense)
    before = {name: layer.get_delta_weight("default").clone() for name, layer in defense.layers.items()}
    defense.finalize(model)
    top = top_blocks(list(defense.layers), 1)
    assert top and all(".layer.1." in name for name in top) and set(defense.info()["rescale"]) == top
    for name, layer in defense.layers.items():
        delta = layer.get_delta_weight("default")
        if name in top:
            sigma = float(torch.linalg.matrix_norm(delta.detach(), ord=2))
            assert sigma == pytest.approx(defense.sigma_pre[name], rel=1e-4)
        else:
            torch.testing.assert_close(delta, before[name])


@pytest.mark.parametrize("variant", ["dora", "pissa", "olora"])
def test_variants_rescale_the_change_of_the_merged_weight(tiny_bert, data_dir, variant):
    defense, model, _ = prepared(tiny_bert, data_dir, lora=spec(variant), rescale_layers=1.0, top_k=4)
    # PiSSA and OLoRA start with the principal part in A and B: no change yet, no penalty.
    at_start = float(defense.extra_loss(model, {}, None)["orthogonality"].detach())
    assert (at_start == pytest.approx(0.0, abs=1e-6)) == (variant != "dora")
    torch.manual_seed(3)
    with torch.no_grad():
        for layer in defense.layers.values():
            layer.lora_B["default"].weight.add_(0.05 * torch.randn_like(layer.lora_B["default"].weight))
            if variant == "dora":
                layer.lora_magnitude_vector["default"].weight.mul_(1.1)
    assert float(defense.extra_loss(model, {}, None)["orthogonality"].detach()) > 0
    defense.finalize(model)
    for name, layer in defense.layers.items():
        change = (effective_weight(layer) - defense.w_pre[name]).detach()
        assert float(torch.linalg.matrix_norm(change, ord=2)) == pytest.approx(defense.sigma_pre[name], rel=1e-3)


@pytest.mark.parametrize("variant", ["lora", "dora", "pissa"])
def test_dev_evaluation_sees_the_rescaled_model_and_training_resumes_unchanged(tiny_bert, data_dir, variant):
    defense, model, loaded = prepared(tiny_bert, data_dir, lora=spec(variant), rescale_layers=1)
    randomise_updates(defense)
    model.eval()
    batch = loaded.tokenizer(["good film", "bad plot here"], return_tensors="pt", padding=True)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    plain = model(**batch).logits
    with defense.as_evaluated(model):
        evaluated = model(**batch).logits
    for key, value in model.state_dict().items():
        assert torch.equal(value, trained[key]), key
    defense.finalize(model)
    torch.testing.assert_close(model(**batch).logits, evaluated)
    assert not torch.allclose(evaluated, plain)


def test_a_rora_adapter_saves_and_loads_back_to_the_same_outputs(tiny_bert, data_dir, tmp_path):
    defense, model, loaded = prepared(tiny_bert, data_dir)
    randomise_updates(defense)
    model = defense.finalize(model)
    model.eval()
    batch = loaded.tokenizer(["good film", "bad plot here"], return_tensors="pt", padding=True)
    expected = model(**batch).logits
    model.save_pretrained(tmp_path / "adapter", safe_serialization=True)
    reloaded = load_model(str(tmp_path / "adapter"), num_labels=2).model.eval()
    torch.testing.assert_close(reloaded(**batch).logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["lora", "pissa"])
def test_rora_runs_end_to_end_on_weights_it_distrusts(tiny_tree, variant):
    tree = {
        **tiny_tree,
        "scenario": "poisoned-weights",
        "defense": {"name": "rora", "lora": {**spec(variant).model_dump(), "r": 2}},
    }
    record = run(validate(tree, "test"))
    assert record["status"] == "done" and record["metrics"]["asr"] is not None
    assert set(record["defense_info"]["rescale"]) and all(s > 0 for s in record["defense_info"]["rescale"].values())
    assert (validate(tree, "test").run_dir / "adapter" / "adapter_model.safetensors").exists()


def test_spectrum_reports_each_layer_and_the_scale_sweep(tiny_tree, tmp_path):
    tree = {**tiny_tree, "scenario": "poisoned-weights", "defense": {"name": "lora", "lora": {"r": 2}}}
    cfg = validate(tree, "test")
    run(cfg)
    args = ["analyze", "spectrum", str(cfg.run_dir), "--scale", "0", "--scale", "8", "--out", str(tmp_path / "plots")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    spectrum = json.loads((cfg.run_dir / "spectrum.json").read_text())
    assert len(spectrum["layers"]) == 4  # query and value of two blocks
    for layer in spectrum["layers"].values():
        assert layer["strength_ratio"] == pytest.approx(layer["sigma_pre"] / layer["sigma_delta"])
        assert 0 <= layer["left_alignment"] <= 1 + 1e-6
    sweep = {row["scale"]: row for row in spectrum["scale_sweep"]}
    assert sweep[8.0]["cacc"] == pytest.approx(  # s = α/r (16 / 2) is the trained adapter
        json.loads((cfg.run_dir / "metrics.json").read_text())["metrics"]["cacc"]
    )
    assert {p.name for p in (tmp_path / "plots").iterdir()} == {
        "spectrum-strength.png",
        "spectrum-alignment.png",
        "spectrum-scale.png",
    }
