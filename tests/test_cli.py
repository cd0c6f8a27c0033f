from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cleantune.cli import app

runner = CliRunner()


@pytest.mark.parametrize(
    "command", [[], ["run"], ["poison", "data"], ["poison", "weights"], ["eval"], ["models"], ["bench"], ["report"]]
)
def test_help_everywhere(command):
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output


def test_bad_config_is_one_clear_line(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"trian": {}}))
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 2
    assert "error: invalid config" in result.output and "trian" in result.output
    assert "Traceback" not in result.output


def test_models_lists_the_packaged_copies():
    result = runner.invoke(app, ["models"], env={"COLUMNS": "250"})
    assert result.exit_code == 0 and "all-MiniLM-L6-v2" in result.output


def test_poison_data_writes_the_sets_and_record(tmp_path: Path, tiny_tree):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_tree))
    out = tmp_path / "poisoned"
    result = runner.invoke(app, ["poison", "data", str(path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "record.json").read_text())
    assert len(record["poisoned_idx"]) == 24
    train = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert len(train) == 120
    assert not list(tmp_path.glob(".poisoned.*"))


def test_run_then_eval(tmp_path: Path, tiny_tree):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**tiny_tree, "train": {"epochs": 1, "batch_size": 16}}))
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 0, result.output
    assert "CACC" in result.output
    adapter = Path(tiny_tree["output_dir"]) / "tiny" / "adapter"
    out = tmp_path / "m.json"
    result = runner.invoke(app, ["eval", str(adapter), str(path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    run_metrics = json.loads((adapter.parent / "metrics.json").read_text())["metrics"]
    assert json.loads(out.read_text())["cacc"] == pytest.approx(run_metrics["cacc"])


def test_weight_poisoning_needs_full_fine_tuning(tmp_path: Path, tiny_tree):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_tree))
    result = runner.invoke(app, ["poison", "weights", str(path)])
    assert result.exit_code == 2 and "defense.name to 'fft'" in result.output


def test_cost_compares_defenses_in_one_process(tmp_path: Path, tiny_tree):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**tiny_tree, "train": {"batch_size": 8}}))
    out = tmp_path / "cost.json"
    args = ["analyze", "cost", str(path), "--defense", "{name: lora, lora: {r: 2}}", "--defense", "{name: lora, r: 4}"]
    args += ["--defense", "{name: fft}", "--steps", "3", "--repeats", "1", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    timings = json.loads(out.read_text())
    # Today's shape and the earlier flat one (r 4) read alike.
    assert set(timings["seconds_per_step"]) == {"lora(lora.r=2)", "lora(lora.r=4)", "fft"}
    ratios = timings["ratio_to_reference"]
    assert timings["reference"] == "lora(lora.r=2)" and ratios["lora(lora.r=2)"] == 1.0 and ratios["fft"] > 0
    assert timings["command"].startswith("cleantune analyze cost")
    result = runner.invoke(app, ["analyze", "cost", str(path), "--defense", "{name: nope}"])
    assert result.exit_code == 2 and "error: invalid defense" in result.output


def test_short_help_version_and_list_answer_at_once():
    assert runner.invoke(app, ["-h"]).exit_code == 0
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.startswith("cleantune ")
    result = runner.invoke(app, ["list"], env={"COLUMNS": "250"})
    assert result.exit_code == 0
    assert "rora" in result.stdout and "poisoned-weights" in result.stdout and "stylebkd" in result.stdout


@pytest.mark.parametrize(
    "text, problem",
    [(b"name: [unclosed\n", "line 2, column 1"), (b"name: caf\xe9\n", "byte 9 is not UTF-8 text")],
)
def test_an_unreadable_config_is_one_line_and_exit_2(tmp_path: Path, text: bytes, problem: str):
    path = tmp_path / "c.yaml"
    path.write_bytes(text)
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 2 and problem in result.stderr and str(path) in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def _local(tmp_path: Path, tree: dict, train: str) -> Path:
    (tmp_path / "train.csv").write_text(train)
    local = {"dataset": "local", "train": "train.csv"}  # relative to the config file
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**tree, "data": local, "output_dir": str(tmp_path / "runs")}))
    return path


def _rows(n: int, label=lambda i: i % 2) -> str:
    return "text,label\n" + "".join(f"a good film number {i},{label(i)}\n" for i in range(n))


