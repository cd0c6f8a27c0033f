"""The ``cleantune`` command line: purify, train, run, poison, eval, list, models, bench, report, analyze."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable
from contextlib import redirect_stdout
from functools import wraps
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from cleantune.errors import CleantuneError

HELP = {"help_option_names": ["-h", "--help"]}
app = typer.Typer(
    help="Remove backdoors from language models with parameter-efficient fine-tuning.",
    no_args_is_help=True,
    context_settings=HELP,
    rich_markup_mode=None,
)
poison_app = typer.Typer(help="Write a poisoned dataset or a weight-poisoned model.", no_args_is_help=True)
app.add_typer(poison_app, name="poison")
analyze_app = typer.Typer(help="Analyses of finished runs.", no_args_is_help=True)
app.add_typer(analyze_app, name="analyze")
console = Console(stderr=True, soft_wrap=True)  # an error stays one line, however long
RESULTS = [sys.stdout]  # where results go: stdout as the command found it (training logs go to stderr)


def results() -> Console:
    return Console(file=RESULTS[0])


ConfigArg = Annotated[Path | None, typer.Argument(help="Run config (YAML); default: the embedded demo config.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Run again, replacing a run directory made by another config.")]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="Override a config field: key.path=value (repeatable).")
]


def version(show: bool) -> None:
    if show:
        from cleantune import __version__

        print(f"cleantune {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    _: Annotated[bool, typer.Option("--version", callback=version, is_eager=True, help="Print the version.")] = False,
) -> None:
    """Remove backdoors from language models with parameter-efficient fine-tuning."""


def friendly(command: Callable[..., Any]) -> Callable[..., Any]:
    """Bad input ends with one line naming the problem, not a traceback; progress and training logs
    go to stderr, so stdout holds only the results."""

    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        # Deprecation notices between transformers and peft are for their developers, not our users.
        warnings.filterwarnings("ignore", category=FutureWarning)
        notes = logging.getLogger("cleantune")
        if not notes.handlers:
            from rich.logging import RichHandler

            notes.addHandler(RichHandler(console=console, show_time=False, show_path=False))
            notes.setLevel(logging.INFO)
        RESULTS[0] = sys.stdout
        try:
            with redirect_stdout(sys.stderr):
                return command(*args, **kwargs)
        except CleantuneError as err:
            console.print(f"[bold red]error:[/] {err}", highlight=False)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            console.print("interrupted: run the same command again to resume from the last checkpoint")
            raise typer.Exit(130) from None

    return wrapper


def quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


def classification_config(config: Path | None, overrides: list[str] | None, command: str) -> Any:
    from cleantune.config import RunConfig

    cfg = any_config(config, overrides)
    if not isinstance(cfg, RunConfig):
        raise CleantuneError(
            f"`cleantune {command}` works on classification configs; a generative backdoor is injected "
            "by `cleantune run` with scenario poisoned-data"
        )
    return cfg


HEADERS = {"cacc": "CACC", "asr": "ASR", "delta": "Δ", "ftr": "false-trigger", "ppl": "perplexity"}


def show_table(title: str, rows: dict[str, dict[str, Any]]) -> None:
    """One row of metrics per named model (CACC / ASR / Δ, or the generative ones)."""
    first = next(iter(rows.values()))
    keys = ("asr", "ftr", "ppl") if "ftr" in first else ("cacc", "asr", "delta")
    named = list(rows) != [""]
    table = Table(title=title)
    if named:
        table.add_column("model")
    for key in keys:
        table.add_column(HEADERS[key], justify="right")
    for name, metrics in rows.items():
        cells = ["-" if metrics.get(k) is None else f"{metrics[k]:.2f}" for k in keys]
        table.add_row(*([name] if named else []), *cells)
    results().print(table)


def show_metrics(title: str, metrics: dict[str, Any]) -> None:
    show_table(title, {"": metrics})


@app.command()
@friendly
def run(config: ConfigArg = None, set_: SetOpt = None, force: ForceOpt = False) -> None:
    """Attack -> defense -> train -> evaluate; results go to OUTPUT_DIR/NAME. A run directory made by
    another config is refused (--force replaces it); an interrupted run resumes."""
    cfg = any_config(config, set_)
    from cleantune.dispatch import run as run_pipeline

    record = run_pipeline(cfg, force=force)
    attack = cfg.attack.name if cfg.attack else "no"
    reference = (record.get("train_filter") or {}).get("reference_metrics")
    if reference:  # a training-set filter: its reference model is the undefended fine-tune
        from cleantune.api import verdict

        rows = {f"{cfg.defense.under.name} (undefended)": reference, cfg.defense.name: record["metrics"]}
        show_table(f"{cfg.name}: {attack} attack", rows)
        results().print(verdict(reference, record["metrics"], cfg.defense.name), highlight=False)
    elif not record["metrics"]:  # eval.enabled false: only the product matters (a signature variant)
        results().print(f"{cfg.name}: trained, not evaluated (eval.enabled is false)", highlight=False)
    else:
        show_metrics(f"{cfg.name}: {attack} attack, {cfg.defense.name} defense", record["metrics"])
    console.print(f"run directory: {cfg.run_dir}")


def any_config(config: Path | None, overrides: list[str] | None) -> Any:
    from cleantune.io import read_yaml

    if config is not None:
        read_yaml(config)  # a YAML typo is reported before torch loads
    from cleantune.config import load_config

    quiet_transformers()
    return load_config(config, overrides)


MethodOpt = Annotated[str | None, typer.Option(help="Defense to use instead of the default for this threat.")]
ReferenceOpt = Annotated[
    list[str] | None,
    typer.Option(
        help="A trusted clean model of the same vocabulary (repeatable): for a classifier, one of the same task the "
        "trigger must not move; for a generative model, one whose confidence in each found answer is subtracted "
        "('base': a scanned adapter's own base model)."
    ),
]


def show_product(record: dict[str, Any]) -> None:
    rows = {"before": record["before"]} if record.get("before") else {}
    show_table(Path(record["product"]).parent.name, rows | {"after": record["metrics"]})
    from cleantune.product import scan_summary

    for when, found in (record.get("scan") or {}).items():
        console.print(f"scan {when}: {scan_summary(found)}")
    console.print(f"product: {record['product']} (model card: README.md inside)")


@app.command()
@friendly
def purify(
    suspicious: Annotated[str, typer.Argument(help="Suspicious model or PEFT adapter: directory or hub id.")],
    clean_data: Annotated[
        Path,
        typer.Option(
            help="Trusted clean data: CSV/TSV/JSON(L) with text and label, or instructions for a generative model."
        ),
    ],
    out: Annotated[Path, typer.Option(help="Run directory; the product goes inside.")],
    method: MethodOpt = None,
    seed: int = 42,
    set_: SetOpt = None,
    force: ForceOpt = False,
    scan: Annotated[bool, typer.Option(help="Scan the suspicious model and the product for a backdoor.")] = False,
    scan_threshold: Annotated[
        float | None, typer.Option(help="With --scan: flip rate (%) that means backdoored (see `cleantune scan`).")
    ] = None,
    scan_reference: ReferenceOpt = None,
) -> None:
    """Purify SUSPICIOUS with clean data. The task is read from the model; an adapter in gives an
    adapter out on the same base; `cleantune list` shows the methods."""
    quiet_transformers()
    from cleantune.api import purify as purify_model
    from cleantune.scanner import settings_for

    if (scan_threshold is not None or scan_reference) and not scan:
        raise CleantuneError("--scan-threshold and --scan-reference go with --scan")
    chosen = {"threshold": scan_threshold} | ({"reference": scan_reference} if scan_reference else {})
    scanning = settings_for(suspicious, chosen) if scan else None
    show_product(purify_model(suspicious, clean_data, out, method, set_, seed, force, scanning))


@app.command()
@friendly
def scan(
    model: Annotated[str, typer.Argument(help="Classifier or PEFT adapter to scan: directory or hub id.")],
    clean_data: Annotated[Path, typer.Option(help="Clean labelled data: CSV/TSV/JSON(L) with text and label.")],
    out: Annotated[Path, typer.Option(help="Where the result goes (JSON).")],
    threshold: Annotated[
        float | None,
        typer.Option(help="Score (%) that means backdoored, measured on clean models of the same task."),
    ] = None,
    reference: ReferenceOpt = None,
    set_: SetOpt = None,
) -> None:
    """Scan MODEL for a backdoor without its trigger: invert a short trigger for every label pair and
    measure how many clean inputs it flips. Without --threshold it reports the score, no verdict."""
    quiet_transformers()
    from cleantune.config import overridden
    from cleantune.scanner import scan as scan_model
    from cleantune.scanner import settings_for

    chosen = {"threshold": threshold} | ({"reference": reference} if reference else {})
    found = scan_model(model, clean_data, out, settings_for(model, overridden(chosen, set_)))
    if "pairs" in found:
        table = Table(title=f"scan of {model}")
        against = bool(found["config"]["reference"])
        for column in (
            "source",
            "target",
            "flip rate %",
            *(["in references %"] if against else []),
            "trigger",
            "inputs",
        ):
            table.add_column(column)
        for pair in found["pairs"]:
            names = [found["labels"][pair["source"]], found["labels"][pair["target"]]]
            moved = [f"{pair['reference_flip_rate']:.1f}"] if against else []
            table.add_row(*names, f"{pair['flip_rate']:.1f}", *moved, " ".join(pair["trigger"]), str(pair["n"]))
    else:
        table = Table(title=f"scan of {model}: the answers it continues most confidently")
        against = bool(found["references"])
        for column in ("score %", *(["its confidence %", "reference's %"] if against else []), "target"):
            table.add_column(column)
        for candidate in found["candidates"][:5]:
            parts = [candidate["confidence"], candidate["reference"]] if against else []
            table.add_row(*(f"{v:.1f}" for v in (candidate["score"], *parts)), candidate["target"])
    results().print(table)
    verdict = found["verdict"] or "no verdict (give --threshold, measured on clean models of this task)"
    results().print(f"score {found['score']:.1f} %: {verdict}; written to {out}", highlight=False)


@app.command()
@friendly
def train(
    data: Annotated[Path, typer.Argument(help="Suspicious training data: a CSV/TSV/JSON(L) file.")],
    out: Annotated[Path, typer.Option(help="Run directory; the product goes inside.")],
    model: Annotated[
        str, typer.Option(help="Model to fine-tune: directory or hub id.")
    ] = "sentence-transformers/all-MiniLM-L6-v2",
    method: MethodOpt = None,
    dev: Annotated[Path | None, typer.Option(help="Trusted clean dev file (with --test); else DATA is split.")] = None,
    test: Annotated[Path | None, typer.Option(help="Trusted clean test file (with --dev).")] = None,
    seed: int = 42,
    set_: SetOpt = None,
    force: ForceOpt = False,
) -> None:
    """Train a classifier on data that may be poisoned, with the data defense the benchmarks support."""
    quiet_transformers()
    from cleantune.api import train as train_model

    show_product(train_model(data, out, model, method, set_, seed, force, dev, test))


@app.command("list")
@friendly
def list_all() -> None:
    """Defenses with the threat models they handle, attacks, and the models available offline."""
    from cleantune.catalog import catalog

    out = results()
    for title, columns, rows in catalog():
        table = Table(title=title)
        for column in columns:
            table.add_column(column)
        for row in rows:
            table.add_row(*row)
        out.print(table)


@poison_app.command("data")
@friendly
def poison_data(
    config: ConfigArg = None,
    out: Annotated[Path, typer.Option(help="Directory for train.jsonl, test_poison.jsonl, record.json.")] = Path(
        "poisoned"
    ),
    set_: SetOpt = None,
) -> None:
    """Write the poisoned training set and the triggered test set of CONFIG's attack."""
    from cleantune.attacks import attack_data
    from cleantune.data import load_splits
    from cleantune.io import atomic_dir, atomic_write_json

    cfg = classification_config(config, set_, "poison data")
    splits = load_splits(cfg.data, cfg.seed)
    poisoned = attack_data(cfg.attack, splits, cfg.data.data_dir, cfg.seed, train=True)
    with atomic_dir(out) as tmp:
        poisoned.train.to_json(tmp / "train.jsonl")
        poisoned.test_poison.to_json(tmp / "test_poison.jsonl")
        atomic_write_json(
            tmp / "record.json",
            {"attack": cfg.attack.model_dump(mode="json"), "seed": cfg.seed, "poisoned_idx": poisoned.poisoned_idx},
        )
    console.print(f"{len(poisoned.poisoned_idx)} of {len(poisoned.train)} training examples poisoned -> {out}")


