"""Run a suite cell by cell, each as its own ``cleantune run`` process.

A process per cell keeps peak memory per cell honest and lets one cell crash without taking the
suite down. Finished cells (a ``metrics.json`` in their run directory) are skipped; an interrupted
cell resumes from its last checkpoint; a failed cell is recorded with its error and the suite
goes on. Rows are upserted by cell id into ``<results_dir>/<suite>.csv`` with an atomic rewrite.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import pandas as pd
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from cleantune.bench.scanning import run_scan, scan_columns
from cleantune.bench.suite import Cell, SuiteConfig, cells, dump, load_suite, named
from cleantune.config import RunConfig, made_differently
from cleantune.errors import CleantuneError
from cleantune.io import atomic_write_text, read_json

COLUMNS = [
    "suite", "cell", "dataset", "model", "scenario", "attack", "defense", "seed",
    "cacc", "asr", "delta", "dev_accuracy", "wall_s", "train_s", "setup_s", "peak_mem_mb",
    "trainable_params", "total_params", "n_train", "n_poisoned", "n_test", "n_test_poison",
    "resumed", "status", "error", "run_dir",
]  # fmt: skip
LINE_SPLIT = re.compile(rb"[\r\n]+")
# One-off work a run relies on, paid once and then reused from a cache: W2SDefense's teacher,
# signature purification's variant fine-tunes. Part of the defense's cost even in a run that reused it.
SETUP_KEYS = ("teacher_train_s", "variant_cost_s")


def flat_numbers(info: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers a defense recorded about its run (e.g. the teacher's dev accuracy, MuScleLoRA's
    regime), nested keys joined by '_'; per-layer tables (RoRA's scale factors) are left to the run."""
    flat: dict[str, float] = {}
    for key, value in info.items():
        if isinstance(value, dict) and all(not isinstance(v, dict) for v in value.values()) and key != "rescale":
            flat |= flat_numbers(value, f"{prefix}{key}_")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat[f"{prefix}{key}"] = value
    return flat


def results_path(suite: SuiteConfig) -> Path:
    return suite.results_dir / f"{suite.suite}.csv"


def row_for(suite: SuiteConfig, cell: Cell, record: dict[str, Any] | None, error: str = "") -> dict[str, Any]:
    from cleantune.rundir import library_set

    row = {
        "suite": suite.suite, "cell": cell.id, "scenario": cell.config.scenario, **cell.coords,
        "run_dir": str(cell.config.run_dir), "status": "failed" if record is None else "done", "error": error,
    }  # fmt: skip
    if record is not None:
        metrics = record["metrics"]
        peak = record.get("peak_gpu_mb") or record.get("peak_rss_mb")
        row |= {k: metrics.get(k) for k in ("cacc", "asr", "delta", "n_test", "n_test_poison")}
        row |= {k: record.get(k) for k in ("wall_s", "trainable_params", "total_params", "n_train", "n_poisoned")}
        row["commit"] = record.get("commit")
        row["libraries"] = library_set(record.get("versions"))
        train = record.get("train") or {}  # evaluation-only runs train nothing
        best = train.get("best_dev_accuracy")
        row |= {"dev_accuracy": best * 100 if best is not None else None, "peak_mem_mb": peak}
        row["train_s"] = train.get("train_runtime_s")
        # A run resumed after an interruption timed only its last process: the report leaves it out of costs.
        row["resumed"] = train.get("resumed_from") is not None
        row |= {f"loss_{name}": value for name, value in (train.get("loss_terms") or {}).items()}
        info = record.get("defense_info") or {}
        row["setup_s"] = next((info[k] for k in SETUP_KEYS if k in info), None)
        row |= {f"info_{k}": v for k, v in flat_numbers(info).items() if k not in SETUP_KEYS}
        filtering = record.get("train_filter") or {}  # training-set filters (BKI, CUBE): evaluator-side detection
        row |= {f"filter_{k}": filtering.get(k) for k in ("removed", "precision", "recall") if k in filtering}
        # Defense-specific numbers (a defense's extra metrics) become extra columns.
        row |= {k: v for k, v in metrics.items() if k not in row and not k.startswith("n_")}
    return row


def read_results(csv: Path) -> pd.DataFrame:
    """A suite's results table, every number as written; a scan's target and trigger stay text (a label
    named "1" must not come back as 1.0, nor be written back so)."""
    words = [c for c in pd.read_csv(csv, nrows=0).columns if c.endswith(("_target", "_trigger"))]
    return pd.read_csv(csv, dtype=dict.fromkeys(words, str), float_precision="round_trip")


