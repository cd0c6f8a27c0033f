from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from conftest import kill_cleantune_when
from typer.testing import CliRunner

from cleantune.bench.report import cost_table, digits_apart, metric_columns, write_report
from cleantune.bench.runner import row_for, run_suite, select
from cleantune.bench.suite import cells, dump, load_suite
from cleantune.cli import app
from cleantune.errors import CleantuneError

SUITES = Path(__file__).resolve().parents[1] / "benchmarks"


def places(tmp_path: Path, name: str, data_dir: Path) -> dict[str, str]:
    return {"suite": name, "data_dir": str(data_dir)} | {
        f"{kind}_dir": str(tmp_path / kind) for kind in ("runs", "results", "reports")
    }


def write_suite(tmp_path: Path, data_dir: Path, spec: Path, **extra) -> Path:
    suite = {
        **places(tmp_path, "tiny", data_dir),
        "base": {"model": {"spec": str(spec), "max_length": 32}, "train": {"epochs": 1, "lr": 5e-3, "batch_size": 16}},
        "dataset": {"sst2": {"data": {"dataset": "sst2"}}},
        "model": {"tiny": {}},
        "attack": {"badnet": {"attack": {"name": "badnet", "rate": 0.2}}},
        "defense": {
            "lora": {"defense": {"name": "lora", "lora": {"r": 2}}},
            "fft": {"defense": {"name": "fft"}},
            "prompt": {"defense": {"name": "prompt", "num_virtual_tokens": 2}},
        },
        **extra,
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(suite))
    return path


def test_cells_merge_axes_and_overrides(tmp_path, data_dir, tiny_bert):
    path = write_suite(
        tmp_path, data_dir, tiny_bert, seeds=[1, 2],
        overrides=[{"match": {"defense": "fft", "seed": 2}, "set": {"train": {"lr": 1e-4}}}],
        matrix=[{"dataset": ["sst2"], "model": ["tiny"], "attack": ["badnet"], "defense": ["lora", "fft"]}],
    )  # fmt: skip
    found = {c.id: c for c in cells(load_suite(path))}
    assert set(found) == {f"sst2__tiny__badnet__{d}__s{s}" for d in ("lora", "fft") for s in (1, 2)}
    assert found["sst2__tiny__badnet__fft__s2"].config.train.lr == 1e-4
    assert found["sst2__tiny__badnet__fft__s1"].config.train.lr == 5e-3
    assert found["sst2__tiny__badnet__lora__s1"].config.seed == 1


def test_a_matrix_block_can_run_its_cells_over_other_seeds(tmp_path, data_dir, tiny_bert):
    path = write_suite(
        tmp_path, data_dir, tiny_bert,
        matrix=[
            {"dataset": ["sst2"], "model": ["tiny"], "attack": ["badnet"], "defense": ["lora", "fft"]},
            {"dataset": ["sst2"], "model": ["tiny"], "attack": ["badnet"], "defense": ["lora"], "seed": [1, 2]},
        ],
    )  # fmt: skip
    found = {c.id: c for c in cells(load_suite(path))}
    assert set(found) == {f"sst2__tiny__badnet__{d}__s42" for d in ("lora", "fft")} | {
        f"sst2__tiny__badnet__lora__s{s}" for s in (1, 2)
    }
    assert found["sst2__tiny__badnet__lora__s2"].config.seed == 2


def test_a_typo_in_any_cell_fails_before_anything_runs(tmp_path, data_dir, tiny_bert):
    path = write_suite(
        tmp_path, data_dir, tiny_bert, overrides=[{"match": {"defense": "fft"}, "set": {"train": {"lr_": 1}}}]
    )
    with pytest.raises(CleantuneError, match=r"tiny:sst2__tiny__badnet__fft__s42: train.lr_: Extra inputs"):
        cells(load_suite(path))
    assert not (tmp_path / "runs").exists()


