"""One place that sends a run or an evaluation to its task's pipeline (classification or generation)."""

from __future__ import annotations

import shutil
from typing import Any

from cleantune import pipeline
from cleantune.config import AnyRunConfig, RunConfig, made_differently
from cleantune.generative import pipeline as generative
from cleantune.rundir import claim_run_dir


def run(cfg: AnyRunConfig, force: bool = False) -> dict[str, Any]:
    """Run ``cfg``. A finished run is returned as it is and an interrupted one resumes, if the same
    config made it; ``force`` runs again (from scratch when another config made the directory)."""
    done = claim_run_dir(cfg, force)
    if done is not None:
        return done
    if isinstance(cfg, RunConfig):
        prepared: Any = pipeline.prepare(cfg)
        execute: Any = pipeline.execute
    else:
        prepared, execute = generative.prepare(cfg), generative.execute
    if force and made_differently(cfg):  # only once the inputs are known to be good
        shutil.rmtree(cfg.run_dir, ignore_errors=True)
    fresh = not cfg.run_dir.exists()
    try:
        return execute(prepared)
    except Exception:
        if fresh and not (cfg.run_dir / "checkpoints").exists():  # nothing to resume: leave nothing behind
            shutil.rmtree(cfg.run_dir, ignore_errors=True)
        raise


def evaluate(cfg: AnyRunConfig, spec: str) -> dict[str, Any]:
    """CACC/ASR of a trained model or adapter (``spec``) on what ``cfg`` describes; for generation,
    judged ASR, false-trigger rate and perplexity."""
    if isinstance(cfg, RunConfig):
        return pipeline.evaluate(cfg, spec)
    return generative.evaluate(cfg, spec)
