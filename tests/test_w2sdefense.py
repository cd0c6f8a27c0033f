"""W2SDefense with a tiny BERT teacher and a tiny Llama student of another width and tokenizer."""

from __future__ import annotations

import pytest
import torch
from conftest import run_tree, tiny_context

from cleantune.config import validate
from cleantune.defenses.base import pooled
from cleantune.defenses.peft_baselines import ADAPTER, LoraTuningConfig, PeftBaseline, VirtualTokenConfig, lora_layers
from cleantune.defenses.w2sdefense import (
    W2SDefense,
    W2SDefenseConfig,
    distillation_loss,
    feature_alignment_loss,
    token_alignment_loss,
)
from cleantune.dispatch import run
from cleantune.lora import LoraSpec
from cleantune.models import load_model


def test_feature_loss_pairs_example_i_with_example_i():
    torch.manual_seed(0)
    student, teacher = torch.randn(4, 48), torch.randn(4, 48)
    expected = sum(float((student[i] - teacher[i]).pow(2).sum()) for i in range(4)) / 4
    assert float(feature_alignment_loss(student, teacher)) == pytest.approx(expected, rel=1e-5)
    assert float(feature_alignment_loss(student, teacher[[1, 0, 2, 3]])) != pytest.approx(expected, rel=1e-3)
    assert float(feature_alignment_loss(teacher, teacher)) == 0.0


def test_token_feature_loss_pairs_example_i_and_ignores_pads_and_virtual_tokens():
    torch.manual_seed(0)
    hidden, teacher = torch.randn(2, 5, 8), torch.randn(2, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    real = [(i, t) for i in range(2) for t in range(5) if mask[i, t]]
    expected = sum(float((hidden[i, t] - teacher[i]).pow(2).sum()) for i, t in real) / len(real)
    assert float(token_alignment_loss(hidden, mask, teacher)) == pytest.approx(expected, rel=1e-5)
    assert float(token_alignment_loss(hidden, mask, teacher[[1, 0]])) != pytest.approx(expected, rel=1e-3)
    padded = hidden.clone()
    padded[0, 3:] = 1e3  # pad positions do not count
    assert float(token_alignment_loss(padded, mask, teacher)) == pytest.approx(expected, rel=1e-5)
    # Two virtual tokens prepended: the mask covers the last five positions only.
    prompted = torch.cat([torch.full((2, 2, 8), 1e3), hidden], dim=1)
    assert float(token_alignment_loss(prompted, mask, teacher)) == pytest.approx(expected, rel=1e-5)


def test_loss_weights_come_from_the_authors_set_for_the_named_attack():
    assert W2SDefenseConfig(weights="badnet").loss_weights() == (5.0, 0.001, 0.001)
    assert W2SDefenseConfig().loss_weights() == (3.0, 0.01, 0.001)  # InSent's, the default
    assert W2SDefenseConfig(weights="synattack", kd_weight=0.5).loss_weights() == (1.0, 0.5, 0.002)


def test_pooling_takes_the_last_real_token_under_any_padding_and_prompt():
    hidden = torch.arange(2 * 6, dtype=torch.float).reshape(2, 6, 1)
    right = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
    assert pooled(hidden, right, decoder=True).flatten().tolist() == [2, 10]
    left = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 1, 1]])
    assert pooled(hidden, left, decoder=True).flatten().tolist() == [5, 11]
    # Two virtual tokens prepended by prompt tuning: the mask covers only the real tokens.
    assert pooled(hidden, right[:, :4], decoder=True).flatten().tolist() == [4, 11]
    assert pooled(hidden, right[:, :4], decoder=False).flatten().tolist() == [2, 8]


