"""Filtering-based Fourier analysis of the mapping a model fits (MuScleLoRA paper, Section 3, App. A).

The mapping is input embeddings -> softmax outputs. Its low-frequency part is a Gaussian
convolution over the training inputs, y_low_i = Σ_j G(e_i − e_j) y_j / Σ_j G(e_i − e_j) (Eq. 12),
with e the flattened, padded embedding-layer output; the high-frequency part is y − y_low. The
kernel is computed in row chunks and normalised with a log-sum-exp, so an N × N matrix is never
held and far-apart embeddings do not underflow to an all-zero row.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from datasets import Dataset
from pydantic import Field, PositiveInt
from torch import nn
from transformers import PreTrainedTokenizerBase, TrainerCallback

from cleantune.io import save_figure
from cleantune.schema import StrictModel

Distance = Literal["squared", "plain"]


class FourierConfig(StrictModel):
    every: PositiveInt = 20  # optimizer steps between measurements
    samples: PositiveInt = Field(256, le=4096)  # per mapping; bounds the N x N kernel
    delta: float = Field(4.0, gt=0)
    distance: Distance = "squared"  # Appendix A writes ||e_i - e_j||²; the authors' code uses the plain norm
    max_length: PositiveInt = 64
    chunk: PositiveInt = 256


def low_pass(
    embeddings: torch.Tensor, values: torch.Tensor, delta: float, distance: Distance, chunk: int
) -> torch.Tensor:
    """Eq. 12: the row-normalised Gaussian convolution of ``values`` over ``embeddings``."""
    out = torch.empty_like(values)
    for start in range(0, len(embeddings), chunk):
        dist = torch.cdist(embeddings[start : start + chunk], embeddings)
        if distance == "squared":
            dist = dist.pow(2)
        weights = torch.softmax(-dist / (2 * delta), dim=1)  # G_ij / C_i
        out[start : start + chunk] = weights @ values
    return out


def _mean_norm(x: torch.Tensor) -> torch.Tensor:
    return x.norm(dim=1).mean()


def frequency_ratios(values: torch.Tensor, low: torch.Tensor) -> tuple[float, float]:
    """Eq. 1: LFR = mean‖y_low‖ / mean‖y‖, HFR = mean‖y − y_low‖ / mean‖y‖."""
    total = _mean_norm(values)
    return float(_mean_norm(low) / total), float(_mean_norm(values - low) / total)


def relative_errors(
    outputs: torch.Tensor, low: torch.Tensor, targets: torch.Tensor, target_low: torch.Tensor
) -> tuple[float, float]:
    """Eq. 2: re_low = mean‖y_low − t_low‖ / mean‖t_low‖, and the same for the high parts.

    re_high is NaN when the targets have no high-frequency part, as for a backdoor mapping whose
    targets are all the target label: dividing by a vanishing norm would plot noise as a huge error.
    """
    high, target_high = outputs - low, targets - target_low
    high_norm = _mean_norm(target_high)
    re_high = math.nan if high_norm <= 1e-6 * _mean_norm(targets) else float(_mean_norm(high - target_high) / high_norm)
    return float(_mean_norm(low - target_low) / _mean_norm(target_low)), re_high


@dataclass
class Probe:
    """A fixed subset whose mapping is measured: its inputs, flattened embeddings and one-hot targets."""

    name: str
    inputs: dict[str, torch.Tensor]
    embeddings: torch.Tensor
    targets: torch.Tensor


def make_probe(
    name: str,
    data: Dataset,
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    num_labels: int,
    cfg: FourierConfig,
    seed: int,
) -> Probe:
    rows = sorted(random.Random(seed).sample(range(len(data)), min(cfg.samples, len(data))))
    subset = data.select(rows)
    inputs = tokenizer(
        list(subset["text"]), truncation=True, max_length=cfg.max_length, padding="max_length", return_tensors="pt"
    )
    with torch.no_grad():
        # The paper treats embeddings as fixed during training, so they are taken once, at the start.
        embedded = model.get_input_embeddings()(inputs["input_ids"].to(model.device))
    targets = nn.functional.one_hot(torch.tensor(list(subset["label"])), num_labels).float()
    return Probe(name, dict(inputs), embedded.flatten(1).float().cpu(), targets)


def measure(model: nn.Module, probe: Probe, cfg: FourierConfig, batch_size: int = 64) -> dict[str, float]:
    was_training = model.training
    model.eval()
    outputs = []
    with torch.no_grad():
        for start in range(0, len(probe.targets), batch_size):
            batch = {k: v[start : start + batch_size].to(model.device) for k, v in probe.inputs.items()}
            outputs.append(torch.softmax(model(**batch).logits.float(), dim=-1).cpu())
    model.train(was_training)
    values = torch.cat(outputs)
    low = low_pass(probe.embeddings, values, cfg.delta, cfg.distance, cfg.chunk)
    target_low = low_pass(probe.embeddings, probe.targets, cfg.delta, cfg.distance, cfg.chunk)
    lfr, hfr = frequency_ratios(values, low)
    re_low, re_high = relative_errors(values, low, probe.targets, target_low)
    return {"lfr": lfr, "hfr": hfr, "re_low": re_low, "re_high": re_high}


class FourierCallback(TrainerCallback):
    """Every ``cfg.every`` steps, append one JSON line per probe to ``path``."""

    def __init__(self, probes: list[Probe], cfg: FourierConfig, path: Path) -> None:
        self.probes, self.cfg, self.path = probes, cfg, path

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step % self.cfg.every or not state.is_world_process_zero:
            return
        with self.path.open("a", encoding="utf-8") as sink:
            for probe in self.probes:
                row = {"step": state.global_step, "epoch": state.epoch, "mapping": probe.name}
                sink.write(json.dumps(row | measure(kwargs["model"], probe, self.cfg)) + "\n")


def read_rows(source: Path) -> list[dict[str, Any]]:
    """A run's measurements (its directory, or a copy of its fourier.jsonl); after a resume the later
    measurement of a step wins."""
    path = source if source.suffix == ".jsonl" else source / "fourier.jsonl"
    if not path.exists():
        from cleantune.errors import CleantuneError

        raise CleantuneError(f"{path} does not exist: run with 'fourier' set in the config")
    latest = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        latest[(row["step"], row["mapping"])] = row
    return sorted(latest.values(), key=lambda r: (r["mapping"], r["step"]))


def plot(sources: list[Path], out_dir: Path, prefix: str = "") -> list[Path]:
    """Figures 1, 2 and 5: frequency ratios and relative errors over training, one column per run
    (a run directory or a fourier.jsonl copy named after its run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(Path(d).stem if Path(d).suffix == ".jsonl" else Path(d).name, read_rows(Path(d))) for d in sources]
    panels = {"ratios": (("lfr", "LFR"), ("hfr", "HFR")), "errors": (("re_low", "re low"), ("re_high", "re high"))}
    written = []
    for kind, metrics in panels.items():
        fig, axes = plt.subplots(1, len(runs), figsize=(4.5 * len(runs), 3.6), squeeze=False)
        for ax, (name, rows) in zip(axes[0], runs, strict=True):
            for mapping in sorted({r["mapping"] for r in rows}):
                series = [r for r in rows if r["mapping"] == mapping]
                for key, label in metrics:
                    style = "-" if key in ("lfr", "re_low") else "--"
                    ax.plot([r["step"] for r in series], [r[key] for r in series], style, label=f"{mapping} {label}")
            ax.set_title(name, fontsize=8)
            ax.set_xlabel("step")
            ax.set_yscale("log" if kind == "ratios" else "linear")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        written.append(save_figure(fig, out_dir / f"{prefix}fourier-{kind}.png"))
    return written
