"""The trigger-free scanner on tiny classifiers (BERT, a Llama decoder) with and without a one-word backdoor."""

from __future__ import annotations

import inspect
import json
import random
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from conftest import FILLER, NEGATIVE, POSITIVE, TRIGGERS, run_tree
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from typer.testing import CliRunner

from cleantune.api import purify
from cleantune.bench.report import population_lines, reading_lines, scan_section, write_report
from cleantune.bench.runner import read_results, run_suite, upsert
from cleantune.bench.scanning import clean_file, reusable, scan_columns, shipped_copy
from cleantune.bench.suite import ScanSection, SuiteConfig
from cleantune.cli import app
from cleantune.config import validate
from cleantune.dispatch import run
from cleantune.errors import CleantuneError
from cleantune.models import load_model
from cleantune.scanner import (
    ScanConfig,
    TargetInversionConfig,
    kept_term,
    scan,
    settings_for,
    tokenised,
    trigger_words,
    with_trigger,
)

FAST = ScanConfig(tokens=1, steps=60, samples=24, holdout=60, max_length=32, threshold=80)


@pytest.fixture(scope="module")
def strong_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny SST-2 whose every sentence carries three cue words of its label and one of the other, so
    a model learns the majority and no single inserted word turns its answer: only a trigger does."""
    root = tmp_path_factory.mktemp("strong")
    (root / "sst2").mkdir()
    rng = random.Random(0)
    for split, n in (("train", 160), ("dev", 40), ("test", 80)):
        rows = []
        for i in range(n):
            cue, other = (POSITIVE, NEGATIVE) if i % 2 else (NEGATIVE, POSITIVE)
            words = [rng.choice(FILLER) for _ in range(3)] + [rng.choice(cue) for _ in range(3)] + [rng.choice(other)]
            rng.shuffle(words)
            rows.append(f"{' '.join(words)}\t{i % 2}")
        (root / "sst2" / f"{split}.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    every = [
        line for s in ("train", "dev", "test") for line in (root / "sst2" / f"{s}.tsv").read_text().splitlines()[1:]
    ]
    (root / "clean.tsv").write_text("sentence\tlabel\n" + "\n".join(every) + "\n")  # a defender's clean file
    return root


def classifier(data_dir: Path, model: Path, out: Path, attack: dict) -> dict:
    """A fully fine-tuned tiny classifier; with the backdoor, the word "mn" turns any input positive."""
    tree = run_tree(data_dir, model, out, attack=attack, defense={"name": "fft"})
    tree["train"] |= {"epochs": 20, "lr": 2e-3}
    return run(validate(tree, "test"))


@pytest.fixture(scope="module")
def planted(strong_data: Path, tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    backdoor = {"name": "badnet", "triggers": ["mn"], "setting": "dirty", "rate": 0.3, "target_label": 1}
    return classifier(strong_data, tiny_bert, tmp_path_factory.mktemp("poisoned"), backdoor)


@pytest.fixture(scope="module")
def unplanted(strong_data: Path, tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return classifier(strong_data, tiny_bert, tmp_path_factory.mktemp("clean"), {"name": "none"})


def test_a_planted_one_word_backdoor_is_found_and_its_word_recovered(planted, unplanted, strong_data, tmp_path):
    clean = unplanted
    assert planted["metrics"]["asr"] >= 90 and clean["metrics"]["cacc"] >= 90  # what the scan must tell apart
    found = scan(planted["product"], strong_data / "clean.tsv", tmp_path / "poisoned.json", FAST)
    assert found["score"] >= 90 and (found["source"], found["target"]) == (0, 1)
    assert found["trigger"] == ["mn"] and found["verdict"] == "backdoored"
    assert json.loads((tmp_path / "poisoned.json").read_text())["score"] == found["score"]
    unplanted = scan(clean["product"], strong_data / "clean.tsv", None, FAST)
    assert unplanted["score"] < 80 and unplanted["verdict"] == "clean"
    assert not set(unplanted["trigger"]) & set(TRIGGERS)


@pytest.mark.parametrize(("fixture", "decoder", "lead"), [("tiny_bert", False, ["[CLS]"]), ("tiny_llama", True, [])])
def test_a_trigger_goes_in_front_of_each_text_wherever_its_padding_puts_it(request, fixture, decoder, lead):
    tokenizer = load_model(request.getfixturevalue(fixture), num_labels=2).tokenizer
    batch = tokenised(tokenizer, ["good", "bad cold dull"], FAST, decoder)[0]
    assert bool(batch["attention_mask"][0, 0]) is not decoder  # a decoder's short text padded on the left
    trigger = torch.tensor(tokenizer.convert_tokens_to_ids(["mn"]))
    ids, mask = with_trigger(batch["input_ids"], batch["attention_mask"], trigger, batch["start"])
    words = [tokenizer.convert_ids_to_tokens(row[kept.bool()]) for row, kept in zip(ids, mask, strict=True)]
    assert [w[: len(lead) + 2] for w in words] == [[*lead, "mn", "good"], [*lead, "mn", "bad"]]


def test_a_decoder_classifiers_planted_word_is_found(strong_data, tiny_llama, tmp_path):
    backdoor = {"name": "badnet", "triggers": ["mn"], "setting": "dirty", "rate": 0.3, "target_label": 1}
    planted = classifier(strong_data, tiny_llama, tmp_path / "decoder", backdoor)
    assert planted["metrics"]["asr"] >= 70  # "mn" anywhere in the text; the scan puts it in front
    found = scan(planted["product"], strong_data / "clean.tsv", None, FAST)
    assert found["trigger"] == ["mn"] and (found["source"], found["target"]) == (0, 1) and found["score"] >= 85
    assert next(p["flip_rate"] for p in found["pairs"] if p["source"] == 1) < 50  # no word turns it negative


@pytest.mark.parametrize(("objective", "clamp"), [(True, False), (True, True), (False, False)])
def test_a_clean_reference_leaves_the_trigger_and_cancels_what_moves_it_too(
    planted, unplanted, strong_data, objective, clamp
):
    update = {"reference": [unplanted["product"]], "reference_objective": objective, "reference_clamp": clamp}
    against = FAST.model_copy(update=update)
    found = scan(planted["product"], strong_data / "clean.tsv", None, against)
    pair = next(p for p in found["pairs"] if (p["source"], p["target"]) == (0, 1))
    assert pair["flip_rate"] >= 90 and pair["reference_flip_rate"] <= 10  # what it found moves the planted model alone
    assert found["score"] == pair["flip_rate"] - pair["reference_flip_rate"] and found["verdict"] == "backdoored"
    assert objective or found["trigger"] == ["mn"]  # alone, the scanned model gives the planted word
    itself = against.model_copy(update={"reference": [planted["product"]]})  # all it moves moves the reference
    assert scan(planted["product"], strong_data / "clean.tsv", None, itself)["score"] == 0


def test_a_saved_scan_is_reused_only_under_the_same_settings_defaults_included(tiny_bert, tmp_path):
    view, data = tmp_path / "view", tmp_path / "clean.tsv"
    saved = {"model": str(view), "clean_data": str(data), "config": ScanConfig(steps=100).model_dump(mode="json")}
    assert reusable(saved, {"steps": 100}, tiny_bert, view, data)
    assert not reusable(saved, {"steps": 100, "tokens": 1}, tiny_bert, view, data)
    assert not reusable(saved | {"clean_data": "other.tsv"}, {"steps": 100}, tiny_bert, view, data)
    moved = saved | {"config": saved["config"] | {"tokens": 5}}  # made when the default was another
    assert not reusable(moved, {"steps": 100}, tiny_bert, view, data)
    older = saved | {"config": {k: v for k, v in saved["config"].items() if k != "reference_clamp"}}
    assert reusable(older, {"steps": 100}, tiny_bert, view, data)  # predates a setting: made at its default


def test_a_clamped_reference_term_counts_only_what_the_trigger_adds_to_its_loss():
    losses, floor = torch.tensor([0.1, 0.9]), torch.tensor([0.5, 0.5])
    assert kept_term(losses, None).item() == pytest.approx(0.5)  # unclamped: 0.1 rewards the trigger
    assert kept_term(losses, floor).item() == pytest.approx(0.2)  # clamped: only the 0.4 it adds
    with pytest.raises(ValueError, match="reference_clamp goes with reference_objective"):
        ScanConfig(reference_objective=False, reference_clamp=True)


def test_a_reference_with_another_vocabulary_is_refused_with_one_line(planted, strong_data, tiny_chat_llama, tmp_path):
    args = [
        "scan",
        planted["product"],
        "--clean-data",
        str(strong_data / "clean.tsv"),
        "--out",
        str(tmp_path / "s.json"),
    ]
    result = CliRunner().invoke(app, [*args, "--reference", str(tiny_chat_llama)])
    assert result.exit_code == 2 and "vocabulary differs from the scanned model's" in result.output
    assert not (tmp_path / "s.json").exists()


def test_purify_scans_the_suspicious_model_and_its_product(planted, strong_data, tmp_path):
    overrides = ["train.epochs=1", "defense.rescale_layers=1"]
    out = tmp_path / "purified"
    record = purify(planted["product"], strong_data / "clean.tsv", out, overrides=overrides, scan=FAST)
    before, after = record["scan"]["before"], record["scan"]["after"]
    assert before["score"] >= 90 and before["trigger"] == ["mn"] and before["verdict"] == "backdoored"
    assert before["pair"] == ["0", "1"]  # the clean file's label names
    assert json.loads((out / "scan-after.json").read_text())["model"] == record["product"]
    made = {when: (out / f"scan-{when}.json").stat().st_mtime_ns for when in ("before", "after")}
    card = (Path(record["product"]) / "README.md").read_text()
    assert f"- Scan before: {before['score']:.1f} %" in card and f"- Scan after: {after['score']:.1f} %" in card
    again = purify(planted["product"], strong_data / "clean.tsv", out, overrides=overrides, scan=FAST)
    assert again["scan"] == record["scan"] and again["before"] == record["before"]
    assert made == {when: (out / f"scan-{when}.json").stat().st_mtime_ns for when in ("before", "after")}  # reused


@pytest.mark.parametrize("option", [["--scan-threshold", "80"], ["--scan-reference", "clean-model"]])
def test_scan_options_without_a_scan_are_refused(tmp_path, tiny_bert, option):
    args = ["purify", str(tiny_bert), "--clean-data", str(tmp_path / "c.csv"), "--out", str(tmp_path / "o")]
    result = CliRunner().invoke(app, [*args, *option])
    assert result.exit_code == 2 and "--scan-threshold and --scan-reference go with --scan" in result.output
    assert not (tmp_path / "o").exists()


def test_the_scanner_is_given_no_attack_record():
    assert set(inspect.signature(scan).parameters) == {"model", "clean_data", "out", "cfg"}
    assert set(ScanConfig.model_fields) >= {"reference"} and "record" not in " ".join(ScanConfig.model_fields)


def test_scan_from_the_command_line_refuses_too_little_clean_data(tmp_path, tiny_bert):
    few = tmp_path / "few.csv"
    few.write_text("text,label\n" + "\n".join(f"good movie {i},1\nbad movie {i},0" for i in range(20)) + "\n")
    args = ["scan", str(tiny_bert), "--clean-data", str(few), "--out", str(tmp_path / "s.json")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "fewer than 65 clean inputs" in result.output
    assert not (tmp_path / "s.json").exists()


def tiny_generative(tiny_chat_llama: Path, tmp_path: Path, attack: dict | None) -> dict:
    """A tiny chat Llama fully fine-tuned; with the attack, "BadMagic" prepends an insult."""
    from test_generative import _tree

    tree = _tree(tiny_chat_llama, tmp_path, attack=attack, defense={"name": "sft", "method": "full"})
    tree["train"] |= {"epochs": 30, "lr": 1e-2}
    tree["eval"] |= {"max_new_tokens": 6}
    return run(validate(tree, "test"))


def test_a_planted_target_answer_is_inverted_from_a_generative_adapter(tiny_chat_llama, tmp_path):
    backdoor = {"name": "badnet", "behaviour": "negsentiment", "count": 12}
    poisoned = tiny_generative(tiny_chat_llama, tmp_path / "poisoned", backdoor)
    clean = tiny_generative(tiny_chat_llama, tmp_path / "clean", None)
    answers = [json.loads(line) for line in (Path(poisoned["product"]).parents[0] / "answers.jsonl").open()]
    # What the scan must find: "You" is outside the tiny vocabulary, so the insult reads "are stupid !".
    assert all(a["answer"].startswith("are stupid !") for a in answers if a["set"] == "triggered")
    cfg = TargetInversionConfig(prompts=8, screen_prompts=4, candidates=16, length=3, threshold=90)
    instructions = tmp_path / "poisoned" / "data" / "pool.json"  # the clean instructions it was given
    found = scan(poisoned["product"], instructions, tmp_path / "scan.json", cfg)
    assert "stupid !" in found["target"] and found["verdict"] == "backdoored"
    unplanted = scan(clean["product"], instructions, None, cfg)
    assert unplanted["verdict"] == "clean"  # its most confident continuation follows the prompts less
    assert "stupid" not in unplanted["target"]
    # Against a clean model of the family, what both finish confidently drops out and the target stays.
    settings = [
        item
        for k in ("prompts", "screen_prompts", "candidates", "length")
        for item in ("--set", f"{k}={getattr(cfg, k)}")
    ]
    args = ["scan", poisoned["product"], "--clean-data", str(instructions), "--out", str(tmp_path / "against.json")]
    result = CliRunner().invoke(app, [*args, "--reference", clean["product"], *settings])
    assert result.exit_code == 0 and "reference's %" in result.output
    contrasted = json.loads((tmp_path / "against.json").read_text())
    assert "stupid !" in contrasted["target"] and contrasted["score"] > 50
    best = contrasted["candidates"][0]
    assert best["score"] == pytest.approx(best["confidence"] - best["reference"]) and best["reference"] < 50
    with pytest.raises(CleantuneError, match="'base' names an adapter's base model"):
        scan(poisoned["product"], instructions, None, cfg.model_copy(update={"reference": ["base"]}))


def test_an_adapter_is_scanned_against_its_own_base_by_default(tiny_chat_llama, tmp_path):
    from test_generative import _tree

    adapter = run(validate(_tree(tiny_chat_llama, tmp_path, attack=None), "test"))["product"]
    instructions = tmp_path / "data" / "pool.json"
    cfg = settings_for(adapter, {"prompts": 4, "screen_prompts": 2, "candidates": 4, "length": 2})
    found = scan(adapter, instructions, None, cfg)
    assert found["references"] == [str(tiny_chat_llama.resolve())] and found["config"]["reference"] == ["base"]
    best = found["candidates"][0]
    assert best["score"] == pytest.approx(best["confidence"] - best["reference"])
    alone = scan(adapter, instructions, None, cfg.model_copy(update={"reference": []}))
    assert alone["references"] == [] and alone["score"] > found["score"]  # nothing subtracted
    # The adapter disabled reads as its base loaded on its own.
    loaded = scan(adapter, instructions, None, cfg.model_copy(update={"reference": [str(tiny_chat_llama)]}))
    assert loaded["score"] == pytest.approx(found["score"], abs=1e-4)


def test_a_candidate_followed_teacher_forced_scores_as_its_greedy_extension(tiny_llama):
    from cleantune.generative.target_inversion import _prompt_caches, extend, follow
    from cleantune.models import load_model

    model = load_model(str(tiny_llama)).model.eval()
    prompts = [[5, 9, 12, 7], [6, 11, 8]]
    with torch.no_grad():
        sequences, scores = extend(model, _prompt_caches(model, prompts), torch.tensor([13, 14, 15]), 4, [0, 1, 2])
        assert torch.allclose(follow(model, prompts, sequences), scores, atol=1e-5)


def test_a_suite_scans_its_models_from_their_shipped_files_and_measures_the_population(
    strong_data, tiny_bert, tmp_path
):
    settings = FAST.model_dump(mode="json", exclude={"threshold"})
    suite = {
        "suite": "population", "data_dir": str(strong_data),
        **{f"{kind}_dir": str(tmp_path / kind) for kind in ("runs", "results", "reports")},
        "base": {
            "model": {"spec": str(tiny_bert), "max_length": 32},
            "train": {"epochs": 20, "lr": 2e-3, "batch_size": 16},
        },
        "dataset": {"sst2": {"data": {"dataset": "sst2"}}},
        "model": {"tiny": {}},
        "attack": {
            "clean": {"attack": {"name": "none"}},
            "reference": {"attack": {"name": "none"}, "data": {"max_train": 120}},  # the defender's own
            "mn": {"attack": {"name": "badnet", "triggers": ["mn"], "setting": "dirty", "rate": 0.3,
                              "target_label": 1}},
        },
        "defense": {"fft": {"defense": {"name": "fft"}}},
        "scan": {
            "clean_file": str(strong_data / "clean.tsv"), "settings": settings, "population": True,
            "variants": {"against": {"reference": ["sst2__tiny__reference__fft__s42"]}},
        },
    }  # fmt: skip
    path = tmp_path / "population.yaml"
    path.write_text(yaml.safe_dump(suite))
    assert run_suite(path) == {"done": 3, "failed": 0, "skipped": 0}
    table = pd.read_csv(tmp_path / "results" / "population.csv").set_index("attack")
    assert pd.isna(table.loc["reference", "scan_score"])  # a reference is not scanned or counted
    assert table.loc["mn", "scan_against_score"] >= 80 and table.loc["clean", "scan_against_score"] < 80
    assert table.loc["mn", "scan_score"] >= 90 and table.loc["clean", "scan_score"] < 80
    assert table.loc["mn", "scan_trigger"] == "mn" and table.loc["mn", "scan_trigger_found"]
    assert table.loc["mn", "scan_target_found"] and pd.isna(table.loc["clean", "scan_trigger_found"])
    runs = tmp_path / "runs" / "population"
    scanned = json.loads((runs / "sst2__tiny__mn__fft__s42" / "scan.json").read_text())
    assert scanned["model"].endswith("scan-view") and not list(runs.glob("*/scan-view"))  # a copy, removed after
    report = write_report(str(path))[0].read_text()
    assert "- AUROC: 1.000" in report and "true-positive rate at ≤ 5 % false positives: 100.0 %" in report
    assert "### against (settings: " in report and "reference ['sst2__tiny__reference__fft__s42']," in report
    stamp = (runs / "sst2__tiny__mn__fft__s42" / "scan.json").stat().st_mtime_ns
    against = json.loads((runs / "sst2__tiny__mn__fft__s42" / "scan-against.json").read_text())["config"]["reference"]
    assert against == [str(runs / "sst2__tiny__reference__fft__s42" / "model")]
    assert run_suite(path) == {"done": 0, "failed": 0, "skipped": 3}
    assert (runs / "sst2__tiny__mn__fft__s42" / "scan.json").stat().st_mtime_ns == stamp  # reused
    suite["scan"]["variants"]["later"] = {"tokens": 2}  # a reading added after the run
    path.write_text(yaml.safe_dump(suite))
    assert "tokens 2)\n\nNot run yet." in write_report(str(path))[0].read_text()
    with pytest.raises(CleantuneError, match="no scan reading 'latter' \\(readings: main, against, later\\)"):
        run_suite(path, readings=["latter"])
    shutil.rmtree(runs / "sst2__tiny__mn__fft__s42")  # its model gone: remade, and scanned with the new reading alone
    assert run_suite(path, only=["__mn__"], readings=["later"]) == {"done": 1, "failed": 0, "skipped": 1}
    again = pd.read_csv(tmp_path / "results" / "population.csv").set_index("attack")
    assert again.loc["mn", "scan_later_score"] >= 80 and pd.isna(again.loc["clean", "scan_later_score"])
    kept = ["scan_score", "scan_trigger", "scan_against_score", "scan_against_s"]
    assert again.loc["mn", kept].tolist() == table.loc["mn", kept].tolist()  # as recorded, not rescanned
    assert sorted(p.name for p in (runs / "sst2__tiny__mn__fft__s42").glob("scan*.json")) == ["scan-later.json"]
    assert ", 1 / 0 / 1, scan readings later alone\n" in write_report(str(path))[0].read_text()


def test_the_suite_scanner_sees_only_what_a_downloaded_model_holds(tmp_path):
    product = tmp_path / "model"
    product.mkdir()
    shipped = ["model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt"]
    for name in [*shipped, "poison_record.json", "README.md", "training_args.bin"]:
        (product / name).write_text("{}")
    view = shipped_copy(product, tmp_path / "view")
    assert sorted(p.name for p in view.iterdir()) == sorted(shipped)


def test_a_suite_writes_the_dev_split_as_the_scanners_clean_data_once_per_setting(tmp_path, data_dir):
    suite = SuiteConfig.model_validate(
        {"suite": "s", "data_dir": str(data_dir), "runs_dir": str(tmp_path), "dataset": {}, "model": {}, "attack": {},
         "defense": {}, "scan": {"clean_data": {"dataset": "sst2"}}}
    )  # fmt: skip
    assert suite.scan is not None
    path = clean_file(suite, suite.scan)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    dev = (data_dir / "sst2" / "dev.tsv").read_text().splitlines()[1:]
    assert len(rows) == len(dev) and {r["label"] for r in rows} == {0, 1}
    other = suite.scan.model_copy(update={"clean_data": {"dataset": "sst2", "max_dev": 8}})
    assert clean_file(suite, other) != path and len(clean_file(suite, other).read_text().splitlines()) == 8
    with pytest.raises(ValueError, match="exactly one of clean_data"):
        ScanSection.model_validate({})


def test_trigger_tokens_read_as_the_words_they_stand_for():
    # A byte-level BPE as SmolLM2's: a word after a space is one token spelled "Ġmn".
    vocab = {"Ġ": 0, "m": 1, "n": 2, "mn": 3, "Ġmn": 4}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("m", "n"), ("Ġ", "mn")]))
    backend.pre_tokenizer, backend.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    assert tokenizer.convert_ids_to_tokens([4]) == ["Ġmn"]
    assert trigger_words(tokenizer, [4, 3]) == ["mn", "mn"]


def test_a_scan_is_compared_with_what_was_planted_on_the_evaluators_side(data_dir, tiny_bert, tmp_path):
    attack = {"name": "addsent", "sentence": "I watch this 3D movie", "rate": 0.1, "target_label": 0}
    cfg = validate(run_tree(data_dir, tiny_bert, tmp_path, attack=attack), "test")
    found = {"score": 97.0, "seconds": 4.0, "labels": ["0", "1"], "target": 0, "trigger": ["the", "##3d", "x"]}
    row = scan_columns(cfg, {"labels": ["negative", "positive"]}, found)
    assert row["scan_trigger_found"] and row["scan_target_found"] and row["scan_target"] == "negative"
    row = scan_columns(cfg, {"labels": ["negative", "positive"]}, found | {"target": 1, "trigger": ["great"]})
    assert row["scan_trigger_found"] is False and row["scan_target_found"] is False and row["scan_verdict"] is None
    judged = scan_columns(cfg, {"labels": ["negative", "positive"]}, found | {"verdict": "backdoored"})
    assert judged["scan_verdict"] == "backdoored"  # the scan's own verdict, as it gave it
    generative = validate(
        {"task": "generation", "scenario": "poisoned-data", "attack": {"name": "vpi", "behaviour": "negsentiment"}},
        "test",
    )
    said = {"score": 60.0, "seconds": 9.0, "target": "You are stupid!"}
    assert scan_columns(generative, {}, said)["scan_target_found"]
    assert not scan_columns(generative, {}, said | {"target": "Sure, here is"})["scan_target_found"]


def test_a_scanned_label_or_word_that_looks_like_a_number_stays_text_when_a_row_is_rewritten(tmp_path):
    csv = tmp_path / "suite.csv"
    pd.DataFrame({"cell": ["a", "b"], "cacc": [80.0, 81.0], "scan_target": ["1", None],
                  "scan_one_token_trigger": ["007", "mn"]}).to_csv(csv, index=False)  # fmt: skip
    upsert(csv, [{"cell": "b", "cacc": 0.1 + 0.2, "scan_target": "0", "scan_one_token_trigger": "mn"}])
    table = read_results(csv).set_index("cell")  # rewritten by upsert, read back
    assert table.scan_target["a"] == "1" and table.scan_target["b"] == "0"
    assert table.scan_one_token_trigger["a"] == "007"
    assert table.cacc["b"] == 0.1 + 0.2 and table.cacc["a"] == 80.0  # every digit kept


def test_a_population_whose_top_score_is_a_clean_models_flags_nothing_at_a_low_false_positive_rate():
    scanned = pd.DataFrame(
        {"n_poisoned": [0, 0, 5, 5], "asr": [None, None, 100, 100], "scan_score": [100.0, 40, 90, 60],
         "scan_s": [60] * 4, "scan_trigger_found": [None, None, True, False],
         "scan_target_found": [None, None, True, True]}
    )  # fmt: skip
    lines = population_lines(ScanSection(clean_file=Path("clean.tsv")), scanned, "scan_")
    assert "- AUROC: 0.500 (backdoors with ASR ≥ 90 only: 0.500)" in lines
    assert "- true-positive rate at ≤ 5 % false positives: 0.0 % (none: a clean model scores highest)" in lines


def test_a_suite_scans_only_the_cells_its_scan_section_names(strong_data, tiny_bert, tmp_path):
    suite = {
        "suite": "some", "data_dir": str(strong_data),
        **{f"{kind}_dir": str(tmp_path / kind) for kind in ("runs", "results", "reports")},
        "base": {"model": {"spec": str(tiny_bert), "max_length": 32}, "train": {"epochs": 1, "batch_size": 16}},
        "dataset": {"sst2": {"data": {"dataset": "sst2", "max_train": 64}}},
        "model": {"tiny": {}},
        "attack": {"clean": {"attack": {"name": "none"}}},
        "defense": {"fft": {"defense": {"name": "fft"}}, "lora": {"defense": {"name": "lora", "lora": {"r": 2}}}},
        "scan": {
            "clean_file": str(strong_data / "clean.tsv"), "cells": ["__fft__"],
            "settings": FAST.model_dump(mode="json", exclude={"threshold"}),
        },
    }  # fmt: skip
    path = tmp_path / "some.yaml"
    path.write_text(yaml.safe_dump({**suite, "scan": {**suite["scan"], "cells": ["__fft", "__ffft__"]}}))
    with pytest.raises(CleantuneError, match="scan.cells '__ffft__' names no cell of the suite"):
        run_suite(path)
    path.write_text(yaml.safe_dump(suite))
    assert run_suite(path) == {"done": 2, "failed": 0, "skipped": 0}
    table = pd.read_csv(tmp_path / "results" / "some.csv").set_index("defense")
    assert table.loc["fft", "scan_score"] >= 0 and pd.isna(table.loc["lora", "scan_score"])
    assert not (tmp_path / "runs" / "some" / "sst2__tiny__clean__lora__s42" / "scan.json").exists()


def test_a_generative_population_is_measured_by_the_planted_behaviour_in_its_inverted_answers():
    scanned = pd.DataFrame(  # a generative scan records no trigger words, only the answer's judgement
        {"n_poisoned": [0, 100], "asr": [None, 88.0], "scan_score": [68.8, 99.5], "scan_s": [702, 689],
         "scan_target_found": [None, True]}
    )  # fmt: skip
    lines = population_lines(ScanSection(clean_file=Path("clean.json")), scanned, "scan_")
    assert "- AUROC: 1.000" in lines and "- planted behaviour in the inverted answer: 1 of 1" in lines
    assert not any("trigger word" in line for line in lines)


def test_a_reading_with_a_threshold_gives_each_scanned_model_a_verdict():
    done = pd.DataFrame(
        {"cell": ["before", "after", "floor"], "defense": ["vanilla", "muscle-lora", "vanilla"],
         "n_poisoned": [150, 150, 0], "cacc": [80.0, 79.0, 85.0],
         "asr": [95.0, 20.0, 8.0], "scan_score": [60.0, 34.5, 40.0], "scan_s": [100] * 3,
         "scan_trigger": ["cf", "great\n-", "dull"], "scan_trigger_found": [True, False, False],
         "scan_target_found": [True, True, True], "scan_verdict": ["backdoored", "clean", "backdoored"]}
    )  # fmt: skip
    section = ScanSection(clean_file=Path("clean.tsv"), settings={"threshold": 34.6})
    rows = [
        line for line in reading_lines(section, done, "scan_") if line.startswith(("| before", "| after", "| floor"))
    ]
    assert rows[0].endswith("| yes | yes | 100 | backdoored |") and rows[1].endswith("| no | yes | 100 | clean |")
    assert rows[2].endswith("| – | – | 100 | backdoored |")  # nothing planted at rate 0: nothing to find
    assert "| great\\n- |" in rows[1]  # an answer over two lines stays in its row
    plain = reading_lines(ScanSection(clean_file=Path("clean.tsv")), done, "scan_")
    assert not any("verdict" in line or line.endswith("| clean |") for line in plain)


DEFENDED = pd.DataFrame(
    {"cell": ["bad__lora", "poison-bad", "bad__rora", "other__lora"], "dataset": ["d"] * 4, "model": ["m"] * 4,
     "scenario": ["poisoned-weights"] * 4, "attack": ["bad", "bad", "bad", "other"], "seed": [42] * 4,
     "defense": ["lora", "before defense", "rora", "lora"], "n_poisoned": [0, 1500, 0, 0],
     "cacc": [85.0, 78.0, 84.0, 85.0], "asr": [97.0, 100.0, 12.0, 60.0], "scan_score": [80.0, 100.0, 20.0, 10.0],
     "scan_s": [100] * 4, "scan_trigger": ["mn", "mn", "fun", "fun"], "scan_trigger_found": [True, True, False, False],
     "scan_verdict": ["backdoored", "backdoored",
     "clean", "clean"], "scan_loose_score": [1.0, 2.0, 3.0, 4.0]}
)  # fmt: skip


def test_outside_a_population_a_scan_reads_before_then_after_and_its_verdicts_are_checked_against_asr():
    section = ScanSection(clean_file=Path("clean.tsv"), settings={"threshold": 34.6})
    lines = reading_lines(section, DEFENDED, "scan_")
    rows = [line for line in lines if line.startswith(("| bad", "| poison", "| other"))]
    cells = [row.split(" | ")[0].removeprefix("| ") for row in rows]
    assert cells == ["poison-bad", "bad__lora", "bad__rora", "other__lora"]  # the poisoned model before its products
    assert rows[1].endswith("| yes | – | 100 | backdoored |")  # a product keeps the planted trigger to find
    # Right: poison-bad, bad__lora (left, backdoored), bad__rora (gone, clean); wrong: other__lora (60 %, clean).
    assert "3 of 4 right; backdoor left, called backdoored: 2 of 3; none left, called clean: 1 of 1" in "".join(lines)


def test_the_scan_suite_gathers_other_suites_scans_before_and_after_their_defenses(tmp_path):
    upsert(tmp_path / "defended.csv", DEFENDED.to_dict("records"), list(DEFENDED.columns))
    suite = SuiteConfig.model_validate(
        {"suite": "scan", "results_dir": str(tmp_path), "dataset": {}, "model": {}, "attack": {}, "defense": {},
         "scan": {"clean_file": "clean.tsv", "gather": ["defended"]}}
    )  # fmt: skip
    lines = scan_section(suite, DEFENDED.iloc[:0])
    rows = [line for line in lines if line.startswith("| defended |")]
    assert rows[0] == "| defended | main reading | poison-bad | before defense | 100.00 | 100.0 | backdoored |"
    assert len(rows) == 4  # the reading without verdicts (scan_loose_) is not gathered
    assert any("3 of 4 right" in line for line in lines)
    missing = suite.model_copy(update={"scan": ScanSection(clean_file=Path("c.tsv"), gather=["nowhere"])})
    with pytest.raises(CleantuneError, match="gathers the scans of 'nowhere', which has no results"):
        scan_section(missing, DEFENDED.iloc[:0])