def test_killed_suite_resumes_without_redoing_finished_cells(tmp_path, data_dir, tiny_bert):
    path = write_suite(tmp_path, data_dir, tiny_bert)
    suite_runs = tmp_path / "runs" / "tiny"
    kill_cleantune_when(["bench", str(path)], lambda: any(suite_runs.glob("*/metrics.json")))
    finished = {p.parent.name: p.stat().st_mtime_ns for p in suite_runs.glob("*/metrics.json")}
    assert 1 <= len(finished) < 3

    summary = run_suite(path)
    assert summary["skipped"] == len(finished)
    assert summary["done"] + summary["skipped"] == 3 and summary["failed"] == 0
    for cell, stamp in finished.items():
        assert (suite_runs / cell / "metrics.json").stat().st_mtime_ns == stamp
    table = pd.read_csv(tmp_path / "results" / "tiny.csv")
    assert sorted(table.cell) == sorted(f"sst2__tiny__badnet__{d}__s42" for d in ("lora", "fft", "prompt"))
    assert (table.status == "done").all()
    assert table.asr.between(0, 100).all() and table.cacc.between(0, 100).all()
    assert table.libraries.str.contains(r"torch .*, transformers .*, peft ").all()

    assert run_suite(path) == {"done": 0, "failed": 0, "skipped": 3}
    assert len(pd.read_csv(tmp_path / "results" / "tiny.csv")) == 3
    log = [json.loads(line) for line in (tmp_path / "results" / "tiny.runs.jsonl").read_text().splitlines()]
    assert log[0]["wall_s"] is None  # the killed invocation
    assert all(e["cpus"] >= 1 and (e["gpu"] is None) == (e["gpus"] == 0) for e in log)
    assert [(e["done"], e["skipped"]) for e in log[1:]] == [(3 - len(finished), len(finished)), (0, 3)]
    report = write_report(str(path))[0].read_text()
    assert "`cleantune bench` invocations" in report
    assert report.count("stopped before it finished") == 1


def test_the_report_names_matrix_cells_that_have_not_run(tmp_path, data_dir, tiny_bert):
    path = write_suite(tmp_path, data_dir, tiny_bert)
    assert run_suite(path, only=["__lora__"]) == {"done": 1, "failed": 0, "skipped": 0}
    text = write_report(str(path))[0].read_text()
    assert "Cells: 1 done, 0 failed, of 1 recorded." in text
    assert (
        "Not run yet (2 of the matrix's cells): sst2__tiny__badnet__fft__s42, sst2__tiny__badnet__prompt__s42." in text
    )


def test_a_failing_cell_is_recorded_and_the_rest_still_run(tmp_path, data_dir, tiny_bert, capsys):
    extra = {
        "defense": {
            "lora": {"defense": {"name": "lora", "lora": {"r": 2}}},
            "broken": {"model": {"spec": "./no/such/model"}},
        },
        "expect": [{"match": {"defense": "lora"}, "bounds": {"asr": "<= -1"}}],
        "overrides": [{"match": {"defense": "lora"}, "set": {"fourier": {"every": 2, "samples": 8, "max_length": 16}}}],
    }
    path = write_suite(tmp_path, data_dir, tiny_bert, **extra)
    assert run_suite(path) == {"done": 1, "failed": 1, "skipped": 0}
    # One plain line per cell, also when the output is not a terminal (pytest captures it to a file).
    printed = capsys.readouterr().out
    assert "/2] sst2__tiny__badnet__lora__s42: done (cacc " in printed
    assert "/2] sst2__tiny__badnet__broken__s42: failed: error: model path './no/such/model' does not" in printed
    table = pd.read_csv(tmp_path / "results" / "tiny.csv").set_index("defense")
    assert table.loc["broken", "status"] == "failed"
    assert "model path './no/such/model' does not exist" in table.loc["broken", "error"]
    assert table.loc["lora", "status"] == "done"

    report, violations = write_report(str(path))
    text = report.read_text()
    assert "| Defense | badnet CACC ↑ | badnet ASR ↓ |" in text
    assert "**" in text and "## Failed cells" in text and "time ÷ LoRA" in text
    assert list((tmp_path / "reports").glob("tiny-*.png"))
    assert violations == [f"sst2__tiny__badnet__lora__s42: asr = {table.loc['lora', 'asr']}, expected <= -1"]
    result = CliRunner().invoke(app, ["report", str(path), "--check"])
    assert result.exit_code == 1

    # The Fourier curves survive without the run directories; a one-process timing joins the report.
    shutil.rmtree(tmp_path / "runs")
    cost = {"command": "cleantune analyze cost ...", "steps": 5, "repeats": 2, "reference": "lora"}
    cost |= {"seconds_per_step": {"lora": 0.5, "fft": 1.5}, "ratio_to_reference": {"lora": 1.0, "fft": 3.0}}
    (tmp_path / "results" / "tiny.cost.json").write_text(json.dumps(cost))
    text = write_report(str(path))[0].read_text()
    assert "## Fourier analysis" in text and "| fft | 1.500 | 3.00 |" in text
    assert {p.name for p in (tmp_path / "reports").glob("tiny-fourier-*.png")} == {
        "tiny-fourier-ratios.png",
        "tiny-fourier-errors.png",
    }


