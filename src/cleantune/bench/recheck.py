"""Rerun finished cells from nothing and compare every number with the recorded row.

A refactor, a dependency upgrade or a new machine should change no result; ``cleantune bench --recheck``
shows it cell by cell. The selected cells, and the poisoned models they load, run again in their own
runs folder (``<runs_dir>/recheck``), so the recorded runs and the results table stay as they are, and
with their own cache, so a cached teacher or variant made by older code is made again.
Each compared number becomes a row of ``<results_dir>/<suite>.recheck.csv``: the recorded value, the
rerun's, whether they are equal to the last digit the CSV holds, and both commits.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from cleantune.bench.runner import progress_bar, read_results, results_path, row_for, run_cell, select, upsert
from cleantune.bench.suite import cells, load_suite
from cleantune.errors import CleantuneError
from cleantune.io import read_json

COLUMNS = [
    "suite", "cell", "metric", "recorded", "rerun", "same", "recorded_commit", "rerun_commit", "checked_utc",
    "recorded_libraries", "rerun_libraries",
]  # fmt: skip
# Timings, memory and bookkeeping: they are expected to move from run to run.
UNCOMPARED = {"wall_s", "train_s", "setup_s", "peak_mem_mb", "seed", "resumed"}
SCAN_COLUMNS = "scan_"  # a suite's scans of its products (``ScanSection``): a recheck reruns the runs only


def recheck_path(results_dir: Path, suite: str) -> Path:
    return results_dir / f"{suite}.recheck.csv"


def comparable(key: str, value: Any) -> bool:
    number = isinstance(value, int | float) and not isinstance(value, bool)
    return number and key not in UNCOMPARED and not key.endswith("_s") and not key.startswith(SCAN_COLUMNS)


def equal(recorded: float, rerun: float) -> bool:
    return (math.isnan(recorded) and math.isnan(rerun)) or recorded == rerun


def compared(recorded: dict[str, Any], rerun: dict[str, Any]) -> list[dict[str, Any]]:
    """One entry per number either row holds (one that only one of them has compares with NaN: not the same)."""
    keys = [k for k, v in recorded.items() if comparable(k, v) and not math.isnan(v)]
    keys += [k for k, v in rerun.items() if comparable(k, v) and k not in keys and not math.isnan(v)]
    out = []
    for key in keys:
        old, new = recorded.get(key, math.nan), rerun.get(key, math.nan)
        old, new = float(math.nan if old is None else old), float(math.nan if new is None else new)
        out.append({"metric": key, "recorded": old, "rerun": new, "same": equal(old, new)})
    return out


def recorded_rows(path: Path) -> dict[str, dict[str, Any]]:
    if not path.exists():
        raise CleantuneError(f"{path}: no recorded results to recheck; run the suite first")
    # Each float read back exactly as the CSV wrote it, so equality means "to the last digit".
    table = read_results(path)
    table = table[table.status == "done"]
    return {str(row["cell"]): {k: v for k, v in row.items() if not pd.isna(v)} for row in table.to_dict("records")}


def recheck_suite(path: Path, only: list[str] | None = None) -> dict[str, int]:
    """Rerun the selected finished cells; counts of cells that reproduced, differed, or failed to run."""
    suite = load_suite(path)
    recorded = recorded_rows(results_path(suite))
    scratch = suite.model_copy(update={"runs_dir": suite.runs_dir / "recheck"})
    todo = select(cells(scratch), only)
    if not any(cell.id in recorded for cell in todo):
        raise CleantuneError(f"suite {suite.suite}: no finished cell recorded in {results_path(suite)} to recheck")
    out = recheck_path(suite.results_dir, suite.suite)
    summary = {"same": 0, "different": 0, "failed": 0}
    fresh = {"CLEANTUNE_CACHE": str((scratch.runs_dir / "cache").resolve())}
    with progress_bar() as progress:
        overall = progress.add_task(f"recheck {suite.suite}", total=len(todo))
        current = progress.add_task("", total=None)
        for index, cell in enumerate(todo, 1):
            done = cell.config.run_dir / "metrics.json"  # an interrupted recheck keeps what it finished
            record = read_json(done) if done.exists() else run_cell(scratch, cell, progress, current, fresh)
            progress.advance(overall)
            if cell.id not in recorded:
                continue  # a poisoned model run only because a selected cell loads it
            if record is None:
                summary["failed"] += 1
                line = f"failed (see {cell.config.run_dir.parent / cell.id}.log)"
            else:
                line = report_cell(out, suite.suite, recorded[cell.id], row_for(scratch, cell, record), summary)
            progress.console.print(f"[{index}/{len(todo)}] {cell.id}: {line}", markup=False, highlight=False)
    return summary


def report_cell(out: Path, suite: str, recorded: dict[str, Any], rerun: dict[str, Any], summary: dict[str, int]) -> str:
    """Record one cell's comparison; the line the console shows for it."""
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    common = {"suite": suite, "cell": rerun["cell"], "recorded_commit": recorded.get("commit")}
    common |= {"rerun_commit": rerun.get("commit"), "checked_utc": stamp}
    common |= {"recorded_libraries": recorded.get("libraries"), "rerun_libraries": rerun.get("libraries")}
    rows = [common | entry for entry in compared(recorded, rerun)]
    upsert(out, rows, COLUMNS)
    differing = [r for r in rows if not r["same"]]
    summary["different" if differing else "same"] += 1
    if not differing:
        return f"the same {len(rows)} numbers"
    return "different: " + ", ".join(f"{r['metric']} {r['recorded']!r} -> {r['rerun']!r}" for r in differing)
