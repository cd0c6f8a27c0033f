"""The front door: purify a suspicious model or adapter, or train on a suspicious data set, in one
call. Each builds an ordinary run config (saved in the run directory, reusable with ``cleantune
run``) with the method that cleantune's own benchmarks support for that threat."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from cleantune.config import AnyRunConfig, load_config, overridden, validate
from cleantune.errors import CleantuneError
from cleantune.io import read_json
from cleantune.models import Task, detect_task
from cleantune.offline import MINILM_ID

if TYPE_CHECKING:
    from cleantune.scanner import AnyScanConfig

log = logging.getLogger("cleantune")
METHODS = Path(__file__).parent / "defaults" / "methods.yaml"


def method_settings(task: Task, scenario: str, method: str | None) -> dict[str, Any]:
    preset = yaml.safe_load(METHODS.read_text())[task][scenario]
    if method is not None and method != preset["defense"]["name"]:
        return {**preset, "defense": {"name": method}}
    return preset


def _run_location(out: Path) -> dict[str, str]:
    return {"output_dir": str(out.parent), "name": out.name}


def _finish(cfg: AnyRunConfig, force: bool, before: dict | None = None, scanning: Scanning | None = None) -> dict:
    from cleantune.dispatch import run as run_pipeline
    from cleantune.product import describe

    record = run_pipeline(cfg, force=force)
    if not record.get("product"):
        return record
    card = Path(record["product"]) / "cleantune.json"
    if before is None and card.exists():  # a finished purification returned again keeps its first score
        before = read_json(card)["record"].get("before")
    if before is not None:
        record = {**record, "before": before, "warning": utility_warning(before, record["metrics"])}
        if record["warning"]:
            log.warning(record["warning"])
    if scanning is not None:
        scans: dict[str, str | Path] = {"before": scanning.suspicious, "after": Path(record["product"])}
        found = {when: scanning.scan(model, cfg.run_dir / f"scan-{when}.json") for when, model in scans.items()}
        record = {**record, "scan": found}
    if before is not None or scanning is not None:
        describe(Path(record["product"]), record, cfg.model_dump(mode="json"))
    return record


@dataclass(frozen=True)
class Scanning:
    """Trigger-free scans (``cleantune.scan``) of the suspicious model and of the product, each saved
    in the run directory and reused while its model and settings are unchanged."""

    cfg: AnyScanConfig
    clean_data: Path
    suspicious: str

    def scan(self, model: str | Path, path: Path) -> dict[str, Any]:
        from cleantune.scanner import scan

        found = read_json(path) if path.exists() else None
        if found is None or found.get("config") != self.cfg.model_dump(mode="json") or found["model"] != str(model):
            found = scan(model, self.clean_data, path, self.cfg)
        keys = ("score", "trigger", "target", "threshold", "verdict", "seconds")
        summary = {k: found[k] for k in keys if k in found} | {"file": path.name}
        if "labels" in found:  # a classifier's: the label pair the trigger flips, by name
            summary |= {"pair": [found["labels"][found["source"]], found["labels"][found["target"]]]}
            summary.pop("target")
        return summary


UTILITY_DROP = 5.0  # points of clean accuracy a purification may cost before the product is flagged


def utility_warning(before: dict[str, Any], after: dict[str, Any]) -> str | None:
    """A warning when purifying cost more than ``UTILITY_DROP`` points of clean accuracy."""
    drop = before["cacc"] - after["cacc"]
    if drop <= UTILITY_DROP:
        return None
    return (
        f"clean accuracy fell from {before['cacc']:.2f} to {after['cacc']:.2f}: this product is not a usable "
        "model; try more clean data, more epochs (--set train.epochs=N) or another --method"
    )


def purify_tree(suspicious: str, clean_data: str | Path, out: str | Path, method: str | None, seed: int) -> dict:
    """The run config ``purify`` runs: the task read from the model, the method from the threat."""
    out, data = Path(out), Path(clean_data).resolve()
    task = detect_task(suspicious)
    scenario = "poisoned-weights" if task == "classification" else "poisoned-llm"
    tree = {**_run_location(out), "seed": seed, "scenario": scenario, "model": {"spec": suspicious}}
    tree |= method_settings(task, scenario, method)
    if task == "classification":
        return tree | {"data": {"dataset": "local", "train": str(data)}}
    # The clean instructions train the defense; no triggered prompts exist, so nothing is judged.
    return tree | {"task": "generation", "data": {"train": [str(data)], "test": str(data)}, "eval": {"enabled": False}}


def purify(
    suspicious: str,
    clean_data: str | Path,
    out: str | Path,
    method: str | None = None,
    overrides: list[str] | None = None,
    seed: int = 42,
    force: bool = False,
    scan: AnyScanConfig | None = None,
) -> dict[str, Any]:
    """Fine-tune a suspicious model or adapter on trusted clean data into a clean product.

    ``clean_data`` is a CSV/TSV/JSON(L) file (text and label columns; split 80/10/10 with ``seed``)
    for a classifier, or an instruction file (instruction, input, output) for a generative model.
    An adapter in gives an adapter out on the same base. Returns the run record; the product and
    its model card lie under ``record["product"]``; ``record["before"]`` scores the suspicious
    classifier on the same clean test split. With ``scan`` (``cleantune.scanner.settings_for``),
    ``record["scan"]`` holds the trigger-free scans of the suspicious model and of the product.
    """
    from cleantune.dispatch import evaluate

    cfg = validate(overridden(purify_tree(suspicious, clean_data, out, method, seed), overrides), "purify options")
    fresh = cfg.task == "classification" and not (cfg.run_dir / "metrics.json").exists()
    before = evaluate(cfg, suspicious) if fresh else None  # on the same clean test split as after
    scanning = Scanning(scan, Path(clean_data), suspicious) if scan is not None else None
    return _finish(cfg, force, before, scanning)


def train(
    data: str | Path,
    out: str | Path,
    model: str = MINILM_ID,
    method: str | None = None,
    overrides: list[str] | None = None,
    seed: int = 42,
    force: bool = False,
    dev: str | Path | None = None,
    test: str | Path | None = None,
) -> dict[str, Any]:
    """Train a classifier on a data set that may hold poisoned examples, with the data defense
    cleantune's benchmarks support. ``data`` alone is split 80/10/10 with ``seed``; with ``dev``
    and ``test`` (trusted clean files) it is the training set as it is."""
    if (dev is None) != (test is None):
        raise CleantuneError("give both a dev and a test file, or neither (then the data file is split)")
    files = {"train": data} | ({"dev": dev, "test": test} if dev is not None else {})
    tree = {**_run_location(Path(out)), "seed": seed, "scenario": "poisoned-data", "model": {"spec": model}}
    tree |= method_settings("classification", "poisoned-data", method)
    tree |= {"data": {"dataset": "local", **{k: str(Path(v).resolve()) for k, v in files.items() if v is not None}}}
    return _finish(validate(overridden(tree, overrides), "train options"), force)


def run(
    config: str | Path | dict[str, Any] | AnyRunConfig, overrides: list[str] | None = None, force: bool = False
) -> dict:
    """Run a config given as a YAML path, a mapping or a validated config object."""
    from cleantune.dispatch import run as run_pipeline

    if isinstance(config, (str, Path)):
        cfg = load_config(Path(config), overrides)
    elif isinstance(config, dict):
        cfg = validate(overridden(config, overrides), "run config")
    else:
        if overrides:
            raise CleantuneError("overrides go with a config path or mapping, not a validated config")
        cfg = config
    return run_pipeline(cfg, force=force)


def verdict(undefended: dict[str, Any], defended: dict[str, Any], method: str) -> str:
    """One line on what a defense did to the backdoor, and what it cost, from two metric sets."""
    change = (
        f"ASR {undefended['asr']:.1f} -> {defended['asr']:.1f}, CACC {undefended['cacc']:.1f} -> {defended['cacc']:.1f}"
    )
    if defended["asr"] <= 25:
        return f"{method} removed the backdoor ({change})"
    if defended["asr"] < undefended["asr"] - 10:
        return f"{method} weakened the backdoor but did not remove it ({change})"
    return f"{method} did not remove the backdoor ({change})"
