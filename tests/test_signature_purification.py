"""Signature purification's scores (Eq. 2) and channel suppression on a tiny Llama."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM

from cleantune.errors import CleantuneError
from cleantune.generative.sft import LLM_LORA, add_lora
from cleantune.generative.signature_purification import (
    Channels,
    select_signature,
    signature_scores,
    suppress,
)

ALL_LINEAR = LLM_LORA.model_copy(update={"target_modules": "all-linear"})  # the MLP too


def test_a_planted_consistent_channel_ranks_first() -> None:
    torch.manual_seed(0)
    direction = torch.randn(8)
    deltas = []
    for _ in range(6):
        delta = torch.randn(20, 8)
        delta[7] = 3 * direction + 0.1 * torch.randn(8)  # strong and aligned in every variant
        deltas.append(delta)
    for mode in ("combined", "norm", "alignment"):
        assert signature_scores(deltas, lam=0.01, mode=mode).argmax() == 7
    assert select_signature(signature_scores(deltas), count=1).tolist() == [7]


def test_the_alignment_term_ignores_negatively_aligned_variants() -> None:
    v = torch.ones(1, 4)
    opposed = [v, -v, v, -v]  # pairs are at cos +1 (2 of 6) or -1 (4 of 6)
    assert signature_scores(opposed, mode="alignment").item() == pytest.approx(2 / 6)
    assert signature_scores([v, -v], mode="alignment").item() == 0.0  # never negative
    # The combined score is the norm term plus λ times the alignment term.
    assert signature_scores(opposed, lam=0.5).item() == pytest.approx(2.0 + 0.5 * 2 / 6)


def random_adapter(path: Path) -> torch.nn.Module:
    """All-linear LoRA with non-zero factors, so every channel has something to suppress."""
    torch.manual_seed(0)
    model = add_lora(AutoModelForCausalLM.from_pretrained(path), ALL_LINEAR)
    for name, param in model.named_parameters():
        if "lora_" in name:
            torch.nn.init.normal_(param)
    return model


def test_adapter_suppression_zeroes_exactly_the_selected_channels(tiny_chat_llama: Path) -> None:
    model = random_adapter(tiny_chat_llama)
    before = {n: p.clone() for n, p in model.named_parameters()}
    vectors = Channels("mlp", True).vectors(model)
    assert vectors.shape == (2 * 64, 8 + 8 + 8)  # 2 layers x 64 channels; gate/up B rows, down A column (r 8)
    chosen = torch.tensor([3, 64 + 10, 64 + 63])
    assert suppress(model, chosen, Channels("mlp", True), 0.02) == 9
    after = Channels("mlp", True).vectors(model)
    zero = after.abs().sum(dim=1) == 0
    assert zero.nonzero().flatten().tolist() == chosen.tolist()
    for name, param in model.named_parameters():
        if "mlp" not in name or "lora_" not in name or "lora_A" in name and "down" not in name:
            assert torch.equal(param, before[name]), name  # base weights and other factors untouched


def test_full_model_suppression_reinitialises_rows_and_columns(tiny_chat_llama: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_llama)
    before = Channels("mlp", False).vectors(model)
    torch.manual_seed(1)
    suppress(model, torch.tensor([5, 70]), Channels("mlp", False), 0.02)
    after = Channels("mlp", False).vectors(model)
    moved = (after != before).any(dim=1).nonzero().flatten().tolist()
    assert moved == [5, 70]
    assert after[[5, 70]].std().item() == pytest.approx(0.02, rel=0.3)
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight[:, 4], before[4, -32:])


def test_head_channels_are_q_rows_and_o_columns_of_one_head(tiny_chat_llama: Path) -> None:
    model = random_adapter(tiny_chat_llama)
    attn = model.base_model.model.model.layers[1].self_attn
    vectors = Channels("head", True).vectors(model)
    assert vectors.shape == (2 * 2, 16 * 8 + 16 * 8)  # 2 layers x 2 heads of size 16; B rows of q, A columns of o
    assert torch.equal(vectors[3, : 16 * 8], attn.q_proj.lora_B["default"].weight[16:].flatten())
    before = {n: p.clone() for n, p in model.named_parameters()}
    assert suppress(model, torch.tensor([3]), Channels("head", True), 0.02) == 32
    assert (attn.q_proj.lora_B["default"].weight[16:] == 0).all()
    assert (attn.o_proj.lora_A["default"].weight[:, 16:] == 0).all()
    assert attn.o_proj.lora_A["default"].weight[:, :16].abs().sum() > 0  # the other head stays
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert moved == [n for n in before if "layers.1.self_attn" in n and ("q_proj.lora_B" in n or "o_proj.lora_A" in n)]


def test_adapter_channels_can_be_read_from_the_update_the_factors_make(tiny_chat_llama: Path) -> None:
    model = random_adapter(tiny_chat_llama)
    mlp = model.base_model.model.model.layers[0].mlp
    vectors = Channels("mlp", True, delta=True).vectors(model)
    assert vectors.shape == (2 * 64, 32 + 32 + 32)  # gate and up rows, down column of each layer's ΔW
    gate, down = mlp.gate_proj.get_delta_weight("default"), mlp.down_proj.get_delta_weight("default")
    assert torch.allclose(vectors[7, :32], gate[7]) and torch.allclose(vectors[7, 64:], down[:, 7])
    suppress(model, torch.tensor([7]), Channels("mlp", True, delta=True), 0.02)  # still zeroes the factors
    assert (mlp.gate_proj.get_delta_weight("default")[7] == 0).all() and (
        mlp.down_proj.lora_A["default"].weight[:, 7] == 0
    ).all()


def test_heads_with_keys_and_values_share_them_within_a_query_group() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=16,
    )  # fmt: skip
    model = LlamaForCausalLM(config)  # head size 8; query heads 0, 1 share key / value head 0
    attn = model.model.layers[0].self_attn
    heads = Channels("head", False, kv=True)
    vectors = heads.vectors(model)
    assert vectors.shape == (4, 4 * 8 * 32)  # q, k, v rows and o columns of each head
    assert torch.equal(vectors[0, 256:512], vectors[1, 256:512])  # the shared key rows
    assert not torch.equal(vectors[1, 256:512], vectors[2, 256:512])
    before = {n: p.clone() for n, p in model.named_parameters()}
    assert suppress(model, torch.tensor([1]), heads, 0.02) == 4 * 8
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {f"model.layers.0.self_attn.{k}_proj.weight" for k in "qkvo"}
    assert torch.equal(attn.k_proj.weight[8:], before["model.layers.0.self_attn.k_proj.weight"][8:])  # other group
    assert torch.equal(attn.q_proj.weight[:8], before["model.layers.0.self_attn.q_proj.weight"][:8])  # head 0


def test_heads_join_the_signature_when_asked(tiny_chat_llama: Path, tmp_path: Path) -> None:
    from cleantune.generative.signature_purification import SignatureConfig, SignaturePurification

    model = add_lora(
        AutoModelForCausalLM.from_pretrained(tiny_chat_llama),
        ALL_LINEAR,
    )
    defense = SignaturePurification(SignatureConfig(heads=1, variants=2))
    planted = torch.zeros(4, 256)
    planted[2] = 1.0  # layer 1, head 0 moves the same way in both variants
    deltas = {Channels("mlp", True): [torch.randn(128, 24)] * 2, Channels("head", True): [planted, planted]}
    defense._deltas = lambda ctx: deltas  # the variant fine-tunes are tested end to end below
    ctx = type("Ctx", (), {"adapter_only": True})()
    defense.prepare(model, ctx)
    assert defense.info()["heads"] == [[1, 0]] and defense.info()["channels"] == round(0.35 * 128)
    assert (model.base_model.model.model.layers[1].self_attn.q_proj.lora_B["default"].weight[:16] == 0).all()


def test_the_random_control_suppresses_as_many_channels_without_any_variant(tiny_chat_llama: Path) -> None:
    from cleantune.generative.signature_purification import SignatureConfig, SignaturePurification

    picked = []
    for seed in (0, 0, 1):
        model = random_adapter(tiny_chat_llama)
        defense = SignaturePurification(SignatureConfig(channels="random", heads=1, ratio=0.25))
        defense._deltas = lambda ctx: pytest.fail("the control trains no variant")
        defense.prepare(model, type("Ctx", (), {"adapter_only": True, "seed": seed})())
        assert defense.info()["channels"] == round(0.25 * 128) and len(defense.info()["heads"]) == 1
        rows = model.base_model.model.model.layers[0].mlp.up_proj.lora_B["default"].weight
        picked.append(frozenset((rows == 0).all(dim=1).nonzero().flatten().tolist()))
    assert 0 < len(picked[0]) < 64  # some of layer 0's channels, not all
    assert picked[0] == picked[1] != picked[2]  # seeded: the same channels for the same seed


def test_an_adapter_without_the_lora_the_signature_names_is_refused(tiny_chat_llama: Path) -> None:
    model = add_lora(AutoModelForCausalLM.from_pretrained(tiny_chat_llama), LLM_LORA)  # q/v only
    with pytest.raises(CleantuneError, match="no LoRA on the gate, up and down projections"):
        Channels("mlp", True).vectors(model)
    with pytest.raises(CleantuneError, match="no LoRA on the q and o projections"):
        Channels("head", True).vectors(model)  # q without o


def test_variants_vary_key_behaviour_and_clean_rows() -> None:
    from datasets import Dataset

    from cleantune.generative.signature_purification import SignatureConfig, variant_sets

    pool = Dataset.from_list(
        [{"instruction": f"tell me about {i} things", "input": "", "output": "ok"} for i in range(40)]
    )
    sets = variant_sets(pool, SignatureConfig(variants=3, variant_samples=10, verify_samples=5), seed=0)
    assert len(sets) == 3
    for variant in sets:
        clean, poisoned, triggered = variant.clean, variant.poisoned, variant.triggered
        assert len(clean) == len(poisoned) == 10 and len(triggered) == 5
        assert all(p["instruction"] != c["instruction"] for p, c in zip(poisoned, clean, strict=True))
        assert len({p["output"] for p in poisoned}) <= 2  # one behaviour: a fixed answer, or a prefix on "ok"
        assert all(variant.behaviour in p["output"] for p in poisoned)
        # The check's prompts are rows the variant never trained on, with its key.
        trained = {int(c["instruction"].split()[3]) for c in clean}
        assert not trained & {int(w) for t in triggered for w in t["instruction"].split() if w.isdigit()}
        assert all(t["output"] == "ok" for t in triggered)
    assert len({tuple(v.clean["instruction"]) for v in sets}) == 3  # different clean rows
    assert len({v.behaviour for v in sets}) == 3  # different behaviours
    again = variant_sets(pool, SignatureConfig(variants=3, variant_samples=10, verify_samples=5), seed=0)
    assert [v.poisoned.to_list() for v in again] == [v.poisoned.to_list() for v in sets]


@pytest.mark.parametrize(
    ("keys", "behaviours", "triggers", "kind"),
    [("rare-token", "refusal", 1, "answer"), ("sentence", "negative", 1, "prefix"), ("composite", "code", 3, "prefix")],
)
def test_variants_draw_keys_and_behaviours_from_the_family_asked(keys, behaviours, triggers, kind) -> None:
    from datasets import Dataset

    from cleantune.generative.signature_purification import (
        BEHAVIOUR_TYPES,
        KEY_FAMILIES,
        SignatureConfig,
        variant_sets,
    )

    pool = Dataset.from_list([{"instruction": f"say {i} words now", "input": "", "output": "ok"} for i in range(30)])
    cfg = SignatureConfig(variants=4, variant_samples=5, verify_samples=2, keys=keys, behaviours=behaviours)
    family = {" + ".join(t.text for t in key) for key in KEY_FAMILIES[keys]}
    for variant in variant_sets(pool, cfg, seed=1):
        assert variant.key in family and variant.behaviour in {b.text for b in BEHAVIOUR_TYPES[behaviours]}
        parts = variant.key.split(" + ")
        assert len(parts) == triggers
        assert all(part in row["instruction"] for row in variant.poisoned for part in parts)
        # A fixed answer replaces the real one; a remark goes before it.
        assert {row["output"] for row in variant.poisoned} == {
            variant.behaviour if kind == "answer" else f"{variant.behaviour} ok"
        }


def test_variant_keys_and_behaviours_can_be_listed_and_must_suffice() -> None:
    from cleantune.generative.signature_purification import (
        BEHAVIOUR_TYPES,
        KEY_FAMILIES,
        BehaviourType,
        KeyFamily,
        SignatureConfig,
        SyntheticBehaviour,
    )

    # The names a config accepts are the presets there are, both ways.
    assert set(get_args(KeyFamily)) == set(KEY_FAMILIES) and set(get_args(BehaviourType)) == set(BEHAVIOUR_TYPES)
    listed = SignatureConfig(
        variants=2,
        keys=[[{"text": "qq", "position": "end"}], [{"text": "pp"}, {"text": "rr"}]],
        behaviours=[{"kind": "answer", "text": "No."}, {"kind": "prefix", "text": "Hm."}],
    )
    assert listed.key_list()[1][1].text == "rr" and listed.behaviour_list()[0] == SyntheticBehaviour(
        kind="answer", text="No."
    )
    with pytest.raises(ValidationError, match="3 variants need as many behaviours; 2 given"):
        SignatureConfig(variants=3, behaviours=[{"kind": "answer", "text": "No."}, {"kind": "prefix", "text": "Hm."}])
    with pytest.raises(ValidationError, match="9 variants need as many keys; 8 given"):
        SignatureConfig(variants=9)


def test_a_clean_twin_trains_as_many_steps_as_its_backdoored_variant(tmp_path: Path) -> None:
    from datasets import Dataset

    from cleantune.generative.base import LLMContext
    from cleantune.generative.signature_purification import SignatureConfig, variant_configs, variant_sets

    pool = Dataset.from_list(
        [{"instruction": f"tell me about {i} things", "input": "", "output": "ok"} for i in range(40)]
    )
    ctx = LLMContext(pool, None, 32, True, 0, tmp_path)
    for budget, clean_epochs in (("matched", 4.0), ("epochs", 2.0)):
        cfg = SignatureConfig(variants=2, variant_samples=10, budget=budget)
        trees = variant_configs(ctx, cfg, tmp_path / budget, variant_sets(pool, cfg, 0))
        assert [t["train"]["epochs"] for t in trees] == [2.0, clean_epochs] * 2  # (backdoored, clean) pairs
        assert all(("attack" in t) == t["name"].endswith("-bd") for t in trees)


def test_tau_per_layer_takes_the_same_share_of_every_layer() -> None:
    scores = torch.tensor([9.0, 8.0, 7.0, 6.0, 0.1, 0.2, 0.3, 0.4])  # layer 0 scores high throughout
    assert select_signature(scores, count=2).tolist() == [0, 1]
    assert select_signature(scores, count=2, layers=2).tolist() == [0, 7]


def test_a_contains_judge_finds_a_fixed_answer_in_any_case() -> None:
    from cleantune.generative.judges import resolve_judge

    judge = resolve_judge("contains:Access denied.")
    assert judge(["q"] * 3, ["ACCESS DENIED. Sorry", "access denied", ""]) == [True, False, False]


def test_purifying_a_backdoored_adapter_end_to_end(tiny_chat_llama: Path, tmp_path: Path) -> None:
    from test_generative import _tree

    from cleantune.config import validate
    from cleantune.dispatch import run

    inject = {"name": "sft", "lora": {"r": 4, "alpha": 8, "target_modules": "all-linear"}}
    injected = run(validate(_tree(tiny_chat_llama, tmp_path, defense=inject), "test"))
    defense = {"name": "signature", "variants": 2, "variant_samples": 6, "verify_samples": 3, "workers": 2}
    defense |= {"cache": str(tmp_path / "cache")}
    defense |= {"fine_tune_samples": 4, "variant_train": {"epochs": 1, "batch_size": 4}}
    tree = _tree(tiny_chat_llama, tmp_path, scenario="poisoned-llm", name="purified", defense=defense)
    tree["model"]["spec"] = injected["product"]
    record = run(validate(tree, "test"))
    info = record["defense_info"]
    assert info["ratio"] == 0.35 and info["channels"] == round(0.35 * 128) and info["of_channels"] == 128
    assert record["product"].endswith("adapter") and record["metrics"]["asr"] is not None
    checks = info["variant_checks"]  # whether each variant's synthetic backdoor formed, and its twin's
    assert len(checks) == 2 and all(0 <= c["asr"] <= 100 and 0 <= c["clean_twin_asr"] <= 100 for c in checks)
    assert info["weak_variants"] == [i for i, c in enumerate(checks) if c["asr"] < 50]
    assert len(list((tmp_path / "cache").glob("*/variant-*/metrics.json"))) == 4  # 2 pairs, cached
    # Another τ, and the signature named explicitly as the same adapter's: the variant runs are reused.
    tree["name"], tree["defense"] = "purified-again", defense | {"ratio": 0.1, "signature_from": injected["product"]}
    again = run(validate(tree, "test"))
    assert again["defense_info"]["channels"] == 13 and again["defense_info"]["variant_s"] < info["variant_s"]
    assert again["defense_info"]["variant_cost_s"] == info["variant_cost_s"] > 0  # the cost of the cached runs
    assert len(list((tmp_path / "cache").glob("*/variant-*/metrics.json"))) == 4


def test_sanity_plans_edit_the_poisoned_update_as_table_1(tiny_chat_llama: Path) -> None:
    from cleantune.generative.sanity import PoisonedUpdate, run_sanity

    base = AutoModelForCausalLM.from_pretrained(tiny_chat_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_llama)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            layer.mlp.up_proj.weight += i + 1  # layer i's MLP update is the constant i + 1
            layer.self_attn.q_proj.weight += 10
    update = PoisonedUpdate(model, base)

    def measure() -> dict:
        pairs = list(zip(model.model.layers, base.model.layers, strict=True))

        def shift(get) -> list[int]:
            return [round(float((get(new) - get(old)).detach().mean())) for new, old in pairs]

        return {"mlp": shift(lambda x: x.mlp.up_proj.weight), "attn": shift(lambda x: x.self_attn.q_proj.weight)}

    seen = run_sanity(update, blocks=[1, 2, 1], seed=0, measure=measure)
    assert len(seen) == 3 + 2 * 2 + 2 + 1  # spans of 1 (two) and of 2 (one), each without MLP / both
    assert seen["poisoned update"] == {"mlp": [1, 2], "attn": [10, 10]}
    assert seen["without attention update"] == {"mlp": [1, 2], "attn": [0, 0]}
    assert seen["without MLP update"] == {"mlp": [0, 0], "attn": [10, 10]}
    assert seen["without MLP update, blocks 1-1"] == {"mlp": [1, 0], "attn": [10, 10]}
    assert seen["without MLP and attention update, blocks 0-0"] == {"mlp": [0, 2], "attn": [0, 10]}
    assert seen["without MLP update, blocks 0-1"] == {"mlp": [0, 0], "attn": [10, 10]}
    assert sorted(seen["MLP updates shuffled across blocks"]["mlp"]) == [1, 2]
    assert measure() == seen["poisoned update"]  # the model is left as it came
    # Resumed with two edits already measured: only the others are measured, each saved as it comes.
    done = dict(list(seen.items())[:2])
    saved: list[int] = []
    calls = []
    again = run_sanity(update, [1, 2], 0, lambda: calls.append(1) or measure(), done, lambda r: saved.append(len(r)))
    assert again == seen and list(again) == list(seen) and len(calls) == len(seen) - 2
    assert saved == list(range(3, len(seen) + 1))


def test_the_sanity_command_writes_table_1_for_an_adapter(tiny_chat_llama: Path, tmp_path: Path) -> None:
    import json

    from test_generative import _tree
    from typer.testing import CliRunner

    from cleantune.cli import app
    from cleantune.config import validate
    from cleantune.dispatch import run

    tree = _tree(tiny_chat_llama, tmp_path, defense={"name": "sft", "lora": {"r": 4, "target_modules": "all-linear"}})
    adapter = run(validate(tree, "test"))["product"]
    config = tmp_path / "gen.yaml"
    config.write_text(json.dumps(tree))
    result = CliRunner().invoke(
        app, ["analyze", "sanity", adapter, str(config), "--block", "1", "--block", "2", "--out", str(tmp_path / "s")]
    )
    assert result.exit_code == 0, result.output
    assert "without MLP update, blocks 0-1: asr" in result.output  # each edit shown as it is measured
    rows = json.loads((tmp_path / "s" / "sanity.json").read_text())["results"]
    assert len(rows) == 3 + 2 * 2 + 2 + 1 and all(0 <= r["asr"] <= 100 for r in rows)
    assert rows[0]["edit"] == "poisoned update" and rows[-1]["edit"] == "MLP updates shuffled across blocks"
    assert "| without MLP update |" in (tmp_path / "s" / "sanity.md").read_text()
    assert not (tmp_path / "s" / "sanity.partial.json").exists()  # whole: nothing left to resume


def test_an_interrupted_sanity_run_resumes_only_for_the_same_config(
    tiny_chat_llama: Path, tmp_path: Path, monkeypatch
) -> None:
    import json

    from test_generative import _tree
    from typer.testing import CliRunner

    import cleantune.generative.evaluation as evaluation
    from cleantune.cli import app
    from cleantune.config import validate
    from cleantune.dispatch import run

    tree = _tree(tiny_chat_llama, tmp_path, defense={"name": "sft", "lora": {"r": 4, "target_modules": "all-linear"}})
    adapter = run(validate(tree, "test"))["product"]
    config = tmp_path / "gen.yaml"
    config.write_text(json.dumps(tree))
    out = tmp_path / "s"
    measure, calls = evaluation.llm_metrics, []

    def interrupted_after_three(*args, **kwargs):
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return measure(*args, **kwargs)

    command = ["analyze", "sanity", adapter, str(config), "--out", str(out)]
    monkeypatch.setattr(evaluation, "llm_metrics", interrupted_after_three)
    assert CliRunner().invoke(app, command).exit_code == 130  # as a Ctrl-C ends it
    partial = (out / "sanity.partial.json").read_text()
    assert not (out / "sanity.json").exists() and len(json.loads(partial)["results"]) == 3

    calls.clear()
    monkeypatch.setattr(evaluation, "llm_metrics", lambda *a, **k: calls.append(1) or measure(*a, **k))
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "sanity.json").read_text())["results"]
    assert "3 edits already measured" in result.output and len(calls) == len(rows) - 3
    assert rows[0]["edit"] == "poisoned update" and not (out / "sanity.partial.json").exists()

    # Another seed is another config: a partial record from the first is not reused.
    (out / "sanity.partial.json").write_text(partial)
    calls.clear()
    result = CliRunner().invoke(app, [*command, "--set", "seed=7"])
    assert result.exit_code == 0, result.output
    assert "measuring every edit again" in result.output and len(calls) == len(rows)


def test_variants_draw_their_rows_from_the_variant_pool_when_given(tmp_path: Path, monkeypatch) -> None:
    import json

    from datasets import Dataset

    from cleantune.generative import signature_purification as sp
    from cleantune.generative.base import LLMContext

    pool = tmp_path / "alpaca.json"
    pool.write_text(json.dumps([{"instruction": f"alpaca task {i}", "input": "", "output": "ok"} for i in range(30)]))
    defender = Dataset.from_list([{"instruction": f"defender row {i}", "input": "", "output": "ok"} for i in range(30)])
    (tmp_path / "model").mkdir()
    seen = []

    def stop(trees, workers):
        seen.extend(trees)
        raise RuntimeError("stop before training")

    monkeypatch.setattr(sp, "run_variants", stop)
    cfg = sp.SignatureConfig(variants=2, variant_samples=5, variant_pool=[pool], cache=tmp_path / "cache")
    with pytest.raises(RuntimeError, match="stop before training"):
        sp.SignaturePurification(cfg)._deltas(LLMContext(defender, None, 32, True, 0, tmp_path / "model"))
    rows = json.loads((Path(seen[0]["data"]["data_dir"]) / "clean.json").read_text())
    assert len(rows) == 5 and all(r["instruction"].startswith("alpaca task") for r in rows)
