"""MuScleLoRA on a tiny BERT: the layer (Eq. 6), alignment (Eqs. 7-8), μ, and the data it sees."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from conftest import record_contexts, tiny_context
from torch import nn

from cleantune.config import validate
from cleantune.defenses.muscle_lora import (
    MultiScaleLinear,
    MuScleLoRA,
    MuScleLoRAConfig,
    _family,
    align,
    mix,
    mu_at,
)
from cleantune.dispatch import run
from cleantune.models import load_model
from cleantune.training import StepInfo


def test_layer_output_is_frozen_base_plus_multi_scale_update():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = MultiScaleLinear(base, scales=[1, 4, 8], rank=2, alpha=6.0)
    x = torch.randn(3, 6)
    S = torch.tensor([1, 1, 4, 4, 8, 8.0])
    expected = base(x) + (6.0 / 2) * ((x @ layer.lora_L.T) * S) @ layer.lora_R.T
    torch.testing.assert_close(layer(x), expected)
    assert not base.weight.requires_grad and layer.lora_L.requires_grad and layer.lora_R.requires_grad
    assert layer.delta_weight().abs().sum() > 0  # Kaiming-initialised: ΔW ≠ 0 at start
    torch.testing.assert_close(layer.merged()(x), layer(x), atol=1e-5, rtol=1e-5)


def test_aligned_gradient_is_parallel_to_the_clean_one_with_the_stated_norm():
    torch.manual_seed(1)
    g, g_clean = torch.randn(4, 7), torch.randn(4, 7)
    g_a = align(g, g_clean)
    cos = torch.nn.functional.cosine_similarity(g_a.flatten(), g_clean.flatten(), dim=0)
    assert cos == pytest.approx(1.0, abs=1e-6)  # |g·g_c| keeps it pointing along +g_c
    assert g_a.norm() == pytest.approx(float((g * g_clean).sum().abs() / g_clean.norm()), rel=1e-5)
    assert torch.equal(align(g, torch.zeros_like(g)), torch.zeros_like(g))
    torch.testing.assert_close(mix(g_a, g, 0.25), 0.75 * g_a + 0.25 * g)


def test_mu_follows_its_schedule():
    cfg = MuScleLoRAConfig(mu_max=0.1, ga_start_epoch=1)
    values = [mu_at(epoch, 10, cfg) for epoch in (0, 0.9, 1.0, 1.5, 5.0, 9.0, 9.99)]
    assert values == pytest.approx([0, 0, 0, 0, 0.1 * 4 / 9, 0.1 * 8 / 9, 0.1 * 8 / 9])
    assert mu_at(3, 1, cfg) == 0.0  # one epoch: never past the start epoch
    per_step = MuScleLoRAConfig(mu_max=0.1, ga_start_epoch=0, mu_schedule="step")
    assert [mu_at(epoch, 1, per_step) for epoch in (0.0, 0.25, 0.5)] == pytest.approx([0.0, 0.025, 0.05])


def test_prepare_wraps_the_pooler_and_trains_only_the_new_parts(tiny_bert, data_dir):
    loaded = load_model(str(tiny_bert), num_labels=2)
    model = MuScleLoRA(MuScleLoRAConfig(clean_aux=8)).prepare(loaded.model, tiny_context(loaded.tokenizer, data_dir))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.endswith("pooler.dense.lora_L") for n in trainable)
    assert any("query.lora_A" in n for n in trainable)
    assert all("lora_" in n for n in trainable)  # head, W0 and the encoder stay frozen


def test_decoders_get_the_authors_two_layer_score_head(tiny_llama, data_dir):
    loaded = load_model(str(tiny_llama), num_labels=2)
    model = MuScleLoRA(MuScleLoRAConfig(clean_aux=8)).prepare(loaded.model, tiny_context(loaded.tokenizer, data_dir))
    head = model.get_submodule("base_model.model.score")
    assert isinstance(head[0], MultiScaleLinear) and head[0].base.out_features == 16 and head[2].out_features == 2
    assert head[0].S.tolist() == [1, 2, 3, 4]  # the authors' LLM scales
    batch = loaded.tokenizer(["a b c", "d"], return_tensors="pt", padding=True)
    assert model(**batch).logits.shape == (2, 2)


@pytest.mark.parametrize(
    ("model_type", "width", "scales"),
    [
        ("bert", 768, [1, 4, 8, 12, 16, 20, 24, 28, 32]),  # Table 6, BERT-base
        ("bert", 1024, [1, 2, 3, 4, 5, 6, 7, 8, 9]),  # BERT-large, not BERT-base's vector
        ("roberta", 768, [1, 2, 4, 6, 8, 10, 12, 14, 16]),
        ("roberta", 1024, [1, 2, 3, 4, 5, 6, 7, 8, 9]),
        ("llama", 4096, [1, 2, 3, 4]),
    ],
)
def test_every_table_6_model_gets_its_own_scale_vector(model_type, width, scales, caplog):
    model = SimpleNamespace(config=SimpleNamespace(model_type=model_type, hidden_size=width))
    assert _family(model)[1] == scales and not caplog.records


def test_a_width_table_6_lacks_falls_back_with_a_warning(caplog):
    model = SimpleNamespace(config=SimpleNamespace(model_type="roberta", hidden_size=384))
    assert _family(model)[1] == [1, 2, 4, 6, 8, 10, 12, 14, 16]
    assert "untuned" in caplog.text and "defense.scales" in caplog.text


@pytest.mark.parametrize(("rule", "expect_raw"), [("aligned", False), ("raw", True)])
def test_the_authors_open_gate_rule_before_the_alignment_epoch(tiny_bert, data_dir, rule, expect_raw):
    loaded = load_model(str(tiny_bert), num_labels=2)
    cfg = MuScleLoRAConfig(clean_aux=8, aux_batch_size=4, clean_every=2, open_gate_before_start=rule)
    defense = MuScleLoRA(cfg)
    model = defense.prepare(loaded.model, tiny_context(loaded.tokenizer, data_dir))
    batch = loaded.tokenizer(["good film", "bad plot"], return_tensors="pt", padding=True)
    model(**batch, labels=torch.tensor([1, 0])).loss.backward()
    raw = [p.grad.clone() for p in model.parameters() if p.requires_grad and p.grad is not None]
    # An open gate (clean loss below aux_loss_gate) with a clean gradient kept from the step before.
    defense._clean_loss, defense._clean_grads = 0.0, [torch.randn_like(g) for g in raw]
    step = StepInfo(epoch=0.5, num_epochs=10, global_step=1, reduce_mean=lambda t: t)
    defense.edit_gradients(model, step)
    after = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert all(torch.equal(a, b) for a, b in zip(after, raw, strict=True)) == expect_raw


@pytest.mark.parametrize("rule", ["zero", "raw"])
def test_a_tensor_without_clean_gradient_is_zeroed_or_kept_raw(tiny_bert, data_dir, rule):
    loaded = load_model(str(tiny_bert), num_labels=2)
    defense = MuScleLoRA(MuScleLoRAConfig(clean_aux=8, aux_batch_size=4, clean_every=2, zero_clean_gradient=rule))
    model = defense.prepare(loaded.model, tiny_context(loaded.tokenizer, data_dir))
    batch = loaded.tokenizer(["good film", "bad plot"], return_tensors="pt", padding=True)
    model(**batch, labels=torch.tensor([1, 0])).loss.backward()
    params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
    chosen = next(i for i, p in enumerate(params) if p.grad.any())  # LoRA's A has none while B is zero
    raw = params[chosen].grad.clone()
    defense._clean_loss = 1.0  # a closed gate: pure alignment
    defense._clean_grads = [torch.zeros_like(p) if i == chosen else torch.randn_like(p) for i, p in enumerate(params)]
    defense.edit_gradients(model, StepInfo(epoch=2.0, num_epochs=10, global_step=1, reduce_mean=lambda t: t))
    expected = raw if rule == "raw" else torch.zeros_like(raw)
    assert torch.equal(params[chosen].grad, expected)


def test_a_step_whose_gradient_reaches_no_weight_is_counted_dead(tiny_bert, data_dir):
    loaded = load_model(str(tiny_bert), num_labels=2)
    defense = MuScleLoRA(MuScleLoRAConfig(clean_aux=8, aux_batch_size=4, clean_every=2))
    model = defense.prepare(loaded.model, tiny_context(loaded.tokenizer, data_dir))
    batch = loaded.tokenizer(["good film", "bad plot"], return_tensors="pt", padding=True)
    model(**batch, labels=torch.tensor([1, 0])).loss.backward()
    params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
    defense._clean_loss, defense._clean_grads = 1.0, [torch.randn_like(p) for p in params]
    defense.edit_gradients(model, StepInfo(epoch=2.0, num_epochs=10, global_step=1, reduce_mean=lambda t: t))
    for p in params:  # as behind a saturated tanh: nothing reaches any trained weight
        p.grad.zero_()
    defense.edit_gradients(model, StepInfo(epoch=2.0, num_epochs=10, global_step=3, reduce_mean=lambda t: t))
    assert defense.info()["regime"]["dead_share"] == 0.5


def test_clean_samples_never_appear_in_the_selection_dev_set(tiny_tree, monkeypatch):
    seen = record_contexts(monkeypatch, MuScleLoRAConfig)
    tree = {**tiny_tree, "defense": {"name": "muscle-lora", "clean_aux": 12, "aux_batch_size": 8}}
    record = run(validate(tree, "test"))
    ctx = seen[0]
    assert len(ctx.clean_aux) == 12 and len(ctx.dev) == 40 - 12
    assert not set(ctx.clean_aux["text"]) & set(ctx.dev["text"])
    assert {f.name for f in dataclasses.fields(ctx)} >= {"clean_aux", "dev"}
    assert record["trainable_params"] < record["total_params"]
    assert (validate(tree, "test").run_dir / "model" / "model.safetensors").exists()  # merged product


def test_gradient_alignment_edits_every_step(tiny_tree, monkeypatch):
    edited: list[float] = []
    original = MuScleLoRA.edit_gradients

    def spy(self, model, step):
        before = [p.grad.clone() for p in model.parameters() if p.requires_grad and p.grad is not None]
        original(self, model, step)
        after = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
        edited.append(max(float((a - b).abs().max()) for a, b in zip(after, before, strict=True)))

    monkeypatch.setattr(MuScleLoRA, "edit_gradients", spy)
    tree = {**tiny_tree, "defense": {"name": "muscle-lora", "clean_aux": 8, "aux_batch_size": 8}}
    tree["train"] = {"epochs": 1, "batch_size": 16, "lr": 1e-3}
    record = run(validate(tree, "test"))
    assert len(edited) == 8 and all(delta > 0 for delta in edited)
    # The regime is recorded: one epoch before ga_start_epoch 1 is pure alignment, μ never leaves 0.
    regime = record["defense_info"]["regime"]
    assert regime["final_mu"] == 0.0 and 0.0 <= regime["gate_closed_share"] <= 1.0
    assert -1.0 <= regime["mean_cosine"] <= 1.0 and regime["mean_cosine"] != 0.0
    assert regime["dead_share"] == 0.0  # gradients reached the weights at every step


def test_clean_gradient_is_reused_between_recomputations(tiny_tree, monkeypatch):
    computed: list[int] = []
    original = MuScleLoRA._clean_gradients

    def spy(self, model, params, step):
        computed.append(step.global_step)
        return original(self, model, params, step)

    monkeypatch.setattr(MuScleLoRA, "_clean_gradients", spy)
    tree = {**tiny_tree, "defense": {"name": "muscle-lora", "clean_aux": 8, "aux_batch_size": 8, "clean_every": 3}}
    tree["train"] = {"epochs": 1, "batch_size": 16, "lr": 1e-3}
    run(validate(tree, "test"))
    assert computed == [0, 3, 6]  # 8 steps, a fresh clean gradient every third


@pytest.mark.parametrize("clean_every", [1, 3])
def test_a_resumed_run_draws_the_clean_batches_an_uninterrupted_run_draws(tiny_bert, data_dir, clean_every):
    def prepared() -> MuScleLoRA:
        loaded = load_model(str(tiny_bert), num_labels=2)
        defense = MuScleLoRA(MuScleLoRAConfig(clean_aux=8, aux_batch_size=4, clean_every=clean_every))
        defense.prepare(loaded.model, tiny_context(loaded.tokenizer, data_dir))
        return defense

    uninterrupted = prepared()
    steps = [s for s in range(8) if s % clean_every == 0]  # the steps that compute a clean gradient
    stream = [uninterrupted._clean_batch(s)["input_ids"] for s in steps]
    assert not torch.equal(stream[0], stream[1])
    # Resumed from a checkpoint at step 7: the batch of the last refresh at or before it.
    resumed = prepared()._clean_batch(7)["input_ids"]
    assert torch.equal(resumed, stream[-1])