@poison_app.command("weights")
@friendly
def poison_weights(
    config: Annotated[Path, typer.Argument(help="Run config of the proxy training.")], set_: SetOpt = None
) -> None:
    """Full fine-tune on poisoned proxy data; save the poisoned model; score it on the target task."""
    from cleantune.attacks.weight_poison import poison_weights as make

    model_dir, record = make(classification_config(config, set_, "poison weights"))
    show_metrics("poisoned model on the target task, before any defense", record["metrics"])
    console.print(f"poisoned model: {model_dir}")


@app.command("eval")
@friendly
def evaluate(
    model: Annotated[str, typer.Argument(help="Model or PEFT adapter: directory or hub id.")],
    config: ConfigArg = None,
    set_: SetOpt = None,
    out: Annotated[Path | None, typer.Option(help="Also write the metrics as JSON here.")] = None,
) -> None:
    """Score MODEL on CONFIG's clean test split (CACC) and triggered test set (ASR); for a
    task: generation config, judged ASR, false-trigger rate and perplexity."""
    cfg = any_config(config, set_)
    from cleantune.dispatch import evaluate as score
    from cleantune.io import atomic_write_json

    metrics = score(cfg, model)
    show_metrics(str(model), metrics)
    if out:
        atomic_write_json(out, metrics)