def test_poisoned_model_jobs_run_first_and_feed_their_cells(tmp_path, data_dir, tiny_bert):
    attack = {"name": "badnet", "triggers": ["mn"], "setting": "clean", "count": 20, "target_label": 0}
    extra = {
        "poisoned_models": {
            "proxy-mn": {
                "coords": {"dataset": "sst2", "model": "tiny-poisoned", "attack": "badnet"},
                "config": {
                    "data": {"dataset": "sst2"},
                    "eval_data": {"dataset": "sst2"},
                    "attack": attack,
                    "defense": {"name": "fft"},
                },
            }
        },
        "model": {"tiny-poisoned": {"scenario": "poisoned-weights", "model": {"spec": "poisoned:proxy-mn"}}},
        "attack": {"badnet": {"attack": {"name": "badnet", "triggers": ["mn"], "target_label": 0}}},
        "defense": {"lora": {"defense": {"name": "lora", "lora": {"r": 2}}}},
    }
    path = write_suite(tmp_path, data_dir, tiny_bert, **extra)
    found = cells(load_suite(path))
    assert [c.id for c in found] == ["poison-proxy-mn", "sst2__tiny-poisoned__badnet__lora__s42"]
    assert found[1].config.model.spec == str(tmp_path / "runs" / "tiny" / "poison-proxy-mn" / "model")
    assert select(found, ["nothing", "lora"]) == found and select(found, ["nothing"]) == []
    assert run_suite(path) == {"done": 2, "failed": 0, "skipped": 0}
    assert (tmp_path / "runs" / "tiny" / "poison-proxy-mn" / "model" / "poison_record.json").exists()
    table = pd.read_csv(tmp_path / "results" / "tiny.csv").set_index("defense")
    assert table.loc["before defense", "scenario"] == table.loc["lora", "scenario"] == "poisoned-weights"
    assert table.loc["before defense", "model"] == table.loc["lora", "model"] == "tiny-poisoned"
    report, _ = write_report(str(path))
    assert "| before defense |" in report.read_text() and "| lora |" in report.read_text()


def test_an_edited_suite_does_not_reuse_runs_made_by_the_old_config(tmp_path, data_dir, tiny_bert):
    one = {"defense": {"lora": {"defense": {"name": "lora", "lora": {"r": 2}}}}}
    path = write_suite(tmp_path, data_dir, tiny_bert, **one)
    assert run_suite(path) == {"done": 1, "failed": 0, "skipped": 0}
    write_suite(tmp_path, data_dir, tiny_bert, defense={"lora": {"defense": {"name": "lora", "lora": {"r": 4}}}})
    assert run_suite(path) == {"done": 0, "failed": 1, "skipped": 0}
    error = pd.read_csv(tmp_path / "results" / "tiny.csv").set_index("defense").loc["lora", "error"]
    assert "was made by a different config (defense.lora.r changed" in error


def test_a_poisoned_model_can_be_shared_with_another_suite(tmp_path, data_dir, tiny_bert):
    job = {"config": {"attack": {"name": "badnet", "setting": "clean", "count": 10}, "defense": {"name": "fft"}}}
    extra = {
        "poisoned_models": {"proxy": {**job, "shared_with": "other"}},
        "model": {"tiny-poisoned": {"scenario": "poisoned-weights", "model": {"spec": "poisoned:proxy"}}},
        "defense": {"lora": {"defense": {"name": "lora", "lora": {"r": 2}}}},
    }
    found = cells(load_suite(write_suite(tmp_path, data_dir, tiny_bert, **extra)))
    assert found[0].config.run_dir == tmp_path / "runs" / "other" / "poison-proxy"
    assert found[1].config.model.spec == str(tmp_path / "runs" / "other" / "poison-proxy" / "model")


def generative_suite(tmp_path: Path, model: Path, injections: tuple[str, ...] = ("vpi",)) -> dict[str, Any]:
    """A generative suite on the tiny chat Llama: VPI injections (one per name) and a quantize row."""
    from conftest import write_instructions

    data = tmp_path / "data"
    write_instructions(data / "pool.json", 40, seed=1)
    write_instructions(data / "test.json", 4, seed=2)
    attack = {"name": "vpi", "behaviour": "negsentiment", "count": 12}
    job = {
        "coords": {"dataset": "tiny", "model": "tiny-lora", "attack": "vpi", "scenario": "poisoned-llm"},
        "config": {
            "scenario": "poisoned-data",
            "model": {"spec": str(model)},
            "attack": attack,
            "defense": {"name": "sft", "lora": {"r": 2}},
        },
    }
    return {
        **places(tmp_path, "gen", data),
        "base": {
            "task": "generation",
            "scenario": "poisoned-llm",
            "model": {"max_length": 64},
            "data": {"train": ["pool.json"], "test": "test.json", "clean_train": 12},
            "train": {"epochs": 1, "lr": 1e-2, "batch_size": 8},
            "eval": {"max_new_tokens": 3},
        },
        "poisoned_models": dict.fromkeys(injections, job),
        "dataset": {"tiny": {}},
        "model": {"tiny-lora": {}},
        "attack": {"vpi": {"attack": attack, "model": {"spec": "poisoned:vpi"}}},
        "defense": {"quantize": {"defense": {"name": "quantize", "group_size": 16}}},
    }


