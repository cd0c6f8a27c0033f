"""A benchmark suite is data: a YAML matrix of datasets x models x attacks x defenses x seeds.

Each axis maps a short name to a fragment of a run config; a cell's config is the deep merge
``base <- dataset <- model <- attack <- defense <- matching overrides``. ``matrix`` lists blocks,
each a product of axis names (default: one block of every name); ``poisoned_models`` are
weight-poisoning runs made before the cells that use them (``model.spec: poisoned:NAME``).
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, model_validator

from cleantune.config import AnyRunConfig, read_yaml, validate
from cleantune.errors import CleantuneError
from cleantune.schema import StrictModel

Fragment = dict[str, Any]
AXES = ("dataset", "model", "attack", "defense")
POISONED_PREFIX = "poisoned:"
BEFORE_DEFENSE = "before defense"  # the defense name of a poisoned model's own row


class Rule(StrictModel):
    match: dict[str, str | int] = Field(default_factory=dict)  # axis name (or "seed") -> value
    set: Fragment = Field(default_factory=dict)


class Expectation(StrictModel):
    match: dict[str, str | int] = Field(default_factory=dict)
    bounds: dict[str, str]  # metric -> "<= 20", ">= 80"


class PoisonedModel(StrictModel):
    """A weight-poisoning job; ``coords`` place its before-defense row in the report's tables."""

    coords: dict[str, str] = Field(default_factory=dict)  # axis -> name; defense is "before defense"
    config: Fragment
    # Make (or reuse) the model in that suite's runs folder, so suites share one poisoned model;
    # the runner refuses it if that suite made it with a different config.
    shared_with: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$")


class ProtocolRow(StrictModel):
    """One line of a paper suite's protocol table: what the paper did and what this suite does."""

    setting: str
    paper: str
    used: str
    why: str = ""  # why ``used`` departs from ``paper``; empty where they agree


class OpenReading(StrictModel):
    """A point the paper can be read more than one way, and the suite's defense rows that read it each
    way, compared in the report on the rows ``match`` picks (e.g. one dataset, one seed)."""

    point: str  # e.g. "rescaled layers"
    readings: dict[str, str] = Field(min_length=2)  # defense -> the reading it runs
    match: dict[str, str | int] = Field(default_factory=dict)


class PaperNumbers(StrictModel):
    """A paper table's numbers for this suite's rows: defense -> attack -> metric -> value."""

    source: str  # e.g. "Table 2, BERT-large, SST-2"
    rows: dict[str, dict[str, dict[str, float]]]
    # Which of the suite's defenses stand beside a paper row, when not (only) the one of its name:
    # e.g. the method under two settings a protocol question left open.
    beside: dict[str, list[str]] = Field(default_factory=dict)


class ScanSection(StrictModel):
    """Scan each cell's model as a defender would (``cleantune scan``): without the trigger, from a
    copy holding only what a downloaded model holds, with the clean data named here."""

    # The clean data the scanner gets: a data set whose dev split is written out (classifiers), or a
    # file used as it is (labelled texts for a classifier, instructions for a generative model).
    clean_data: Fragment | None = None
    clean_file: Path | None = None
    settings: Fragment = Field(default_factory=dict)  # scan settings (``ScanConfig`` / ``TargetInversionConfig``)
    # Other readings scanned as well, each by name over ``settings`` (columns ``scan_<name>_*``), so
    # that a population decides between them (one trigger slot against three, say).
    variants: dict[str, Fragment] = Field(default_factory=dict)
    # The cells are a population of clean and backdoored models (backdoored: trained on poisoned
    # data, or weight-poisoned): the report gives AUROC and the true-positive rate at this
    # false-positive rate (%).
    population: bool = False
    fpr: float = Field(5.0, gt=0, lt=100)
    # Scan only the cells whose id contains one of these texts (as ``--only`` selects); none: every cell.
    # A scan at the default settings costs about as much as a MiniLM row: ablation rows may go without.
    cells: list[str] = Field(default_factory=list)
    # Other suites whose scans before and after their defenses (readings with a threshold) this
    # report gathers in one table: the scanner measured here, used on their poisoned models and products.
    gather: list[str] = Field(default_factory=list)

    def readings(self) -> dict[str, Fragment]:
        """Each reading's column prefix and its full settings: the main one first."""
        return {"scan_": self.settings} | {f"scan_{n}_": {**self.settings, **v} for n, v in self.variants.items()}

    def prefixes(self, names: list[str]) -> list[str]:
        """The column prefixes of the readings called ``names`` (``main``: the main reading)."""
        unknown = [n for n in names if n != "main" and n not in self.variants]
        if unknown:
            raise CleantuneError(f"no scan reading {unknown[0]!r} (readings: {', '.join(['main', *self.variants])})")
        return ["scan_" if n == "main" else f"scan_{n}_" for n in names]

    def scans(self, cell_id: str) -> bool:
        return not self.cells or named(cell_id, self.cells)

    def references(self) -> set[str]:
        """What the readings name as clean reference models (``reference``): this suite's cells among
        them are trained first and their products used; they are not scanned or counted in the population."""
        return {str(name) for settings in self.readings().values() for name in settings.get("reference", [])}

    @model_validator(mode="after")
    def _one_source(self) -> ScanSection:
        if (self.clean_data is None) == (self.clean_file is None):
            raise ValueError("give exactly one of clean_data (a data set) and clean_file")
        return self