def upsert(path: Path, rows: list[dict[str, Any]], columns: list[str] = COLUMNS) -> None:
    """Replace the rows of the cells in ``rows`` (a cell may have several) and rewrite atomically."""
    table = read_results(path) if path.exists() else pd.DataFrame(columns=columns)
    table = table[~table["cell"].isin({row["cell"] for row in rows})]
    table = pd.concat([table, pd.DataFrame(rows)], ignore_index=True)
    ordered = [c for c in columns if c in table.columns] + [c for c in table.columns if c not in columns]
    atomic_write_text(path, table[ordered].to_csv(index=False))


def last_error(log: Path) -> str:
    """cleantune's own one-line error if the child printed one, else its last line (the exception)."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    explicit = [line for line in lines if line.startswith("error:")]
    return (explicit or lines or ["no output"])[-1][:500]


def run_cell(
    suite: SuiteConfig, cell: Cell, progress: Progress, task: Any, env: dict[str, str] | None = None
) -> dict[str, Any] | None:
    """Run one cell in a child process (``env`` added to its environment), mirroring its progress line;
    its metrics, or None if it failed."""
    cell_dir = cell.config.run_dir
    cell_dir.parent.mkdir(parents=True, exist_ok=True)
    config_path = cell_dir.parent / f"{cell.id}.yaml"
    atomic_write_text(config_path, dump(cell.config))
    log = cell_dir.parent / f"{cell.id}.log"
    # Generative backdoors are injected by an ordinary poisoned-data run.
    verb = ["poison", "weights"] if cell.poisons and isinstance(cell.config, RunConfig) else ["run"]
    command = [sys.executable, "-m", "cleantune", *verb, str(config_path)]
    with log.open("wb") as sink:
        # Unbuffered, so the log and the progress line follow the child as it runs.
        child_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=child_env)
        stdout = cast(io.BufferedReader, child.stdout)  # a pipe, buffered
        for chunk in iter(lambda: stdout.read1(4096), b""):
            sink.write(chunk)
            sink.flush()
            lines = [x for x in LINE_SPLIT.split(chunk) if x.strip()]
            if lines:
                progress.update(task, description=f"{cell.id}: {lines[-1].decode(errors='replace')[-80:]}")
        code = child.wait()
    metrics = cell_dir / "metrics.json"
    return read_json(metrics) if code == 0 and metrics.exists() else None


def conflict(cell: Cell) -> str:
    """Why the cell's run directory cannot be reused (it was made by another config), or ''."""
    changed = made_differently(cell.config)
    if not changed:
        return ""
    return (
        f"{cell.config.run_dir} was made by a different config ({', '.join(changed)} changed; was the suite "
        "edited?); remove it to rerun this cell"
    )


def strings(value: Any) -> set[str]:
    """Every text in a config tree."""
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        return set().union(*(strings(item) for item in value))
    return {value} if isinstance(value, str) else set()


def select(all_cells: list[Cell], only: list[str] | None) -> list[Cell]:
    """Cells whose id contains any text in ``only``, and the poisoned-model jobs those cells load or
    ``only`` names (``poison-NAME`` picks that job alone)."""
    if not only:
        return all_cells
    chosen = [c for c in all_cells if not c.poisons and named(c.id, only)]
    used = set().union(*(strings(c.config.model_dump(mode="json")) for c in chosen))  # model.spec, signature_from
    products = ("model", "adapter")  # a poisoned model, or the adapter of a generative injection
    jobs = [
        c
        for c in all_cells
        if c.poisons and (named(c.id, only) or any(str(c.config.run_dir / p) in used for p in products))
    ]
    return jobs + chosen


def with_references(todo: list[Cell], everything: list[Cell], names: set[str]) -> list[Cell]:
    """``todo`` with the scan's reference cells before the cells scanned against them."""
    references = [c for c in everything if c.id in names]
    return [c for c in todo if c.poisons] + references + [c for c in todo if not c.poisons and c.id not in names]


def progress_bar() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=False
    )


def recorded_readings(table: pd.DataFrame | None, cell_id: str, prefixes: list[str], keep: list[str]) -> dict:
    """The columns the readings in ``keep`` recorded for the cell, as its row holds them (a column
    belongs to the longest reading prefix it starts with: ``scan_`` is every reading's)."""
    if table is None or cell_id not in set(table["cell"]):
        return {}
    row = table[table["cell"] == cell_id].iloc[0]
    owner = {c: max((p for p in prefixes if c.startswith(p)), key=len, default="") for c in table.columns}
    return {c: row[c] for c in table.columns if owner[c] in keep and pd.notna(row[c])}