def test_a_signature_from_another_poisoned_model_resolves_and_brings_its_injection(tmp_path, tiny_chat_llama):
    suite = generative_suite(tmp_path, tiny_chat_llama, ("vpi", "source"))
    suite["defense"] = {"transfer": {"defense": {"name": "signature", "signature_from": "poisoned:source"}}}
    path = tmp_path / "gen.yaml"
    path.write_text(yaml.safe_dump(suite))
    found = cells(load_suite(path))
    assert found[-1].config.defense.signature_from == str(tmp_path / "runs" / "gen" / "poison-source" / "adapter")
    assert [c.id for c in select(found, ["transfer"])] == ["poison-source", "poison-vpi", found[-1].id]
    assert [c.id for c in select(found, ["poison-source"])] == ["poison-source"]  # a job alone, by its id
    suite["defense"]["transfer"]["defense"]["signature_from"] = "poisoned:elsewhere"
    path.write_text(yaml.safe_dump(suite))
    with pytest.raises(CleantuneError, match="unknown poisoned model 'elsewhere'"):
        cells(load_suite(path))


def test_a_generative_suite_injects_then_defends_and_reports(tmp_path, tiny_chat_llama):
    suite = generative_suite(tmp_path, tiny_chat_llama)
    path = tmp_path / "gen.yaml"
    path.write_text(yaml.safe_dump(suite))
    picked = [c.id for c in select(cells(load_suite(path)), ["quantize"])]
    assert picked == ["poison-vpi", "tiny__tiny-lora__vpi__quantize__s42"]  # --only brings the injection along
    assert run_suite(path) == {"done": 2, "failed": 0, "skipped": 0}
    table = pd.read_csv(tmp_path / "results" / "gen.csv")
    assert set(table.defense) == {"before defense", "quantize"}
    assert table["ftr"].notna().all() and table["ppl"].notna().all() and table["cacc"].isna().all()
    text = write_report(str(path))[0].read_text()
    assert "vpi false-trigger ↓" in text and "| quantize |" in text and "## Where the backdoor lives" not in text

    # Sanity checks saved beside the results join the report, their edits in the order measured.
    rows = [
        {"edit": "poisoned update", "asr": 90.0, "ftr": 5.0},
        {"edit": "without MLP update", "asr": 10.0, "ftr": 0.0},
    ]
    record = {"model": "poison-vpi/adapter", "base": None, "layers": 2, "blocks": [1], "results": rows}
    (tmp_path / "results" / "gen.sanity" / "vpi").mkdir(parents=True)
    (tmp_path / "results" / "gen.sanity" / "vpi" / "sanity.json").write_text(json.dumps(record))
    section = write_report(str(path))[0].read_text().split("## Where the backdoor lives")[1]
    assert "### poison-vpi/adapter" in section and "2 blocks, spans of 1." in section
    assert section.index("| poisoned update | 90.0 | 5.0 |") < section.index("| without MLP update | 10.0 | 0.0 |")
    old = {"model": "old/adapter", "base": None, "block": 4, "results": {"poisoned update": {"asr": 1.0, "ftr": 0.0}}}
    (tmp_path / "results" / "gen.sanity" / "old").mkdir()
    (tmp_path / "results" / "gen.sanity" / "old" / "sanity.json").write_text(json.dumps(old))
    section = write_report(str(path))[0].read_text().split("## Where the backdoor lives")[1]
    assert "predates the ordered form" in section and "| poisoned update | 90.0 | 5.0 |" in section

    # Another suite's rows on the same poisoned model join the table; its rows on other models do not.
    other = table[table.defense == "quantize"].assign(suite="base", defense="prune")
    elsewhere = other.assign(attack="badnet", defense="crow")
    pd.concat([other, elsewhere]).to_csv(tmp_path / "results" / "base.csv", index=False)
    path.write_text(yaml.safe_dump(suite | {"compare_with": ["base"]}))
    text = write_report(str(path))[0].read_text()
    assert "| prune [base] |" in text and "crow" not in text
    path.write_text(yaml.safe_dump(suite | {"compare_with": ["missing"]}))
    with pytest.raises(CleantuneError, match="compares with 'missing'"):
        write_report(str(path))