def test_distillation_vanishes_when_the_logits_agree():
    logits = torch.randn(5, 2)
    assert float(distillation_loss(logits, logits.clone(), 2.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(distillation_loss(logits, -logits, 2.0)) > 0


def test_teacher_is_frozen_sees_the_same_texts_and_is_trained_once(
    data_dir, tiny_bert, tiny_llama_wide, tmp_path, monkeypatch
):
    monkeypatch.setenv("CLEANTUNE_CACHE", str(tmp_path / "cache"))
    seen: list[tuple[bool, list[str], list[str]]] = []
    original = W2SDefense.extra_loss

    def spy(self, model, inputs, outputs):
        if "side_input_ids" in inputs:
            tokenizer, side = self._student_tokenizer, self.side.tokenizer
            student = tokenizer.batch_decode(inputs["input_ids"], skip_special_tokens=True)
            teacher = side.batch_decode(inputs["side_input_ids"], skip_special_tokens=True)
            untouched = all(p.grad is None and not p.requires_grad for p in self.teacher.parameters())
            seen.append((untouched, [" ".join(t.lower().split()) for t in student], teacher))
        return original(self, model, inputs, outputs)

    monkeypatch.setattr(W2SDefense, "extra_loss", spy)
    original_prepare = W2SDefense.prepare

    def keep_tokenizer(self, model, ctx):
        self._student_tokenizer = ctx.tokenizer
        return original_prepare(self, model, ctx)

    monkeypatch.setattr(W2SDefense, "prepare", keep_tokenizer)
    defense = {"name": "w2sdefense", "teacher": {"spec": str(tiny_bert), "epochs": 1, "batch_size": 16}}
    tree = run_tree(data_dir, tiny_llama_wide, tmp_path / "runs", defense=defense, scenario="poisoned-weights")
    tree["train"] = {"epochs": 1, "batch_size": 16, "lr": 1e-3}
    first = run(validate(tree, "test"))
    assert seen and all(untouched for untouched, _, _ in seen)
    assert all(student == teacher for _, student, teacher in seen)  # example i meets example i
    assert first["defense_info"]["teacher_reused"] is False and first["defense_info"]["teacher_train_s"] > 0
    second = run(validate({**tree, "name": "again"}, "test"))
    assert second["defense_info"]["teacher_reused"] is True
    assert second["defense_info"]["teacher_train_s"] == first["defense_info"]["teacher_train_s"]
    assert second["trainable_params"] < second["total_params"]


@pytest.mark.parametrize("name", ["prompt", "ptuning"])
def test_a_virtual_token_decoder_scores_each_examples_last_real_token(tiny_llama, data_dir, name):
    loaded = load_model(str(tiny_llama), num_labels=2)
    ctx = tiny_context(loaded.tokenizer, data_dir, "poisoned-weights")
    model = PeftBaseline(VirtualTokenConfig(name=name, num_virtual_tokens=3)).prepare(loaded.model, ctx).eval()
    batch = ctx.tokenizer(["a b c d e f", "a b"], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
        last_real = pooled(out.hidden_states[-1], batch["attention_mask"], decoder=True)
        torch.testing.assert_close(out.logits, model.get_base_model().score(last_real))


@pytest.mark.parametrize(
    ("r", "alpha", "rank", "scale"), [(0.125, "r", 6, 1.0), (0.3, 4.0, 14, 4 / 14), (5, 10.0, 5, 2.0)]
)
def test_a_rank_given_as_a_share_of_the_width_keeps_the_papers_proportion(
    tiny_llama_wide, data_dir, r, alpha, rank, scale
):
    # The paper's student: r 512 of Llama's 4,096; on the 48-wide tiny Llama an eighth is 6.
    loaded = load_model(str(tiny_llama_wide), num_labels=2)
    ctx = tiny_context(loaded.tokenizer, data_dir, "poisoned-weights")
    model = PeftBaseline(LoraTuningConfig(lora=LoraSpec(r=r, alpha=alpha))).prepare(loaded.model, ctx)
    layers = lora_layers(model)
    assert layers and all(layer.r[ADAPTER] == rank for layer in layers.values())
    assert all(layer.scaling[ADAPTER] == pytest.approx(scale) for layer in layers.values())
    assert W2SDefenseConfig().student == LoraTuningConfig(lora=LoraSpec(r=0.125, alpha="r"))
