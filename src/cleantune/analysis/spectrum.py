"""Spectral analysis of a LoRA-family adapter against the weights it adapts (RoRA paper, Section 4.3).

Per adapted layer: the spectral-strength ratio σ_max(W_pre) / σ_max(ΔW) (Figure 1) and the largest
|cosine| between ΔW's leading singular vectors and the top singular vectors of W_pre (Figure 2).
Then CACC and ASR for a global post-training scale s that replaces LoRA's α/r, W = W_pre + s·BA, on
the trained update before any rescale of RoRA's (Figure 3; its axis runs to s = 128).
ASR here is the evaluator's measurement for analysis; no defense ever sees it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from pydantic import Field

from cleantune.config import read_yaml, validate
from cleantune.defenses.peft_baselines import ADAPTER, lora_layers
from cleantune.errors import CleantuneError
from cleantune.io import atomic_write_json, read_json, save_figure
from cleantune.models import Loaded, load_model
from cleantune.pipeline import Prepared, evaluate_loaded, prepare
from cleantune.schema import StrictModel


class SpectrumConfig(StrictModel):
    top: int = Field(32, gt=0)  # W_pre's top singular vectors that alignment is measured against
    scales: list[float] = Field([0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0], min_length=1)


def layer_spectrum(w_pre: torch.Tensor, delta: torch.Tensor, top: int) -> dict[str, float]:
    U, S, Vh = torch.linalg.svd(w_pre.float(), full_matrices=False)
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    k = min(top, S.numel())
    return {
        "sigma_pre": float(S[0]),
        "sigma_delta": float(s[0]),
        "strength_ratio": float(S[0] / s[0]) if s[0] > 0 else float("inf"),
        "left_alignment": float((U[:, :k].T @ u[:, 0]).abs().max()),
        "right_alignment": float((Vh[:k] @ vh[0]).abs().max()),
    }


def spectra(model: PeftModel, top: int, rescaled: dict[str, float]) -> dict[str, dict[str, float]]:
    with torch.no_grad():
        return {
            name: layer_spectrum(
                layer.get_base_layer().weight, layer.get_delta_weight(ADAPTER) / rescaled.get(name, 1.0), top
            )
            for name, layer in lora_layers(model).items()
        }


def scale_sweep(
    prepared: Prepared, loaded: Loaded, scales: list[float], rescaled: dict[str, float]
) -> list[dict[str, Any]]:
    """CACC/ASR with ΔW = s·BA for each s; ``rescaled`` holds the factors a RoRA run folded into B, which
    are divided out first, so that every run is swept from its trained update (s = α/r is LoRA's)."""
    layers = lora_layers(loaded.model)
    unknown = sorted(set(rescaled) - set(layers))
    if unknown:
        raise CleantuneError(f"the run rescaled layers its adapter does not have: {', '.join(unknown)}")
    trained = {
        name: layer.lora_B[ADAPTER].weight.detach() / (rescaled.get(name, 1.0) * layer.scaling[ADAPTER])
        for name, layer in layers.items()
    }
    rows = []
    for s in scales:
        with torch.no_grad():
            for name, layer in layers.items():
                layer.lora_B[ADAPTER].weight.copy_(s * trained[name])
        metrics = evaluate_loaded(prepared, loaded)
        rows.append({"scale": s, "cacc": metrics["cacc"], "asr": metrics["asr"]})
    return rows


def rescale_factors(run_dir: Path) -> dict[str, float]:
    """The factors a RoRA run multiplied its top layers' B by (none for other runs)."""
    return read_json(run_dir / "metrics.json").get("defense_info", {}).get("rescale", {})


def analyze(run_dir: Path, cfg: SpectrumConfig) -> dict[str, Any]:
    """Spectra and the scale sweep of a finished run with a LoRA or DoRA adapter, both of the trained
    update (before a RoRA rescale); kept in spectrum.json."""
    adapter = run_dir / "adapter"
    if not (adapter / "adapter_config.json").exists():
        raise CleantuneError(f"{run_dir} holds no PEFT adapter: the spectrum needs a LoRA-family run")
    init = str(read_json(adapter / "adapter_config.json").get("init_lora_weights"))
    if init.startswith(("pissa", "olora")):
        # Their base layers hold W_res, not W_pre, so the ratios would describe the wrong matrix.
        raise CleantuneError(f"{run_dir}: spectra of {init} adapters are not supported (the base holds W_res)")
    prepared = prepare(validate(read_yaml(run_dir / "config.yaml"), str(run_dir / "config.yaml")))
    loaded = load_model(str(adapter), num_labels=prepared.eval_splits.num_labels)
    rescaled = rescale_factors(run_dir)
    result = {
        "run_dir": str(run_dir),
        "top": cfg.top,
        "layers": spectra(loaded.model, cfg.top, rescaled),
        "scale_sweep": scale_sweep(prepared, loaded, cfg.scales, rescaled),
    }
    atomic_write_json(run_dir / "spectrum.json", result)
    return result


def plot(results: list[dict[str, Any]], out_dir: Path, prefix: str = "") -> list[Path]:
    """Figures 1-3: one line per run over layers (ratio, alignment) and over the global scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = {
        "strength": ("strength_ratio", "σ_max(W_pre) / σ_max(ΔW)", "log"),
        "alignment": ("left_alignment", f"max |cos(u₁(ΔW), U_pre[:, :{results[0]['top']}])|", "linear"),
    }
    written = []
    for kind, (key, ylabel, yscale) in figures.items():
        fig, ax = plt.subplots(figsize=(7, 3.8))
        for result in results:
            names = list(result["layers"])
            ax.plot(
                range(len(names)), [result["layers"][n][key] for n in names], "o-", label=Path(result["run_dir"]).name
            )
        ax.set_xticks(range(len(names)), [n.split("model.")[-1] for n in names], rotation=75, fontsize=6)
        ax.set(ylabel=ylabel, yscale=yscale)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        written.append(save_figure(fig, out_dir / f"{prefix}spectrum-{kind}.png"))
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for result in results:
        sweep = result["scale_sweep"]
        name = Path(result["run_dir"]).name
        ax.plot([r["scale"] for r in sweep], [r["cacc"] for r in sweep], "o-", label=f"{name} CACC")
        ax.plot([r["scale"] for r in sweep], [r["asr"] for r in sweep], "s--", label=f"{name} ASR")
    ax.set(xlabel="post-training scale s (replaces α/r)", ylabel="%", xscale="symlog", xlim=(0, None))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    written.append(save_figure(fig, out_dir / f"{prefix}spectrum-scale.png"))
    return written