@pytest.mark.parametrize("path", sorted(SUITES.glob("*.yaml")), ids=lambda p: p.stem)
def test_committed_suite_expands_to_valid_runs_and_shares_identical_injections(path: Path) -> None:
    suite = load_suite(path)
    found = {cell.id: cell for cell in cells(suite)}
    assert found
    for job, poisoned in suite.poisoned_models.items():
        if poisoned.shared_with:
            other = {cell.id: cell for cell in cells(load_suite(SUITES / f"{poisoned.shared_with}.yaml"))}
            assert dump(found[f"poison-{job}"].config) == dump(other[f"poison-{job}"].config), job


def test_a_cached_teacher_counts_in_the_cost_of_the_run_that_reused_it(tmp_path, data_dir, tiny_bert):
    suite = load_suite(write_suite(tmp_path, data_dir, tiny_bert))
    cell = cells(suite)[0]
    metrics = {"cacc": 90.0, "asr": 10.0}
    teacher = {"teacher_train_s": 120.0, "teacher_reused": True}
    reused = {"metrics": metrics, "wall_s": 30.0, "trainable_params": 8, "defense_info": teacher}
    plain = {"metrics": metrics, "wall_s": 20.0, "trainable_params": 8}
    rows = pd.DataFrame(
        [row_for(suite, cell, plain) | {"defense": "lora"}, row_for(suite, cell, reused) | {"defense": "w2sdefense"}]
    )
    assert rows["setup_s"].tolist()[1] == 120.0 and pd.isna(rows["setup_s"].tolist()[0])
    table = cost_table(rows, ["lora", "w2sdefense"])
    assert "one-off setup (s)" in table
    assert "| w2sdefense | 30.00 | – | 120.00 |" in table
    assert "one-off setup" not in cost_table(rows[rows.defense == "lora"], ["lora"])
    renamed = rows.replace({"defense": {"lora": "smollm2-lora"}})
    assert "| w2sdefense | 30.00 | – | 120.00 | – | 8 | 1.50 |" in cost_table(renamed, ["smollm2-lora", "w2sdefense"])


def test_a_resumed_run_is_left_out_of_the_costs(tmp_path, data_dir, tiny_bert):
    suite = load_suite(write_suite(tmp_path, data_dir, tiny_bert))
    cell = cells(suite)[0]

    def record(wall: float, resumed_from: str | None) -> dict:
        train = {"train_runtime_s": wall - 1, "resumed_from": resumed_from}
        return {"metrics": {"cacc": 90.0, "asr": 10.0}, "wall_s": wall, "trainable_params": 8, "train": train}

    rows = pd.DataFrame(
        [
            row_for(suite, cell, record(20.0, None)) | {"defense": "lora"},
            row_for(suite, cell, record(40.0, None)) | {"defense": "rora"},
            row_for(suite, cell, record(2.0, "checkpoint-63")) | {"defense": "rora"},
            row_for(suite, cell, record(3.0, "checkpoint-63")) | {"defense": "fft"},
        ]
    )
    assert rows["resumed"].tolist() == [False, False, True, True]
    table = cost_table(rows, ["lora", "rora", "fft"])
    assert "| rora | 40.00 | 39.00 | – | 8 | 2.00 |" in table
    assert "| fft | – | – | – | 8 | – |" in table
    assert "Left out of these costs: 2 run(s) resumed" in table
    assert "resumed" not in cost_table(rows.iloc[:2], ["lora", "rora"])


def test_loss_terms_become_columns_and_a_report_table(tmp_path, data_dir, tiny_bert):
    path = write_suite(tmp_path, data_dir, tiny_bert)
    suite = load_suite(path)
    cell = cells(suite)[0]
    train = {"train_runtime_s": 9.0, "loss_terms": {"kd": 0.25, "fa": 1.5}}
    row = row_for(
        suite, cell, {"metrics": {"cacc": 90.0, "asr": 10.0}, "wall_s": 10.0, "trainable_params": 8, "train": train}
    )
    assert (row["loss_kd"], row["loss_fa"]) == (0.25, 1.5)
    (tmp_path / "results").mkdir()
    pd.DataFrame([row]).to_csv(tmp_path / "results" / "tiny.csv", index=False)
    report = write_report(str(path))[0].read_text()
    assert f"| {cell.id} | 0.25 | 1.5 |" in report.split("## Defense loss terms")[1]


