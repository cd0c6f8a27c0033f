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
    args = ["analyze", "cost", str(path), "--defense", "{name: lora, r: 2}", "--defense", "{name: lora, r: 4}"]
    args += ["--defense", "{name: fft}", "--steps", "3", "--repeats", "1", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    timings = json.loads(out.read_text())
    assert set(timings["seconds_per_step"]) == {"lora(r=2)", "lora(r=4)", "fft"}
    ratios = timings["ratio_to_reference"]
    assert timings["reference"] == "lora(r=2)" and ratios["lora(r=2)"] == 1.0 and ratios["fft"] > 0
    assert timings["command"].startswith("cleantune analyze cost")
    result = runner.invoke(app, ["analyze", "cost", str(path), "--defense", "{name: nope}"])
    assert result.exit_code == 2 and "error: invalid defense" in result.output