class SuiteConfig(StrictModel):
    suite: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    data_dir: Path = Path("../shared/datasets")
    runs_dir: Path = Path("benchmarks/runs")
    results_dir: Path = Path("benchmarks/results")
    reports_dir: Path = Path("benchmarks/reports")
    command: str = ""  # the command that regenerates this suite's results, quoted in its report
    base: Fragment = Field(default_factory=dict)
    poisoned_models: dict[str, PoisonedModel] = Field(default_factory=dict)
    dataset: dict[str, Fragment]
    model: dict[str, Fragment]
    attack: dict[str, Fragment]
    defense: dict[str, Fragment]
    seeds: list[int] = Field(default_factory=lambda: [42], min_length=1)
    # Blocks of axis -> names; a block's optional ``seed`` list replaces ``seeds`` for its cells (e.g.
    # extra seeds for a few rows, to show their spread, without rerunning the whole suite).
    matrix: list[dict[str, list[str] | list[int]]] | None = None
    overrides: list[Rule] = Field(default_factory=list)
    expect: list[Expectation] = Field(default_factory=list)
    # Suites whose results lie beside this one's and whose rows on the same poisoned models join this
    # report's tables, so a defense is read against baselines run elsewhere on the same models.
    compare_with: list[str] = Field(default_factory=list)
    # A paper suite's report opens with these: its protocol, then the paper's numbers beside ours, one
    # table per paper table the suite's rows reproduce (main results, ablations, other PEFT methods).
    protocol: list[ProtocolRow] = Field(default_factory=list)
    paper: list[PaperNumbers] = Field(default_factory=list)
    open_readings: list[OpenReading] = Field(default_factory=list)
    scan: ScanSection | None = None

    @model_validator(mode="after")
    def _sections_name_defenses(self) -> SuiteConfig:
        """The report sections that name defenses (paper beside, open_readings) name only the suite's."""
        named = {f"open reading '{r.point}'": list(r.readings) for r in self.open_readings}
        for table in self.paper:
            for row, ours in table.beside.items():
                if row not in table.rows:
                    raise ValueError(f"paper ({table.source}) beside names '{row}', not one of that table's rows")
                named[f"paper ({table.source}) beside '{row}'"] = ours
        for where, names in named.items():
            unknown = [name for name in names if name not in self.defense]
            if unknown:
                raise ValueError(f"{where} names {', '.join(unknown)}, not among the suite's defenses")
        return self


@dataclass(frozen=True)
class Cell:
    id: str
    coords: dict[str, Any]  # axis -> name, plus seed (and scenario, for a poisoning job)
    config: AnyRunConfig
    poisons: bool = False  # a weight-poisoning job rather than a defense run


def named(cell_id: str, texts: list[str]) -> bool:
    """Whether a cell is picked by texts such as ``--only`` gives: its id contains one of them."""
    return any(text in cell_id for text in texts)


def merge(base: Fragment, extra: Fragment) -> Fragment:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = (
            merge(out[key], value)
            if isinstance(value, dict) and isinstance(out.get(key), dict)
            else copy.deepcopy(value)
        )
    return out


def matches(match: dict[str, Any], coords: dict[str, Any]) -> bool:
    return all(str(coords.get(k)) == str(v) for k, v in match.items())


def load_suite(path: Path) -> SuiteConfig:
    from pydantic import ValidationError

    try:
        return SuiteConfig.model_validate(read_yaml(path))
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise CleantuneError(f"invalid suite {path}: {problems}") from None


def _home(suite: SuiteConfig, job: str) -> Path:
    """The runs folder of a poisoned-model job: this suite's, or the suite it is shared with."""
    return suite.runs_dir / (suite.poisoned_models[job].shared_with or suite.suite)