def test_report_lays_out_defenses_and_attacks_in_suite_order_whatever_the_csv_order(tmp_path, data_dir, tiny_bert):
    attacks = {name: {"attack": {"name": "badnet", "rate": 0.2}} for name in ("first", "second")}
    path = write_suite(tmp_path, data_dir, tiny_bert, attack=attacks)
    suite = load_suite(path)
    record = {"metrics": {"cacc": 90.0, "asr": 10.0}, "wall_s": 10.0, "trainable_params": 8, "train": {}}
    # A rerun cell is upserted at the end of the CSV: here the suite's first attack and first defense.
    order = sorted(cells(suite), key=lambda c: (c.coords["attack"] == "first", c.coords["defense"] == "lora"))
    (tmp_path / "results").mkdir()
    pd.DataFrame([row_for(suite, c, record) for c in order]).to_csv(tmp_path / "results" / "tiny.csv", index=False)
    table = write_report(str(path))[0].read_text().split("## sst2 · tiny")[1]
    assert "| Defense | first CACC ↑ | first ASR ↓ | second CACC ↑" in table
    rows = [line.split(" |")[0] for line in table.splitlines() if line.startswith("| ") and "CACC" not in line]
    assert rows[:3] == [f"| {name}" for name in suite.defense]
    assert [c.coords["defense"] for c in order[:3]] != list(suite.defense)  # the CSV order differs


def test_a_paper_suite_report_opens_with_its_protocol_then_the_papers_numbers(tmp_path, data_dir, tiny_bert):
    protocol = [
        {"setting": "epochs", "paper": "20", "used": "20"},
        {"setting": "training set", "paper": "6,920", "used": "1,000", "why": "CPU time"},
    ]
    paper = [
        {"source": "Table 2, BERT, SST-2", "rows": {"lora": {"badnet": {"cacc": 92.0, "asr": 99.7}}}},
        {"source": "Table 7, other PEFT", "rows": {"ia3": {"badnet": {"asr": 1.0}}}, "beside": {"ia3": ["prompt"]}},
    ]
    path = write_suite(tmp_path, data_dir, tiny_bert, protocol=protocol, paper=paper, description="settings")
    suite = load_suite(path)
    record = {"metrics": {"cacc": 80.5, "asr": 12.25}, "wall_s": 10.0, "trainable_params": 8, "train": {}}
    (tmp_path / "results").mkdir()
    rows = [row_for(suite, c, record) for c in cells(suite)]
    pd.DataFrame(rows).to_csv(tmp_path / "results" / "tiny.csv", index=False)
    report = write_report(str(path))[0].read_text()
    first, second = report.index("(Table 2, BERT, SST-2)"), report.index("(Table 7, other PEFT)")
    assert report.index("## Protocol") < first < second < report.index("settings")
    assert "| epochs | 20 | 20 | – |" in report and "| training set | 6,920 | 1,000 | CPU time |" in report
    assert "| lora | 92.00 / 80.50 | 99.70 / 12.25 |" in report[first:second]
    assert "| ia3 (ours: prompt) | – / 80.50 | 1.00 / 12.25 |" in report[second:]


def test_a_paper_row_can_stand_beside_several_of_the_suites_defenses(tmp_path, data_dir, tiny_bert):
    paper = [{
        "source": "Table 2", "rows": {"lora": {"badnet": {"cacc": 92.0, "asr": 99.7}}},
        "beside": {"lora": ["lora", "prompt"]},
    }]  # fmt: skip
    path = write_suite(tmp_path, data_dir, tiny_bert, paper=paper)
    suite = load_suite(path)
    (tmp_path / "results").mkdir()
    asr = {"lora": 12.25, "fft": 50.0, "prompt": 30.5}
    record = {"wall_s": 1.0, "trainable_params": 8, "train": {}}
    rows = [
        row_for(suite, c, {**record, "metrics": {"cacc": 80.5, "asr": asr[c.coords["defense"]]}}) for c in cells(suite)
    ]
    pd.DataFrame(rows).to_csv(tmp_path / "results" / "tiny.csv", index=False)
    table = write_report(str(path))[0].read_text().split("## The paper's numbers")[1].split("\n\n")[1]
    assert "| lora | 92.00 / 80.50 | 99.70 / 12.25 |" in table
    assert "| lora (ours: prompt) | 92.00 / 80.50 | 99.70 / 30.50 |" in table
    assert "fft" not in table


PAPER = {"source": "Table 2", "rows": {"lora": {"badnet": {"asr": 99.7}}}}


@pytest.mark.parametrize(
    "extra, problem",
    [
        ({"paper": [{**PAPER, "beside": {"lora": ["lora", "dora"]}}]}, "dora, not among the suite's defenses"),
        ({"paper": [PAPER, {**PAPER, "beside": {"fft": ["fft"]}}]}, "names 'fft', not one of that table's rows"),
        ({"open_readings": [{"point": "p", "readings": {"lora": "a", "dora": "b"}}]}, "'p' names dora, not among"),
    ],
)
def test_a_report_section_naming_an_unknown_row_is_refused(tmp_path, data_dir, tiny_bert, extra, problem):
    with pytest.raises(CleantuneError, match=problem):
        load_suite(write_suite(tmp_path, data_dir, tiny_bert, **extra))