@app.command()
@friendly
def models() -> None:
    """List the hub ids that resolve offline, and where their packaged copies lie."""
    from cleantune.offline import offline_models

    table = Table(title="Models available offline")
    table.add_column("hub id")
    table.add_column("packaged copy")
    for spec, where in offline_models().items():
        table.add_row(spec, where)
    results().print(table)


@app.command()
@friendly
def bench(
    suite: Annotated[Path, typer.Argument(help="Suite YAML, e.g. benchmarks/smoke.yaml.")],
    only: Annotated[
        list[str] | None,
        typer.Option(
            help="Run only cells whose id contains this text (repeat for several), and the poisoned models they use; "
            "poison-NAME runs that poisoned-model job alone."
        ),
    ] = None,
    recheck: Annotated[
        bool,
        typer.Option(
            "--recheck",
            help="Rerun the selected finished cells from nothing (in <runs_dir>/recheck) and compare every "
            "number with the recorded row, into <suite>.recheck.csv; exit 1 if one differs.",
        ),
    ] = False,
    reading: Annotated[
        list[str] | None,
        typer.Option(
            help="Scan with this reading of the suite's scan section alone (repeat for several; main: the main "
            "reading), e.g. one added after the rest ran; each row keeps what its other readings recorded."
        ),
    ] = None,
) -> None:
    """Run a suite's matrix, one run per cell; finished cells are skipped, failed ones recorded."""
    from cleantune.bench.runner import run_suite

    if recheck and reading:
        raise CleantuneError("--reading goes with a run, not with --recheck (a recheck reruns no scans)")
    if recheck:
        from cleantune.bench.recheck import recheck_suite

        checked = recheck_suite(suite, only=only)
        console.print(f"{checked['same']} reproduced, {checked['different']} differ, {checked['failed']} failed")
        if checked["different"] or checked["failed"]:
            raise typer.Exit(1)
        return
    summary = run_suite(suite, only=only, readings=reading)
    console.print(f"{summary['done']} done, {summary['failed']} failed, {summary['skipped']} already finished")
    if summary["failed"]:
        raise typer.Exit(1)


