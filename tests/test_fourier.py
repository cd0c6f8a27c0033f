from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from cleantune.analysis.fourier import frequency_ratios, low_pass, relative_errors
from cleantune.cli import app
from cleantune.config import validate
from cleantune.dispatch import run


@pytest.mark.parametrize("distance", ["squared", "plain"])
def test_a_constant_mapping_is_all_low_frequency(distance):
    torch.manual_seed(0)
    embeddings = torch.randn(50, 30) * 10  # far apart: a naive kernel would underflow to zero rows
    values = torch.tensor([[0.3, 0.7]]).repeat(50, 1)
    low = low_pass(embeddings, values, delta=4.0, distance=distance, chunk=7)
    lfr, hfr = frequency_ratios(values, low)
    assert lfr == pytest.approx(1.0, abs=1e-6) and hfr == pytest.approx(0.0, abs=1e-6)


def test_chunking_does_not_change_the_filter_and_wide_kernels_smooth():
    torch.manual_seed(1)
    embeddings, values = torch.randn(40, 5), torch.randn(40, 3)
    chunked, whole = (low_pass(embeddings, values, 4.0, "squared", chunk) for chunk in (6, 40))
    torch.testing.assert_close(chunked, whole)
    smooth = low_pass(embeddings, values, 1e6, "squared", 40)  # a huge δ averages everything
    torch.testing.assert_close(smooth, values.mean(0, keepdim=True).expand_as(values), atol=1e-4, rtol=1e-4)


def test_relative_errors_vanish_for_a_perfect_fit():
    torch.manual_seed(2)
    embeddings, targets = torch.randn(20, 4), torch.eye(2)[torch.randint(0, 2, (20,))]
    target_low = low_pass(embeddings, targets, 4.0, "squared", 8)
    assert relative_errors(targets, target_low, targets, target_low) == pytest.approx((0.0, 0.0), abs=1e-6)


def test_high_frequency_error_is_undefined_for_constant_targets():
    embeddings = torch.randn(12, 5)
    targets = torch.tensor([[0.0, 1.0]]).repeat(12, 1)  # a backdoor mapping: every target is the target label
    outputs = torch.softmax(torch.randn(12, 2), dim=1)
    low = low_pass(embeddings, outputs, 4.0, "squared", 5)
    re_low, re_high = relative_errors(outputs, low, targets, low_pass(embeddings, targets, 4.0, "squared", 5))
    assert math.isnan(re_high) and 0 < re_low < 2


def test_training_records_both_mappings_and_plots_them(tiny_tree, tmp_path):
    tree = {**tiny_tree, "fourier": {"every": 4, "samples": 16, "max_length": 16}}
    tree["train"] = {"epochs": 1, "batch_size": 16, "lr": 1e-3}
    cfg = validate(tree, "test")
    run(cfg)
    rows = [json.loads(line) for line in (cfg.run_dir / "fourier.jsonl").read_text().splitlines()]
    assert {r["mapping"] for r in rows} == {"clean", "backdoor"}
    assert [r["step"] for r in rows if r["mapping"] == "clean"] == [4, 8]
    assert all(0 <= r["lfr"] <= 1.0 + 1e-6 and r["hfr"] >= 0 for r in rows)
    result = CliRunner().invoke(app, ["analyze", "fourier", str(cfg.run_dir), "--out", str(tmp_path / "plots")])
    assert result.exit_code == 0, result.output
    assert {p.name for p in (tmp_path / "plots").iterdir()} == {"fourier-ratios.png", "fourier-errors.png"}
