"""A suite's scans: each cell's model scanned as a defender would scan it, then compared with what was
planted, on the evaluator's side.

The scan runs in its own ``cleantune scan`` process (as a cell runs in its own ``cleantune run``), on a
copy of the cell's product that holds only what a downloaded model holds: weights, config and
tokenizer, not the run's records (a weight-poisoned model's ``poison_record.json`` names its trigger).
The result is saved in the run directory (``scan.json``; a named variant's ``scan-NAME.json``) and
reused while the model, the clean data and the scan settings are unchanged. A reading's clean
reference models may be cells of the suite (clean ones, the defender's own): their products are used.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from cleantune.bench.suite import Cell, ScanSection, SuiteConfig
from cleantune.config import AnyRunConfig
from cleantune.data import DataConfig, load_splits
from cleantune.generative.judges import backdoorllm_judge
from cleantune.io import atomic_write_text, read_json

# What a model downloaded from a hub holds; everything else in a product folder stays behind.
SHIPPED = (
    "*.safetensors", "config.json", "adapter_config.json", "generation_config.json", "tokenizer*",
    "special_tokens_map.json", "vocab.*", "merges.txt", "added_tokens.json", "*.model", "chat_template.*",
)  # fmt: skip


def clean_file(suite: SuiteConfig, section: ScanSection) -> Path:
    """The clean data the scanner gets: the named file, or the data set's dev split written once to
    a file named after its settings (so a changed setting is a new file, never a reused one)."""
    if section.clean_file is not None:
        return section.clean_file
    tree = {"data_dir": str(suite.data_dir), **(section.clean_data or {})}
    digest = hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:12]
    path = suite.runs_dir / suite.suite / f"scan-clean-{digest}.jsonl"
    if not path.exists():
        splits = load_splits(DataConfig.model_validate(tree), seed=42)
        # Label indices, as the models were trained on them, so the scan's label pairs read the same.
        lines = [json.dumps({"text": r["text"], "label": r["label"]}) for r in splits.dev]
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def shipped_copy(product: Path, view: Path) -> Path:
    """``product`` as a downloaded model: its shipped files alone, in ``view``."""
    shutil.rmtree(view, ignore_errors=True)
    view.mkdir(parents=True)
    for pattern in SHIPPED:
        for source in product.glob(pattern):
            shutil.copy2(source, view / source.name)
    return view


def reusable(found: dict[str, Any] | None, settings: dict[str, Any], product: Path, view: Path, data: Path) -> bool:
    """Whether a saved scan was made of this model and clean data with these settings, defaults included
    (a changed default is a changed scan). A setting the saved scan predates counts at its default."""
    from cleantune.scanner import settings_for  # torch: only when a suite scans

    if found is None or found.get("model") != str(view) or found.get("clean_data") != str(data):
        return False
    resolved = settings_for(product, settings).model_dump(mode="json")
    return all(found["config"].get(key, value) == value for key, value in resolved.items())


def run_scan(
    suite: SuiteConfig, prefix: str, cell: Cell, product: Path, references: dict[str, Path | None]
) -> dict[str, Any] | str:
    """The cell's scan result for one reading (reused when still valid), or the error that stopped it.
    ``references``: the products of the suite's reference cells (None: the cell made none)."""
    assert suite.scan is not None
    run_dir, name = cell.config.run_dir, prefix.removesuffix("_").replace("_", "-")
    out, view, data = run_dir / f"{name}.json", run_dir / "scan-view", clean_file(suite, suite.scan).resolve()
    settings = suite.scan.readings()[prefix]
    named = [str(r) for r in settings.get("reference", [])]
    missing = [r for r in named if r in references and references[r] is None]
    if missing:
        return f"reference cell {missing[0]} has no product (it failed)"
    if named:
        settings = settings | {"reference": [str(references.get(r) or r) for r in named]}
    found = read_json(out) if out.exists() else None
    if reusable(found, settings, product, view, data):
        return found or {}
    sets = [item for key, value in settings.items() for item in ("--set", f"{key}={json.dumps(value)}")]
    command = [sys.executable, "-m", "cleantune", "scan", str(view), "--clean-data", str(data), "--out", str(out)]
    log = run_dir.parent / f"{cell.id}.{name}.log"
    try:
        shipped_copy(product, view)
        with log.open("wb") as sink:
            code = subprocess.run([*command, *sets], stdout=sink, stderr=subprocess.STDOUT).returncode
    finally:
        shutil.rmtree(view, ignore_errors=True)
    if code != 0 or not out.exists():
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        return (lines or ["no output"])[-1][:500]
    return read_json(out)


def planted_words(cfg: AnyRunConfig) -> list[str]:
    """The words of a classifier attack's trigger (BadNet's words, AddSent's sentence); none for a
    paraphrase trigger, whose trigger is a style rather than words."""
    attack = cfg.attack
    words = list(getattr(attack, "triggers", None) or [])
    sentence = getattr(attack, "sentence", None)
    return [w.lower() for w in [*words, *(sentence.split() if isinstance(sentence, str) else [])]]


def scan_columns(cfg: AnyRunConfig, record: dict[str, Any], found: dict[str, Any], prefix: str = "scan_") -> dict:
    """The scan's numbers for the results row, each named with ``prefix``, and how they compare with
    what was planted (the run's attack; ``record``: the run's metrics record, whose label names the
    scan's label pair is read in)."""
    row: dict[str, Any] = {"scan_score": found["score"], "scan_s": found.get("seconds")}
    row["scan_verdict"] = found.get("verdict")  # the scan's own, where its settings gave a threshold
    if "labels" in found:  # a classifier's scan: a trigger for a label pair
        tokens = [t.removeprefix("##").lower() for t in found["trigger"]]
        labels = record.get("labels") or found["labels"]
        row |= {"scan_trigger": " ".join(found["trigger"]), "scan_target": labels[found["target"]]}
        words = planted_words(cfg)
        target = getattr(cfg.attack, "target_label", None)
        row["scan_target_found"] = None if target is None else found["target"] == target
        row["scan_trigger_found"] = bool(set(tokens) & set(words)) if words else None
    else:  # a generative scan: the answer the model continues to across clean prompts
        row["scan_trigger"] = found["target"]
        behaviour = getattr(cfg.attack, "behaviour", None)
        judge = backdoorllm_judge(behaviour) if behaviour else None  # its broad keywords suit a short answer
        row["scan_target_found"] = None if judge is None else judge([""], [found["target"]])[0]
    return {prefix + key.removeprefix("scan_"): value for key, value in row.items()}