def _with_paths(suite: SuiteConfig, tree: Fragment, name: str, home: Path | None = None) -> Fragment:
    defaults = {
        "name": name,
        "output_dir": str(home or suite.runs_dir / suite.suite),
        "data": {"data_dir": str(suite.data_dir)},
    }
    tree = merge(defaults, tree)
    if "eval_data" in tree:
        tree["eval_data"] = merge({"data_dir": str(suite.data_dir)}, tree["eval_data"])
    return _poisoned_paths(suite, tree, name)


def _poisoned_paths(suite: SuiteConfig, value: Any, name: str) -> Any:
    """``value`` with every ``poisoned:NAME`` (a model spec, a signature's source) replaced by the
    folder that poisoned-model job leaves."""
    if isinstance(value, dict):
        return {key: _poisoned_paths(suite, item, name) for key, item in value.items()}
    if isinstance(value, list):
        return [_poisoned_paths(suite, item, name) for item in value]
    if not (isinstance(value, str) and value.startswith(POISONED_PREFIX)):
        return value
    source = value.removeprefix(POISONED_PREFIX)
    if source not in suite.poisoned_models:
        raise CleantuneError(f"suite {suite.suite}: cell {name} uses unknown poisoned model '{source}'")
    return str(_home(suite, source) / f"poison-{source}" / _product(suite, source))


def _product(suite: SuiteConfig, job: str) -> str:
    """The folder a poisoned-model job leaves: a model, or the adapter of a generative LoRA injection."""
    tree = merge(suite.base, suite.poisoned_models[job].config)
    defense = tree.get("defense", {})
    lora = defense.get("name") == "sft" and defense.get("method", "lora") == "lora"
    return "adapter" if tree.get("task") == "generation" and lora else "model"


def blocks(suite: SuiteConfig) -> list[dict[str, list[str] | list[int]]]:
    if suite.matrix is None:
        return [{axis: list(getattr(suite, axis)) for axis in AXES}]
    for block in suite.matrix:
        for axis, names in block.items():
            if axis == "seed":
                continue
            if axis not in AXES:
                raise CleantuneError(
                    f"suite {suite.suite}: matrix axis '{axis}' is not one of {', '.join(AXES)} or seed"
                )
            unknown = [n for n in names if n not in getattr(suite, axis)]
            if unknown:
                raise CleantuneError(f"suite {suite.suite}: matrix names unknown {axis} {', '.join(map(str, unknown))}")
        missing = [axis for axis in AXES if axis not in block]
        if missing:
            raise CleantuneError(f"suite {suite.suite}: a matrix block lacks {', '.join(missing)}")
    return suite.matrix


def cells(suite: SuiteConfig) -> list[Cell]:
    """Every cell, poisoned-model jobs first; each config is validated before anything runs."""
    out = []
    for name, job in suite.poisoned_models.items():
        cell_id = f"poison-{name}"
        tree = _with_paths(suite, merge(suite.base, job.config), cell_id, _home(suite, name))
        attack = tree.get("attack", {}).get("name", "none")
        # The poisoned model's own row belongs beside the defenses applied to it.
        coords = {"dataset": "proxy", "model": name, "attack": attack, "scenario": "poisoned-weights", **job.coords}
        coords |= {"defense": BEFORE_DEFENSE, "seed": tree.get("seed", 42)}
        out.append(Cell(cell_id, coords, validate(tree, f"{suite.suite}:{cell_id}"), poisons=True))
    for block in blocks(suite):
        for combo in itertools.product(*(block[axis] for axis in AXES), block.get("seed", suite.seeds)):
            *picked, seed = combo
            names = [str(n) for n in picked]
            coords = {**dict(zip(AXES, names, strict=True)), "seed": seed}
            cell_id = "__".join(names) + f"__s{seed}"
            tree = suite.base
            for axis, name in zip(AXES, names, strict=True):
                tree = merge(tree, getattr(suite, axis)[name])
            for rule in suite.overrides:
                if matches(rule.match, coords):
                    tree = merge(tree, rule.set)
            tree = _with_paths(suite, merge(tree, {"seed": seed}), cell_id)
            out.append(Cell(cell_id, coords, validate(tree, f"{suite.suite}:{cell_id}")))
    unmatched = [t for t in (suite.scan.cells if suite.scan else []) if not any(named(c.id, [t]) for c in out)]
    if unmatched:
        raise CleantuneError(f"suite {suite.suite}: scan.cells '{unmatched[0]}' names no cell of the suite")
    return out


def dump(cfg: AnyRunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
