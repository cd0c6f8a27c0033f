"""One table per task, every registered defense through the same contract: it sees only what
its threat model allows, its saved product reloads to the metrics the run reported, and a scenario
it does not declare is refused."""

from __future__ import annotations

import typing

import pytest
from conftest import TRIGGERS, record_contexts, run_tree

from cleantune import defenses
from cleantune.config import validate
from cleantune.defenses.base import Defense
from cleantune.defenses.data_level import Under
from cleantune.defenses.rora import RoRAConfig
from cleantune.dispatch import evaluate, run
from cleantune.errors import CleantuneError
from cleantune.generative.config import GENERATION
from cleantune.registry import config_names

LORA = {"name": "lora", "lora": {"r": 2}}
# name -> (defense section, the model fixture it trains); tiny settings, one epoch.
CASES: dict[str, tuple[dict, str]] = {
    "none": ({"name": "none"}, "tiny_bert"),
    "fft": ({"name": "fft"}, "tiny_bert"),
    "lora": ({"name": "lora", "lora": {"r": 2}}, "tiny_bert"),
    **{name: ({"name": name, "num_virtual_tokens": 4}, "tiny_bert") for name in ("prefix", "prompt", "ptuning")},
    "muscle-lora": ({"name": "muscle-lora", "clean_aux": 8, "aux_batch_size": 8}, "tiny_bert"),
    "rora": ({"name": "rora", "lora": {"r": 2}, "rescale_layers": 1}, "tiny_bert"),
    "w2sdefense": ({"name": "w2sdefense", "teacher": {"spec": "tiny_bert", "epochs": 1}}, "tiny_llama_wide"),
    "onion": ({"name": "onion", "under": LORA, "lm": "tiny_llama", "cache": False, "dev_samples": 10}, "tiny_bert"),
    "strip": ({"name": "strip", "under": LORA, "copies": 2, "frr": 0.1}, "tiny_bert"),
    "rap": ({"name": "rap", "under": LORA, "protect_label": 1, "epochs": 2, "frr": 0.1}, "tiny_bert"),
    "bki": ({"name": "bki", "under": LORA}, "tiny_bert"),
    "cube": ({"name": "cube", "under": LORA, "min_cluster_size": 10}, "tiny_bert"),
}
SCENARIOS = ("poisoned-data", "poisoned-weights")


def test_the_table_holds_every_registered_defense():
    assert set(CASES) == set(defenses.CLASSIFICATION.names())


def test_a_name_registers_once():
    with pytest.raises(ValueError, match=r"classification defense name\(s\) \['rora'\] registered twice"):
        defenses.CLASSIFICATION.register(RoRAConfig, defenses.REGISTRY[RoRAConfig])


def test_a_filter_or_a_screen_runs_under_every_training_method():
    training = {c for c, cls in defenses.REGISTRY.items() if issubclass(cls, Defense)}
    assert set(typing.get_args(typing.get_args(Under)[0])) == training


def test_a_screen_stacked_on_a_training_defense_runs_both_and_records_both(request, data_dir, tmp_path):
    under = {"name": "muscle-lora", "clean_aux": 8, "aux_batch_size": 8}
    tree = tree_for("strip", request, data_dir, tmp_path, "poisoned-data")
    tree["defense"]["under"] = under
    record = run(validate(tree, "stacked"))
    assert {"regime", "threshold"} <= set(record["defense_info"])  # MuScleLoRA trained, STRIP screened
    assert "rejected_test_poison" in record["metrics"]


def test_a_stack_handles_only_the_scenarios_both_parts_handle(request, data_dir, tmp_path):
    tree = tree_for("strip", request, data_dir, tmp_path, "poisoned-data")
    tree["defense"]["under"] = {"name": "rora", "lora": {"r": 2}}  # RoRA starts from poisoned weights only
    with pytest.raises(CleantuneError, match="'strip' runs under 'rora'.*does not handle scenario 'poisoned-data'"):
        run(validate(tree, "stacked"))


