"""The ``cleantune`` command line: run, poison, eval, models, bench, report."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from cleantune.errors import CleantuneError

app = typer.Typer(
    help="Remove backdoors from language models with parameter-efficient fine-tuning.", no_args_is_help=True
)
poison_app = typer.Typer(help="Write a poisoned dataset or a weight-poisoned model.", no_args_is_help=True)
app.add_typer(poison_app, name="poison")
analyze_app = typer.Typer(help="Analyses of finished runs.", no_args_is_help=True)
app.add_typer(analyze_app, name="analyze")
console = Console(stderr=True)

ConfigArg = Annotated[Path | None, typer.Argument(help="Run config (YAML); default: the embedded demo config.")]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="Override a config field: key.path=value (repeatable).")
]


def friendly(command: Callable[..., Any]) -> Callable[..., Any]:
    """Bad input ends with one line naming the problem, not a traceback."""

    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        # Deprecation notices between transformers and peft are for their developers, not our users.
        warnings.filterwarnings("ignore", category=FutureWarning)
        from transformers.utils import logging

        logging.set_verbosity_error()
        try:
            return command(*args, **kwargs)
        except CleantuneError as err:
            console.print(f"[bold red]error:[/] {err}", highlight=False)
            raise typer.Exit(2) from None

    return wrapper


def classification_config(config: Path | None, overrides: list[str] | None, command: str) -> Any:
    from cleantune.config import RunConfig, load_config

    cfg = load_config(config, overrides)
    if not isinstance(cfg, RunConfig):
        raise CleantuneError(
            f"`cleantune {command}` works on classification configs; a generative backdoor is injected "
            "by `cleantune run` with scenario poisoned-data"
        )
    return cfg


HEADERS = {"cacc": "CACC", "asr": "ASR", "delta": "Δ", "ftr": "false-trigger", "ppl": "perplexity"}


def show_metrics(title: str, metrics: dict[str, Any]) -> None:
    keys = ("asr", "ftr", "ppl") if "ftr" in metrics else ("cacc", "asr", "delta")
    table = Table(title=title)
    for key in keys:
        table.add_column(HEADERS[key], justify="right")
    table.add_row(*("-" if metrics.get(k) is None else f"{metrics[k]:.2f}" for k in keys))
    Console().print(table)


@app.command()
@friendly
def run(
    config: ConfigArg = None, set_: SetOpt = None, force: bool = typer.Option(False, help="Rerun a finished run.")
) -> None:
    """Attack -> defense -> train -> evaluate; results go to OUTPUT_DIR/NAME."""
    from cleantune.config import load_config
    from cleantune.pipeline import run as run_pipeline

    cfg = load_config(config, set_)
    record = run_pipeline(cfg, force=force)
    attack = cfg.attack.name if cfg.attack else "no"
    show_metrics(f"{cfg.name}: {attack} attack, {cfg.defense.name} defense", record["metrics"])
    console.print(f"run directory: {cfg.run_dir}")


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
    ``task: generation`` config, judged ASR, false-trigger rate and perplexity."""
    from cleantune.config import load_config
    from cleantune.io import atomic_write_json
    from cleantune.pipeline import evaluate as score

    metrics = score(load_config(config, set_), model)
    show_metrics(str(model), metrics)
    if out:
        atomic_write_json(out, metrics)


@app.command()
@friendly
def models() -> None:
    """List the hub ids that resolve offline, and where their packaged copies lie."""
    from cleantune.models import offline_models

    table = Table(title="Models available offline")
    table.add_column("hub id")
    table.add_column("packaged copy")
    for spec, where in offline_models().items():
        table.add_row(spec, where)
    Console().print(table)


@app.command()
@friendly
def bench(
    suite: Annotated[Path, typer.Argument(help="Suite YAML, e.g. benchmarks/smoke.yaml.")],
    only: Annotated[
        list[str] | None,
        typer.Option(
            help="Run only cells whose id contains this text (repeat for several), and the poisoned models they use."
        ),
    ] = None,
) -> None:
    """Run a suite's matrix, one run per cell; finished cells are skipped, failed ones recorded."""
    from cleantune.bench.runner import run_suite

    summary = run_suite(suite, only=only)
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
    scale: Annotated[list[float] | None, typer.Option(help="Global scales for the CACC/ASR sweep; repeatable.")] = None,
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
    block: Annotated[int, typer.Option(min=1, help="How many consecutive blocks the block ablations remove.")] = 4,
    out: Annotated[Path, typer.Option(help="Where sanity.json and sanity.md go.")] = Path("sanity"),
) -> None:
    """Where the backdoor lives (signature purification, Table 1): ASR with parts of the poisoned update removed."""
    from cleantune.config import RunConfig, load_config
    from cleantune.generative.sanity import analyze

    cfg = load_config(config, set_)
    if isinstance(cfg, RunConfig):
        raise CleantuneError("the sanity checks take a generative config (task: generation)")
    for name, result in analyze(cfg, model, base, block, out).items():
        console.print(f"{name}: ASR {result['asr']:.1f} %, false-trigger {result['ftr']:.1f} %")
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
    Console().print_json(json.dumps(result))
    if out:
        options = [("--defense", d) for d in defense] + [("--set", kv) for kv in set_ or []]
        flags = [x for pair in options for x in pair] + ["--steps", str(steps), "--repeats", str(repeats)]
        command = shlex.join(["cleantune", "analyze", "cost", str(config), *flags, "--out", str(out)])
        atomic_write_json(out, {**result, "command": command, "config": str(config), "defenses": defense})


def main() -> None:
    app()