@app.command()
@friendly
def report(
    suite: Annotated[str, typer.Argument(help="Suite name or YAML path.")],
    check: bool = typer.Option(False, "--check", help="Exit non-zero if a cell violates the suite's expected bounds."),
) -> None:
    """Write benchmarks/reports/<suite>.md and its plots from the suite's CSV."""
    from cleantune.bench.report import write_report

    path, violations = write_report(suite)
    console.print(f"report: {path}")
    for line in violations:
        console.print(f"[red]violated:[/] {line}", highlight=False)
    if check and violations:
        raise typer.Exit(1)


@analyze_app.command("fourier")
@friendly
def analyze_fourier(
    run_dirs: Annotated[list[Path], typer.Argument(help="Run directories recorded with 'fourier' set; a column each.")],
    out: Annotated[Path | None, typer.Option(help="Where the PNGs go; default: the first run directory.")] = None,
) -> None:
    """Plot frequency ratios (paper Fig. 1) and relative errors (Figs. 2, 5) of clean and backdoor mappings."""
    from cleantune.analysis.fourier import plot

    for path in plot(run_dirs, out or run_dirs[0]):
        console.print(f"wrote {path}")


@analyze_app.command("spectrum")
@friendly
def analyze_spectrum(
    run_dirs: Annotated[list[Path], typer.Argument(help="Finished runs with a LoRA or DoRA adapter.")],
    out: Annotated[Path | None, typer.Option(help="Where the PNGs go; default: the first run directory.")] = None,
    top: Annotated[int, typer.Option(min=1, help="W_pre's top singular vectors for the alignment figure.")] = 32,
    scale: Annotated[list[float] | None, typer.Option(help="Scales s to sweep (ΔW = s·BA); repeatable.")] = None,
    redo: Annotated[bool, typer.Option(help="Recompute runs that already hold a spectrum.json.")] = False,
) -> None:
    """Spectral strength and alignment of each adapted layer, and CACC/ASR under a global scale (RoRA Figs. 1-3)."""
    from cleantune.analysis.spectrum import SpectrumConfig, analyze, plot
    from cleantune.io import read_json

    cfg = SpectrumConfig(top=top, **({"scales": scale} if scale else {}))
    results = [
        read_json(d / "spectrum.json") if (d / "spectrum.json").exists() and not redo else analyze(d, cfg)
        for d in run_dirs
    ]
    for path in plot(results, out or run_dirs[0]):
        console.print(f"wrote {path}")