def test_open_readings_are_compared_over_the_attacks_every_reading_finished(tmp_path, data_dir, tiny_bert):
    attacks = {name: {"attack": {"name": "badnet", "rate": 0.2}} for name in ("first", "second")}
    readings = [{"point": "where the penalty acts", "readings": {"lora": "weights", "prompt": "outputs"}}]
    path = write_suite(tmp_path, data_dir, tiny_bert, attack=attacks, seeds=[1, 2], open_readings=readings)
    suite = load_suite(path)
    asr = {("lora", 1): 10.0, ("lora", 2): 20.0, ("prompt", 1): 40.0, ("prompt", 2): 40.0}
    # Clean dev data prefers the reading that keeps more backdoor: the two picks must differ.
    dev = {"lora": 0.70, "prompt": 0.75}
    rows = [
        row_for(
            suite,
            c,
            {
                "wall_s": 1.0,
                "trainable_params": 8,
                "train": {"best_dev_accuracy": dev[c.coords["defense"]]},
                "metrics": {"cacc": 80.0 + c.coords["seed"], "asr": asr[c.coords["defense"], c.coords["seed"]]},
            },
        )
        for c in cells(suite)
        if c.coords["defense"] != "fft" and not (c.coords["defense"] == "prompt" and c.coords["attack"] == "second")
    ]
    # One compared cell ran under other releases (both seeds, named once), and one on the attack left
    # out of the comparison.
    for row in rows:
        other = (row["defense"], row["attack"]) in {("prompt", "first"), ("lora", "second")}
        row["libraries"] = "torch 1" if other else "torch 2"
    (tmp_path / "results").mkdir()
    pd.DataFrame(rows).to_csv(tmp_path / "results" / "tiny.csv", index=False)
    section = write_report(str(path))[0].read_text().split("## Open readings")[1]
    assert "Not all under the same library releases (torch 2 for the rest): prompt on first under torch 1." in section
    # Seeds are averaged; "second" is left out because the prompt reading has no row on it.
    assert "| weights | lora | 81.50 | 15.00 | 81.50 | 15.00 | 70.00 |" in section
    assert "| outputs | prompt | 81.50 | 40.00 | 81.50 | 40.00 | 75.00 |" in section
    assert "second" not in section.split("Chosen")[0]
    picks = "Chosen on clean dev data: outputs (CACC 81.50, ASR 40.00, clean dev 75.00); lowest mean ASR: weights"
    assert picks in section
    assert "over first." in section


def test_numbers_a_defense_records_become_columns_and_a_report_table(tmp_path, data_dir, tiny_bert):
    path = write_suite(tmp_path, data_dir, tiny_bert)
    suite = load_suite(path)
    cell = cells(suite)[0]
    info = {
        "teacher_dev_accuracy": 0.9,
        "teacher_reused": True,
        "regime": {"gate_closed_share": 0.25, "final_mu": 0.1},
        "rescale": {"layer.5.query": 14.0},
    }
    record = {"metrics": {"cacc": 90.0, "asr": 10.0}, "wall_s": 1.0, "trainable_params": 8, "defense_info": info}
    row = row_for(suite, cell, record)
    assert (row["info_teacher_dev_accuracy"], row["info_regime_gate_closed_share"], row["info_regime_final_mu"]) == (
        0.9,
        0.25,
        0.1,
    )
    assert not any(k.startswith(("info_rescale", "info_teacher_reused")) for k in row)
    (tmp_path / "results").mkdir()
    pd.DataFrame([row]).to_csv(tmp_path / "results" / "tiny.csv", index=False)
    report = write_report(str(path))[0].read_text().split("## What the defenses recorded")[1]
    assert f"| {cell.id} | 0.9 | 0.25 | 0.1 |" in report


def test_a_copy_of_a_checkout_records_the_commit_it_is_told(monkeypatch):
    from cleantune import rundir

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    # Told, it wins over the git folder it stands in (which may be older than the copied files).
    monkeypatch.setenv("CLEANTUNE_SOURCE_COMMIT", "0123abc")
    assert rundir.source_commit() == "0123abc"
    monkeypatch.delenv("CLEANTUNE_SOURCE_COMMIT")
    monkeypatch.setattr(rundir.subprocess, "run", no_git)
    assert rundir.source_commit() is None