def run_suite(path: Path, only: list[str] | None = None, readings: list[str] | None = None) -> dict[str, int]:
    """Run the selected cells (``only``) and scan their models; ``readings`` scans with those readings
    alone (by name, ``main`` for the main one), each row keeping what the others recorded."""
    suite = load_suite(path)
    names = suite.scan.references() if suite.scan is not None else set()
    if readings and suite.scan is None:
        raise CleantuneError(f"{path}: the suite has no scan section, so no scan readings to choose")
    prefixes = list(suite.scan.readings()) if suite.scan is not None else []
    scanned = suite.scan.prefixes(readings) if suite.scan is not None and readings else prefixes
    every = cells(suite)  # each config validated once
    todo = with_references(select(every, only), every, names)
    references: dict[str, Path | None] = {}
    out = results_path(suite)
    kept = [p for p in prefixes if p not in scanned]
    recorded = read_results(out) if kept and out.exists() else None
    summary = {"done": 0, "failed": 0, "skipped": 0}
    started = time.time()
    log_run(suite, started, None, only=only, readings=readings)
    with progress_bar() as progress:
        overall = progress.add_task(f"suite {suite.suite}", total=len(todo))
        current = progress.add_task("", total=None)
        for index, cell in enumerate(todo, 1):
            existing = cell.config.run_dir / "metrics.json"
            reason = conflict(cell)
            record: dict[str, Any] | None = None
            if reason:
                row, outcome = row_for(suite, cell, None, reason), "failed"
            elif existing.exists():
                record = read_json(existing)
                row, outcome = row_for(suite, cell, record), "skipped"
            else:
                progress.update(current, description=f"{cell.id}: starting")
                record = run_cell(suite, cell, progress, current)
                log = cell.config.run_dir.parent / f"{cell.id}.log"
                row = row_for(suite, cell, record, "" if record else last_error(log))
                outcome = "done" if record else "failed"
            product = record.get("product") if record else None
            if cell.id in names:
                references[cell.id] = Path(product) if product else None
            elif record is not None and product and suite.scan is not None and suite.scan.scans(cell.id):
                row |= recorded_readings(recorded, cell.id, prefixes, kept)
                for prefix in scanned:
                    progress.update(current, description=f"{cell.id}: scanning ({prefix.strip('_')})")
                    found = run_scan(suite, prefix, cell, Path(product), references)
                    if isinstance(found, str):
                        row[f"{prefix}error"] = found
                    else:
                        row |= scan_columns(cell.config, record, found, prefix)
            upsert(out, [row])
            summary[outcome] += 1
            # A line per cell: the live bar does not show when the output is a file (nohup, CI).
            line = f"[{index}/{len(todo)}] {cell.id}: {outcome_text(outcome, row)}"
            progress.console.print(line, markup=False, highlight=False, soft_wrap=True)
            progress.advance(overall)
    log_run(suite, started, summary, only=only, readings=readings)
    return summary


def outcome_text(outcome: str, row: dict[str, Any]) -> str:
    if outcome == "failed":
        return f"failed: {row['error']}"
    scores = ", ".join(f"{k} {row[k]:.2f}" for k in ("cacc", "asr", "ftr", "ppl") if row.get(k) is not None)
    return f"{'done' if outcome == 'done' else 'already finished'} ({scores}; {row.get('wall_s') or 0:.0f} s)"


def runs_log_path(suite: SuiteConfig) -> Path:
    return suite.results_dir / f"{suite.suite}.runs.jsonl"


def log_run(suite: SuiteConfig, started: float, summary: dict[str, int] | None, **chosen: list[str] | None) -> None:
    """One line per ``cleantune bench`` invocation, so a report can quote how long the suite took.

    Opened (no ``wall_s``) when the invocation starts and completed when it ends: a killed one still shows.
    ``chosen``: what the invocation was told to run (``only``, ``readings``).
    """
    from cleantune.rundir import hardware

    stamp = datetime.fromtimestamp(started, tz=UTC).isoformat(timespec="seconds")
    opened = {"started_utc": stamp, **chosen, **hardware(), "wall_s": None}
    entry = opened if summary is None else opened | {"wall_s": round(time.time() - started, 1), **summary}
    path = runs_log_path(suite)
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    lines = [line for line in lines if line != json.dumps(opened)]
    atomic_write_text(path, "\n".join([*lines, json.dumps(entry)]) + "\n")