@pytest.mark.parametrize(
    "train, problem",
    [
        ("text,label\n", "no rows (only a header?)"),
        (_rows(50, lambda i: 7 if i == 3 else i % 2), "row 4, column 'label': label 7 appears in no other split"),
    ],
)
def test_bad_training_files_are_named_and_leave_nothing(tmp_path: Path, tiny_tree, train: str, problem: str):
    path = _local(tmp_path, tiny_tree, train)
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 2, result.output
    assert problem in result.stderr and "train.csv" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_one_local_file_is_split_with_a_seed_and_logs_stay_off_stdout(tmp_path: Path, tiny_tree):
    path = _local(tmp_path, {**tiny_tree, "attack": {"name": "none"}}, _rows(100))
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "runs" / "tiny" / "metrics.json").read_text())
    assert record["n_train"] == 80 and record["metrics"]["n_test"] == 10
    assert "CACC" in result.stdout and "'loss'" not in result.stdout and "train_runtime" not in result.stdout


def test_too_many_clean_auxiliary_samples_name_the_setting(tmp_path: Path, tiny_tree):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**tiny_tree, "defense": {"name": "muscle-lora", "clean_aux": 96}}))
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 2 and "defense.clean_aux asks for 96" in result.stderr and "has 40" in result.stderr
    assert not (Path(tiny_tree["output_dir"]) / "tiny").exists()


def test_purify_an_adapter_then_train_on_suspicious_data(tmp_path: Path, tiny_tree, tiny_bert):
    runner.invoke(app, ["run", str(_write(tmp_path, tiny_tree))])
    suspicious = Path(tiny_tree["output_dir"]) / "tiny" / "adapter"
    (tmp_path / "clean.csv").write_text(_rows(100))
    out = tmp_path / "purified"
    args = ["purify", str(suspicious), "--clean-data", str(tmp_path / "clean.csv"), "--out", str(out)]
    result = runner.invoke(app, [*args, "--set", "train.epochs=1", "--set", "defense.rescale_layers=1"])
    assert result.exit_code == 0, result.output
    assert "before" in result.stdout and "after" in result.stdout
    card = (out / "adapter" / "README.md").read_text()
    assert f"base_model: {tiny_bert}" in card and "`rora` defense" in card and "Before: clean accuracy" in card
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        tiny_bert
    )
    (tmp_path / "dev.csv").write_text(_rows(20))
    trained = tmp_path / "trained"
    args = ["train", str(tmp_path / "clean.csv"), "--out", str(trained), "--model", str(tiny_bert), "--method", "lora"]
    result = runner.invoke(app, [*args, "--dev", str(tmp_path / "dev.csv"), "--test", str(tmp_path / "dev.csv")])
    assert result.exit_code == 0, result.output
    record = json.loads((trained / "metrics.json").read_text())
    assert record["scenario"] == "poisoned-data" and record["n_train"] == 100  # not split: dev and test given
    result = runner.invoke(app, [*args, "--dev", str(tmp_path / "dev.csv"), "--force"])
    assert result.exit_code == 2 and "give both a dev and a test file" in result.stderr


def _write(tmp_path: Path, tree: dict) -> Path:
    path = tmp_path / "suspicious.yaml"
    path.write_text(yaml.safe_dump({**tree, "train": {"epochs": 1, "batch_size": 16}}))
    return path


def test_pickle_weights_are_refused_before_the_run_directory_opens(tmp_path: Path, tiny_tree, tiny_bert):
    unsafe = tmp_path / "unsafe"
    unsafe.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (unsafe / name).write_bytes((tiny_bert / name).read_bytes())
    (unsafe / "pytorch_model.bin").write_bytes(b"not loaded")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**tiny_tree, "model": {"spec": str(unsafe)}}))
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 2 and "pickle weights (pytorch_model.bin)" in result.stderr
    assert not (Path(tiny_tree["output_dir"]) / "tiny").exists()


def test_a_training_set_filter_run_shows_its_undefended_reference_beside_it(tmp_path: Path, tiny_tree):
    path = tmp_path / "c.yaml"
    cube = {"name": "cube", "under": {"name": "lora", "lora": {"r": 2}}, "min_cluster_size": 10}
    path.write_text(yaml.safe_dump({**tiny_tree, "defense": cube, "train": {"epochs": 1, "batch_size": 16}}))
    result = runner.invoke(app, ["run", str(path)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "lora (undefended)" in result.stdout and "cube" in result.stdout
    assert any(line.startswith("cube ") and "ASR" in line for line in result.stdout.splitlines())  # the verdict