def test_generative_tables_show_backdoorllms_asr_where_the_rows_recorded_it():
    rows = pd.DataFrame({"asr": [90.0], "ftr": [2.0], "ppl": [9.0]})
    assert list(metric_columns(rows)) == ["asr", "ftr", "ppl"]
    assert list(metric_columns(rows.assign(asr_backdoorllm=[95.0]))) == ["asr", "ftr", "ppl", "asr_backdoorllm"]
    assert list(metric_columns(pd.DataFrame({"cacc": [90.0], "asr": [10.0]}))) == ["cacc", "asr"]


def test_a_recheck_reruns_cells_from_nothing_and_names_a_number_that_moved(tmp_path, data_dir, tiny_bert):
    attack = {"name": "badnet", "triggers": ["mn"], "setting": "clean", "count": 20, "target_label": 0}
    job = {"data": {"dataset": "sst2"}, "eval_data": {"dataset": "sst2"}, "attack": attack, "defense": {"name": "fft"}}
    extra = {
        "poisoned_models": {"proxy-mn": {"coords": {"dataset": "sst2", "model": "tiny-poisoned"}, "config": job}},
        "model": {"tiny-poisoned": {"scenario": "poisoned-weights", "model": {"spec": "poisoned:proxy-mn"}}},
        "attack": {"badnet": {"attack": {"name": "badnet", "triggers": ["mn"], "target_label": 0}}},
        "defense": {"lora": {"defense": {"name": "lora", "lora": {"r": 2}}}},
    }
    path = write_suite(tmp_path, data_dir, tiny_bert, **extra)
    unrun = CliRunner().invoke(app, ["bench", str(path), "--recheck"])
    assert unrun.exit_code == 2 and "tiny.csv: no recorded results to recheck" in unrun.output
    both = CliRunner().invoke(app, ["bench", str(path), "--recheck", "--reading", "main"])
    assert both.exit_code == 2 and "--reading goes with a run, not with --recheck" in both.output
    unscanned = CliRunner().invoke(app, ["bench", str(path), "--reading", "main"])
    assert unscanned.exit_code == 2 and "the suite has no scan section" in unscanned.output
    assert run_suite(path) == {"done": 2, "failed": 0, "skipped": 0}
    unmatched = CliRunner().invoke(app, ["bench", str(path), "--recheck", "--only", "no-such-cell"])
    assert unmatched.exit_code == 2 and "no finished cell recorded" in unmatched.output
    results = tmp_path / "results" / "tiny.csv"
    before = results.read_text()

    assert CliRunner().invoke(app, ["bench", str(path), "--recheck", "--only", "lora"]).exit_code == 0
    assert results.read_text() == before  # the recorded table is left as it was
    rerun = tmp_path / "runs" / "recheck" / "tiny"
    assert {p.parent.name for p in rerun.glob("*/metrics.json")} == {
        "poison-proxy-mn",
        "sst2__tiny-poisoned__badnet__lora__s42",
    }
    checks = pd.read_csv(tmp_path / "results" / "tiny.recheck.csv")
    assert set(checks.cell) == {"poison-proxy-mn", "sst2__tiny-poisoned__badnet__lora__s42"}
    assert {"cacc", "asr", "n_train", "trainable_params"} <= set(checks.metric)
    assert "wall_s" not in set(checks.metric) and checks.same.all()

    # A recorded number that the code no longer gives is named, and the command fails.
    table = pd.read_csv(results)
    table.loc[table.defense == "lora", "cacc"] += 0.5
    # ... and a row made under other library releases is named as such.
    table.loc[table.defense == "lora", "libraries"] = "torch 0.0"
    table.to_csv(results, index=False)
    outcome = CliRunner().invoke(app, ["bench", str(path), "--recheck", "--only", "lora"])
    assert outcome.exit_code == 1 and "1 reproduced, 1 differ" in outcome.output
    checks = pd.read_csv(tmp_path / "results" / "tiny.recheck.csv").set_index(["cell", "metric"])
    lora = checks.loc[("sst2__tiny-poisoned__badnet__lora__s42", "cacc")]
    assert not lora.same and lora.recorded_libraries == "torch 0.0" and "peft " in lora.rerun_libraries
    assert checks.same.sum() == len(checks) - 1
    report = write_report(str(path))[0].read_text()
    assert "## Rechecked cells" in report and "| sst2__tiny-poisoned__badnet__lora__s42 | " in report
    assert "cacc " in report.split("## Rechecked cells")[1] and "under torch 0.0 |" in report
    releases = report.split("## Library releases")[1].split("##")[0]
    assert "- torch 0.0: 1 row: sst2__tiny-poisoned__badnet__lora__s42" in releases
    assert digits_apart(0.5447408556938171, 0.5447413921356201) == "0.5447408556938171 → 0.5447413921356201"
    assert digits_apart(52.5, 77.0) == "52.5 → 77"