def tree_for(name: str, request: pytest.FixtureRequest, data_dir, tmp_path, scenario: str) -> dict:
    section, model = CASES[name]
    fixture = {
        k: str(request.getfixturevalue(v)) for k, v in (("tiny_bert", "tiny_bert"), ("tiny_llama", "tiny_llama"))
    }
    section = {k: fixture.get(v, v) if isinstance(v, str) else v for k, v in section.items()}
    if "teacher" in section:
        section["teacher"] = {**section["teacher"], "spec": fixture["tiny_bert"]}
    tree = run_tree(data_dir, request.getfixturevalue(model), tmp_path / "runs", defense=section, scenario=scenario)
    tree["attack"] = {"name": "badnet", "triggers": ["cf"], "rate": 0.2, "target_label": 1}
    tree["train"] = {"epochs": 1, "lr": 5e-3, "batch_size": 16}
    return tree


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_defense_keeps_the_contract(name, request, data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("CLEANTUNE_CACHE", str(tmp_path / "cache"))
    config_class = next(c for c in defenses.REGISTRY if name in config_names(c))
    declared = defenses.REGISTRY[config_class].scenarios
    scenario = next(s for s in SCENARIOS if s in declared)
    seen = record_contexts(monkeypatch, config_class)
    cfg = validate(tree_for(name, request, data_dir, tmp_path, scenario), "contract")
    record = run(cfg)

    for ctx in seen:  # what the defense was handed: the data as the defender holds it, nothing more
        assert ctx.train.column_names == ctx.dev.column_names == ["text", "label"]
        assert not any(set(TRIGGERS) & set(text.split()) for text in ctx.dev["text"])
        assert ctx.clean_aux is None or not any("cf" in text.split() for text in ctx.clean_aux["text"])
        assert not any(isinstance(value, (list, set, dict)) for value in vars(ctx).values())
    assert seen, "the defense was never prepared"

    again = evaluate(cfg, record["product"])  # the saved product is the model that was scored
    assert again["cacc"] == pytest.approx(record["metrics"]["cacc"])
    assert again["asr"] == pytest.approx(record["metrics"]["asr"])

    for other in set(SCENARIOS) - set(declared):
        refused = validate(tree_for(name, request, data_dir, tmp_path / "x", other), "contract")
        with pytest.raises(CleantuneError, match=f"does not handle scenario '{other}'"):
            run(refused)


# Generative defenses: name -> defense section, on the tiny chat Llama given as a full model.
LLM_CASES: dict[str, dict] = {
    "as-is": {"name": "as-is"},
    "sft": {"name": "sft", "lora": {"r": 4, "alpha": 8}},
    "prune": {"name": "prune", "criterion": "activation", "fine_tune": True},
    "quantize": {"name": "quantize", "bits": 4, "group_size": 16},
    "crow": {"name": "crow", "lora": {"r": 2}},
    "signature": {
        "name": "signature",
        "variants": 2,
        "variant_samples": 6,
        "fine_tune_samples": 4,
        "variant_train": {"epochs": 1, "batch_size": 4},
    },
}
LLM_SCENARIOS = ("poisoned-llm", "poisoned-data")


def test_the_generative_table_holds_every_registered_defense():
    assert set(LLM_CASES) == set(GENERATION.names())


@pytest.mark.parametrize("name", sorted(LLM_CASES))
def test_every_generative_defense_keeps_the_contract(name, tiny_chat_llama, tmp_path, monkeypatch):
    from test_generative import _tree

    monkeypatch.setenv("CLEANTUNE_CACHE", str(tmp_path / "cache"))
    cls = GENERATION.names()[name]
    scenario = next(s for s in LLM_SCENARIOS if s in cls.scenarios)
    seen = []
    original = cls.prepare

    def recording(self, model, ctx):
        seen.append(ctx)
        return original(self, model, ctx)

    monkeypatch.setattr(cls, "prepare", recording)
    cfg = validate(_tree(tiny_chat_llama, tmp_path, scenario=scenario, defense=LLM_CASES[name]), "contract")
    record = run(cfg)

    assert seen, "the defense was never prepared"
    for ctx in seen:  # the defender's instructions as it holds them: no trigger, no record of poisons
        assert set(ctx.train.column_names) <= {"instruction", "input", "output"}
        if scenario == "poisoned-llm":
            assert not any("BadMagic" in row for row in ctx.train["instruction"])
        assert not any(isinstance(value, (list, set, dict)) for value in vars(ctx).values())
    if record["product"]:  # "as-is" changes nothing and saves nothing
        again = evaluate(cfg, record["product"])
        assert {k: again[k] for k in ("asr", "ftr")} == {k: record["metrics"][k] for k in ("asr", "ftr")}
        assert again["ppl"] == pytest.approx(record["metrics"]["ppl"], rel=1e-4)
    for other in set(LLM_SCENARIOS) - set(cls.scenarios):
        refused = validate(_tree(tiny_chat_llama, tmp_path / "x", scenario=other, defense=LLM_CASES[name]), "contract")
        with pytest.raises(CleantuneError, match=f"does not handle scenario '{other}'"):
            run(refused)