@analyze_app.command("sanity")
@friendly
def analyze_sanity(
    model: Annotated[str, typer.Argument(help="Backdoored LLM: a PEFT adapter, or a full model with --base.")],
    config: Annotated[Path, typer.Argument(help="A task: generation config naming the attack and prompts.")],
    set_: SetOpt = None,
    base: Annotated[str | None, typer.Option(help="The model a full backdoored model was fine-tuned from.")] = None,
    block: Annotated[
        list[int] | None,
        typer.Option(min=1, help="How many consecutive blocks the block ablations remove (repeat for several)."),
    ] = None,
    out: Annotated[Path, typer.Option(help="Where sanity.json and sanity.md go.")] = Path("sanity"),
) -> None:
    """Where the backdoor lives (signature purification, Table 1): ASR with parts of the poisoned update removed."""
    from cleantune.config import RunConfig
    from cleantune.generative.sanity import analyze

    cfg = any_config(config, set_)
    if isinstance(cfg, RunConfig):
        raise CleantuneError("the sanity checks take a generative config (task: generation)")
    analyze(cfg, model, base, block or [4], out)  # prints each edit's ASR and false-trigger rate as measured
    console.print(f"wrote {out / 'sanity.md'}")


@analyze_app.command("cost")
@friendly
def analyze_cost(
    config: Annotated[Path, typer.Argument(help="Run config: model, data, attack and training settings.")],
    defense: Annotated[list[str], typer.Option(help="A defense section as YAML, e.g. '{name: lora}'; repeatable.")],
    steps: Annotated[int, typer.Option(min=1, help="Training steps timed per defense and round.")] = 20,
    repeats: Annotated[int, typer.Option(min=1, help="Rounds; defenses alternate within each.")] = 2,
    set_: SetOpt = None,
    out: Annotated[Path | None, typer.Option(help="Also write the timings as JSON here.")] = None,
) -> None:
    """Seconds per training step of each defense in one process; ratios to the first one."""
    import json
    import shlex

    import yaml

    from cleantune.analysis.cost import compare, parse_defense
    from cleantune.io import atomic_write_json

    parsed = [parse_defense(yaml.safe_load(text)) for text in defense]
    result = compare(classification_config(config, set_, "analyze cost"), parsed, steps, repeats)
    results().print_json(json.dumps(result))
    if out:
        options = [("--defense", d) for d in defense] + [("--set", kv) for kv in set_ or []]
        flags = [x for pair in options for x in pair] + ["--steps", str(steps), "--repeats", str(repeats)]
        command = shlex.join(["cleantune", "analyze", "cost", str(config), *flags, "--out", str(out)])
        atomic_write_json(out, {**result, "command": command, "config": str(config), "defenses": defense})


def main() -> None:
    app()
