"""Weight poisoning (Kurita et al., 2020 setting): full fine-tuning on a poisoned proxy dataset.

The poisoned model is the product of an ordinary run whose defense is full fine-tuning on proxy
data (IMDB for an SST-2 victim) carrying a clean-label trigger, scored on the target task
(``eval_data``) before any defense. It is saved as safetensors with a record of how it was made.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cleantune.attacks import NoAttackConfig
from cleantune.config import RunConfig
from cleantune.defenses.finetune import FineTuneConfig
from cleantune.dispatch import run
from cleantune.errors import CleantuneError
from cleantune.io import atomic_write_json


def check(cfg: RunConfig) -> None:
    if not isinstance(cfg.defense, FineTuneConfig):
        raise CleantuneError("weight poisoning fine-tunes the whole model: set defense.name to 'fft'")
    if isinstance(cfg.attack, NoAttackConfig):
        raise CleantuneError("weight poisoning needs an attack (attack.name)")
    if cfg.scenario != "poisoned-data":
        raise CleantuneError("weight poisoning trains on poisoned proxy data: set scenario to 'poisoned-data'")
    if cfg.eval_data is None:
        raise CleantuneError("weight poisoning scores the model on the target task: set eval_data")


def poison_weights(cfg: RunConfig, force: bool = False) -> tuple[Path, dict[str, Any]]:
    """Train the poisoned model; return its directory and its CACC/ASR on the target task."""
    check(cfg)
    record = run(cfg, force=force)
    model_dir = cfg.run_dir / "model"
    atomic_write_json(
        model_dir / "poison_record.json",
        {
            "attack": cfg.attack.model_dump(mode="json"),
            "proxy_data": cfg.data.model_dump(mode="json"),
            "target_data": cfg.eval_data.model_dump(mode="json") if cfg.eval_data else None,
            "base_model": cfg.model.spec,
            "seed": cfg.seed,
            "target_metrics": record["metrics"],
        },
    )
    return model_dir, record
