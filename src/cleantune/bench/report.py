"""Tables and plots from a suite's CSV, laid out like the papers' (rows defenses, columns attacks)."""

from __future__ import annotations

import json
import math
import operator
import re
from collections.abc import Iterable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import roc_auc_score, roc_curve  # noqa: E402

from cleantune.bench.recheck import recheck_path  # noqa: E402
from cleantune.bench.runner import read_results, results_path, runs_log_path  # noqa: E402
from cleantune.bench.suite import BEFORE_DEFENSE, PaperNumbers, ScanSection, SuiteConfig, cells, load_suite, matches  # noqa: E402
from cleantune.errors import CleantuneError  # noqa: E402
from cleantune.io import atomic_write_text, save_figure  # noqa: E402

OPS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt, "==": operator.eq}
BOUND = re.compile(r"^\s*(<=|>=|<|>|==)\s*(-?[0-9.]+)\s*$")
GROUP = ["dataset", "model", "scenario"]
BACKDOOR_LEFT = 50.0  # ASR (%) from which a scanned model still carries its backdoor: most triggered inputs flip


def find_suite(name: str) -> SuiteConfig:
    path = Path(name)
    if not path.exists():
        path = Path("benchmarks") / f"{name}.yaml"
    if not path.exists():
        raise CleantuneError(f"no suite '{name}' (looked for {name} and {path})")
    return load_suite(path)


def cell_text(values: pd.Series) -> str:
    values = values.dropna()
    if values.empty:
        return "–"
    if len(values) == 1:
        return f"{values.iloc[0]:.2f}"
    return f"{values.mean():.2f} ± {values.std(ddof=1):.2f}"


CLASSIFICATION = {"cacc": "CACC ↑", "asr": "ASR ↓"}
GENERATIVE = {"asr": "ASR ↓", "ftr": "false-trigger ↓", "ppl": "perplexity ↓"}
SECOND_JUDGE = {"asr_backdoorllm": "BackdoorLLM-ASR ↓"}  # shown where the rows recorded it


def metric_columns(rows: pd.DataFrame) -> dict[str, str]:
    """The generative scenario reports ASR, false-trigger rate and perplexity instead of CACC and ASR,
    and BackdoorLLM's keyword ASR beside ours where it was recorded."""
    if "ftr" not in rows or not rows["ftr"].notna().any():
        return CLASSIFICATION
    return GENERATIVE | {k: label for k, label in SECOND_JUDGE.items() if k in rows and rows[k].notna().any()}


def in_suite_order(values: Iterable[str], declared: list[str]) -> list[str]:
    """The distinct values, those the suite declares in its order, the others after them as they come."""
    rank = {name: i for i, name in enumerate(declared)}
    return sorted(dict.fromkeys(values), key=lambda v: rank.get(v, len(rank)))


def results_table(rows: pd.DataFrame, defenses: list[str], attacks: list[str]) -> str:
    """Rows defenses, columns attack x metric; the lowest mean ASR of each attack in bold."""
    metrics = metric_columns(rows)
    best = {a: rows[rows.attack == a].groupby("defense")["asr"].mean().min() for a in attacks}
    average = len(attacks) > 1
    header = "| Defense | " + " | ".join(f"{a} {label}" for a in attacks for label in metrics.values())
    header += "".join(f" | mean {label.split()[0]}" for label in metrics.values()) + " |" if average else " |"
    lines = [header, "|---|" + "---:|" * (len(metrics) * (len(attacks) + average))]
    for defense in defenses:
        cells = []
        for attack in attacks:
            sub = rows[(rows.defense == defense) & (rows.attack == attack)]
            for metric in metrics:
                text = cell_text(sub[metric])
                if metric == "asr" and not sub["asr"].dropna().empty and sub["asr"].mean() == best[attack]:
                    text = f"**{text}**"
                cells.append(text)
        if average:
            # Only over attacks with a finished cell; a partly run row says how many it averages.
            means = rows[rows.defense == defense].groupby("attack")[list(metrics)].mean()
            n = f" ({len(means)}/{len(attacks)})" if len(means) < len(attacks) else ""
            cells += [f"{means[m].mean():.2f}{n}" for m in metrics]
        lines.append(f"| {defense} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cost_table(rows: pd.DataFrame, defenses: list[str]) -> str:
    resumed = rows["resumed"].fillna(False).astype(bool) if "resumed" in rows else pd.Series(False, index=rows.index)
    params = {d: rows.loc[rows.defense == d, "trainable_params"].iloc[0] for d in defenses}
    rows = rows[~resumed]
    # The LoRA row: `lora`, or a per-model key such as `smollm2-lora` where a suite sets its own rate.
    reference = next((d for d in defenses if d == "lora"), next((d for d in defenses if d.endswith("-lora")), None))
    lora = rows[rows.defense == reference]["wall_s"].mean()
    setup = "setup_s" in rows and rows["setup_s"].notna().any()
    extra = " one-off setup (s) |" if setup else ""
    lines = [
        f"| Defense | wall time (s) | of which training (s) |{extra} peak memory (MB) | trainable params "
        "| time ÷ LoRA |",
        "|---|" + "---:|" * (5 + setup),
    ]
    columns = ["wall_s", "train_s", *(["setup_s"] if setup else []), "peak_mem_mb"]
    for defense in defenses:
        sub = rows[rows.defense == defense]
        wall = sub["wall_s"].mean()
        ratio = f"{wall / lora:.2f}" if pd.notna(lora) and lora > 0 and pd.notna(wall) else "–"
        times = [cell_text(sub[c]) if c in sub else "–" for c in columns]
        lines.append(f"| {defense} | {' | '.join(times)} | {int(params[defense]):,} | {ratio} |")
    lines += [
        "",
        "Each cell ran in its own process at its own time, so its wall time also reflects whatever else "
        "the machine was doing then; `time ÷ LoRA` is a rough guide, and the per-step table measured in "
        "one process (where the suite has one) is the comparison to rely on.",
    ]
    if resumed.any():
        lines += [
            "",
            f"Left out of these costs: {int(resumed.sum())} run(s) resumed after an interruption, whose "
            "times and memory cover only the process that finished them.",
        ]
    if setup:
        lines += [
            "",
            "One-off setup: work done once and reused from a cache (W2SDefense's teacher, signature "
            "purification's variant fine-tunes). It is part of every such run's cost; the run that did it "
            "also counts it in its wall time, the runs that reused it do not.",
        ]
    return "\n".join(lines)


def scatter(rows: pd.DataFrame, title: str, path: Path) -> None:
    x = next(m for m in metric_columns(rows) if m != "asr")  # CACC, or perplexity for generation
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for defense, sub in rows.groupby("defense", sort=False):
        means = sub.groupby("attack")[[x, "asr"]].mean()
        ax.scatter(means[x], means["asr"], label=defense, s=40)
        for attack, point in means.iterrows() if rows.attack.nunique() > 1 else ():
            ax.annotate(str(attack), (point[x], point["asr"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel({**CLASSIFICATION, **GENERATIVE}[x].replace("↑", "(%) ↑"))
    ax.set_ylabel("ASR (%) ↓")
    ax.set_ylim(-5, 105)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    save_figure(fig, path)


def check_expectations(suite: SuiteConfig, table: pd.DataFrame) -> list[str]:
    violations = []
    done = table[table.status == "done"]
    for rule in suite.expect:
        hits = [row for _, row in done.iterrows() if matches(rule.match, row.to_dict())]
        if not hits:
            violations.append(f"no finished cell matches {rule.match}")
        for row in hits:
            for metric, bound in rule.bounds.items():
                parsed = BOUND.match(bound)
                if parsed is None:
                    raise CleantuneError(f"suite {suite.suite}: bound '{bound}' for {metric} is not like '<= 20'")
                op, limit = parsed.group(1), float(parsed.group(2))
                value = row.get(metric)
                if value is None or pd.isna(value) or not OPS[op](float(value), limit):
                    violations.append(f"{row['cell']}: {metric} = {value}, expected {op} {limit:g}")
    return violations


def run_times(suite: SuiteConfig, done: pd.DataFrame) -> list[str]:
    lines = [
        f"Summed wall time of the finished cells: {done['wall_s'].sum() / 60:.1f} min "
        "(each cell's own run, without process start-up)."
    ]
    log = runs_log_path(suite)
    if log.exists():
        lines += ["", "`cleantune bench` invocations (cells run / failed / already finished):", ""]
        for entry in map(json.loads, log.read_text(encoding="utf-8").splitlines()):
            if entry.get("wall_s") is None:
                lines.append(f"- {entry['started_utc']}: stopped before it finished (its finished cells are recorded)")
                continue
            gpu = f" and {entry['gpus']} × {entry['gpu']}" if entry.get("gpu") else ""
            readings = f", scan readings {', '.join(entry['readings'])} alone" if entry.get("readings") else ""
            lines.append(
                f"- {entry['started_utc']}: {entry['wall_s'] / 60:.1f} min on {entry['cpus']} CPUs{gpu}, "
                f"{entry['done']} / {entry['failed']} / {entry['skipped']}{readings}"
            )
    return [*lines, ""]


def fourier_section(suite: SuiteConfig, done: pd.DataFrame) -> list[str]:
    """Fourier curves of the cells that recorded them; the measurements are copied next to the
    results so that the figures can be remade from a checkout without the run directories."""
    from cleantune.analysis.fourier import plot

    store = suite.results_dir / f"{suite.suite}.fourier"
    for row in done.itertuples():
        source = Path(str(row.run_dir)) / "fourier.jsonl"
        if source.exists():
            atomic_write_text(store / f"{row.cell}.jsonl", source.read_text(encoding="utf-8"))
    copies = [store / f"{cell}.jsonl" for cell in done.cell if (store / f"{cell}.jsonl").exists()]
    if not copies:
        return []
    ratios, errors = plot(copies, suite.reports_dir, prefix=f"{suite.suite}-")
    return [
        "## Fourier analysis",
        "",
        "Low/high-frequency ratios (the paper's Eq. 1, Figure 1) and relative errors (Eq. 2, Figures 2 and 5) "
        "of the clean and the backdoor mapping during training; re high of the backdoor mapping is undefined "
        "(its targets are all the target label, so they have no high-frequency part) and is not drawn.",
        "",
        f"![frequency ratios]({ratios.name})",
        "",
        f"![relative errors]({errors.name})",
        "",
    ]


def sanity_section(suite: SuiteConfig) -> list[str]:
    """The sanity checks (`cleantune analyze sanity`) saved under ``<results>/<suite>.sanity``."""
    from cleantune.generative.sanity import sanity_table
    from cleantune.io import read_json

    found = sorted((suite.results_dir / f"{suite.suite}.sanity").rglob("sanity.json"))
    if not found:
        return []
    lines = [
        "## Where the backdoor lives",
        "",
        "The signature paper's sanity checks (Table 1): ASR and false-trigger rate of the backdoored model "
        "rebuilt as its base plus its poisoned update with parts of that update removed or shuffled. "
        "Evaluator-side: they use the trigger.",
        "",
    ]
    for path in found:
        record = read_json(path)
        lines += [f"### {record['model']}", ""]
        if isinstance(record["results"], list):
            lines += sanity_table(record)
        else:  # written before the edits were kept in order (788e938): its numbers stay where they are
            lines += [f"`{path}` predates the ordered form; rerun the command that made it to show it here.", ""]
    return lines


DATA_LEVEL = {
    "rejected_test": "clean test rejected %",
    "rejected_test_poison": "triggered test rejected %",
    "filter_removed": "training samples removed",
    "filter_precision": "removal precision %",
    "filter_recall": "removal recall %",
}


def data_level_section(done: pd.DataFrame) -> list[str]:
    """What the test-time detectors rejected and what the training-set filters removed."""
    columns = [c for c in DATA_LEVEL if c in done and done[c].notna().any()]
    if not columns:
        return []
    rows = done[done[columns].notna().any(axis=1)]
    lines = [
        "## Data-level defenses",
        "",
        "Test-time detectors (STRIP, RAP) are scored as OpenBackdoor scores them: a rejected clean input "
        "counts as wrong for CACC, a rejected triggered input as a failed attack for ASR. ONION rewrites "
        "inputs and rejects none. The training-set filters (BKI, CUBE) are judged against the attack's "
        "record of poisoned samples, on the evaluator's side only.",
        "",
    ]
    return [*lines, *per_cell_table(rows, {c: DATA_LEVEL[c] for c in columns}), ""]


def loss_terms_section(done: pd.DataFrame) -> list[str]:
    """Each defense loss term's mean over training, already weighted: which term carried the objective."""
    columns = [c for c in done if c.startswith("loss_") and done[c].notna().any()]
    if not columns:
        return []
    rows = done[done[columns].notna().any(axis=1)]
    intro = "Each defense loss term's mean over training, as weighted in the loss (`train.loss_terms` of a run)."
    return ["## Defense loss terms", "", intro, "", *per_cell_table(rows, {c: c[5:] for c in columns}), ""]


def recorded_section(done: pd.DataFrame) -> list[str]:
    """What each defense recorded about its run (``defense_info`` of ``metrics.json``)."""
    columns = [c for c in done if c.startswith("info_") and done[c].notna().any()]
    if not columns:
        return []
    rows = done[done[columns].notna().any(axis=1)]
    intro = (
        "Numbers each defense recorded about its run (`defense_info` in a run's `metrics.json`): a "
        "teacher's clean dev accuracy (0-1), MuScleLoRA's regime (share of steps with the gate closed, "
        "mean cosine of the poisoned and clean gradients, final μ), signature purification's variant "
        "check (the lowest and mean ASR of its backdoored variants on held-out prompts carrying their "
        "keys, the highest of their clean twins, how many variants fell below `min_variant_asr`)."
    )
    return ["## What the defenses recorded", "", intro, "", *per_cell_table(rows, {c: c[5:] for c in columns}), ""]


def _commit(value: object) -> str:
    return "not recorded" if pd.isna(value) else f"`{str(value)[:7]}`"


def _libraries(row: pd.Series, prefix: str) -> str:
    """`` under <libraries>`` when the recheck CSV recorded them (older rechecks did not)."""
    value = row.get(f"{prefix}_libraries")
    return "" if value is None or pd.isna(value) else f" under {value}"


def release_sets(rows: pd.DataFrame) -> pd.Series:
    """Each row's library releases, rows written before the results table held them named as such."""
    return rows["libraries"].fillna("not recorded (rows written before the results table held it)")


def libraries_section(done: pd.DataFrame) -> list[str]:
    """Which library releases the rows ran under, when they are not all the same: the same config and
    commit can train another model under other releases (a seed-like spread, not a code change)."""
    if "libraries" not in done:
        return []
    named = release_sets(done)
    if named.nunique() < 2:
        return []
    lines = [
        "## Library releases",
        "",
        "The rows ran under more than one set of library releases; where the same cell was rerun under "
        "another set, the Rechecked cells section shows how far its numbers moved.",
        "",
    ]
    groups = sorted(done.groupby(named, sort=False), key=lambda group: -len(group[1]))
    for index, (libraries, rows) in enumerate(groups):
        cells_named = f": {', '.join(rows.cell)}" if index else ""  # the largest set is the rest
        lines.append(f"- {libraries}: {len(rows)} row{'s' if len(rows) > 1 else ''}{cells_named}")
    return [*lines, ""]


def digits_apart(recorded: float, rerun: float) -> str:
    """Two numbers that differ, to as many digits as it takes to see it."""
    short = f"{recorded:.6g} → {rerun:.6g}"
    return short if f"{recorded:.6g}" != f"{rerun:.6g}" else f"{recorded!r} → {rerun!r}"


def recheck_section(suite: SuiteConfig) -> list[str]:
    """Cells rerun from nothing with ``cleantune bench --recheck``: does today's code give the recorded numbers?"""
    path = recheck_path(suite.results_dir, suite.suite)
    if not path.exists():
        return []
    checks = pd.read_csv(path, float_precision="round_trip")
    intro = (
        "Cells rerun from nothing, with the poisoned models they load, by `cleantune bench "
        f"benchmarks/{suite.suite}.yaml --recheck --only <cell>` (in `{path.name}`, a row per number). "
        "Identical means equal to the last digit the results CSV holds; times and memory are not compared."
    )
    lines = ["## Rechecked cells", "", intro, ""]
    lines += ["| cell | recorded at | rerun at | numbers | identical | differing (recorded → rerun) |"]
    lines += ["|---|---|---|---:|---:|---|"]
    for cell, rows in checks.groupby("cell", sort=False):
        differ = rows[~rows.same.map(lambda v: v in (True, "True"))]
        text = "; ".join(f"{r.metric} {digits_apart(r.recorded, r.rerun)}" for r in differ.itertuples()) or "–"
        first = rows.iloc[0]
        when = f"{_commit(first.rerun_commit)}, {first.checked_utc}{_libraries(first, 'rerun')}"
        made = f"{_commit(first.recorded_commit)}{_libraries(first, 'recorded')}"
        lines.append(f"| {cell} | {made} | {when} | {len(rows)} | {len(rows) - len(differ)} | {text} |")
    return [*lines, ""]


def _yes_no(value: object) -> str:
    return "–" if pd.isna(value) else ("yes" if value in (True, "True") else "no")


def share(flags: pd.Series) -> str:
    """'k of n' for the flags that apply (a paraphrase trigger has no words to recover)."""
    known = flags.dropna().map(lambda v: v in (True, "True"))
    return f"{int(known.sum())} of {len(known)}" if len(known) else "–"


def population_lines(scan: ScanSection, scanned: pd.DataFrame, prefix: str) -> list[str]:
    """How well one reading's score separates the backdoored models (trained on poisoned data or
    weight-poisoned) from the clean ones: AUROC, and the true-positive rate at the false-positive rate."""
    truth, score = scanned.n_poisoned.fillna(0) > 0, scanned[f"{prefix}score"]
    if truth.nunique() < 2:
        return ["The population needs clean and backdoored models before it can be measured.", ""]
    fpr, tpr, thresholds = roc_curve(truth, score)
    allowed = fpr <= scan.fpr / 100
    best = int(tpr[allowed].argmax())
    cut = float(thresholds[allowed][best])  # inf: only "nothing flagged" keeps the false positives down
    took = scanned.asr.fillna(100) >= 90  # backdoors that took, and every clean model
    only_took = f" (backdoors with ASR ≥ 90 only: {roc_auc_score(truth[took], score[took]):.3f})"
    minutes = scanned[f"{prefix}s"] / 60
    backdoored = scanned[truth]
    if f"{prefix}trigger_found" in backdoored:  # a classifier's scan: trigger words and a target label
        matched = (
            f"- planted trigger word among the inverted tokens: {share(backdoored[f'{prefix}trigger_found'])}; "
            f"target right: {share(backdoored[f'{prefix}target_found'])}"
        )
    else:  # a generative scan: an answer, judged against the planted behaviour
        matched = f"- planted behaviour in the inverted answer: {share(backdoored[f'{prefix}target_found'])}"
    return [
        f"- models: {int((~truth).sum())} clean, {int(truth.sum())} backdoored "
        f"({int((took & truth).sum())} with ASR ≥ 90)",
        f"- AUROC: {roc_auc_score(truth, score):.3f}" + (only_took if truth[took].nunique() == 2 else ""),
        f"- true-positive rate at ≤ {scan.fpr:g} % false positives: {100 * tpr[allowed][best]:.1f} % "
        + (f"(threshold: score ≥ {cut:.1f})" if math.isfinite(cut) else "(none: a clean model scores highest)"),
        matched,
        f"- scan time per model: mean {minutes.mean():.1f} min, longest {minutes.max():.1f} min",
        "",
    ]  # fmt: skip


def before_after(scanned: pd.DataFrame) -> pd.DataFrame:
    """Scanned rows grouped by the model a defense started from (a poisoned model's own row first,
    then the products trained from it or on the same poisoned data), so a scan reads before and after."""
    keys = [k for k in [*GROUP, "attack", "seed"] if k in scanned]
    ordered = scanned.assign(_after=scanned.defense != BEFORE_DEFENSE)
    return ordered.sort_values([*keys, "_after"], kind="stable").drop(columns="_after")


def verdict_line(scanned: pd.DataFrame, verdicts: pd.Series) -> list[str]:
    """How often a reading's verdict says what the planted trigger measures: a model whose ASR is at
    least ``BACKDOOR_LEFT`` still carries the backdoor, one below it no longer does."""
    judged = scanned.asr.notna() & verdicts.isin(["backdoored", "clean"])
    left, called = scanned.asr[judged] >= BACKDOOR_LEFT, verdicts[judged] == "backdoored"
    if not judged.any():
        return []
    return [
        f"- verdict against the ASR the planted trigger gives (≥ {BACKDOOR_LEFT:g} %: a backdoor left): "
        f"{int((left == called).sum())} of {int(judged.sum())} right; backdoor left, called backdoored: "
        f"{int((left & called).sum())} of {int(left.sum())}; none left, called clean: "
        f"{int((~left & ~called).sum())} of {int((~left).sum())}",
        "",
    ]


def reading_name(prefix: str) -> str:
    """A reading's name from its column prefix (``scan_``: the main reading)."""
    return prefix.removeprefix("scan_").strip("_") or "main reading"


def reading_lines(scan: ScanSection, done: pd.DataFrame, prefix: str) -> list[str]:
    """One reading's results: its population measures (or, outside a population, its verdicts against
    the measured ASR), then each model's scan beside what was planted."""
    settings = ", ".join(f"{k} {v}" for k, v in scan.readings()[prefix].items()) or "defaults"
    parts = [f"### {reading_name(prefix)} (settings: {settings})", ""]
    if f"{prefix}score" not in done:
        return [*parts, "Not run yet.", ""]
    scanned = done[done[f"{prefix}score"].notna()]
    threshold = scan.readings()[prefix].get("threshold")  # a verdict per model, where the reading sets one
    verdict = f" verdict (score ≥ {threshold:g}) |" if threshold is not None else ""
    if scan.population:
        parts += population_lines(scan, scanned, prefix)
    else:
        scanned = before_after(scanned)
    verdicts = scanned.get(f"{prefix}verdict", pd.Series(index=scanned.index, dtype=object))
    if verdict and not scan.population:
        parts += verdict_line(scanned, verdicts)
    parts += [
        "| cell | poisoned rows | CACC | ASR | scan score | target label found | inverted trigger / answer "
        f"| planted word found | target right | scan s |{verdict}",
        "|---|---:|---:|---:|---:|---|---|---|---|---:|" + ("---|" if verdict else ""),
    ]
    for r, said in zip(scanned.to_dict("records"), verdicts.fillna("–"), strict=True):
        found = " | ".join(_yes_no(r.get(f"{prefix}{k}_found")) for k in ("trigger", "target"))
        # A defended product inherits the backdoor of the model it started from; an attack at rate 0 on
        # clean weights planted nothing to find.
        planted = r["n_poisoned"] > 0 or r.get("scenario", "poisoned-data") != "poisoned-data"
        found = found if planted else "– | –"
        trigger = str(r[f"{prefix}trigger"]).replace("|", "/").replace("\n", "\\n")  # one table row each
        said = f" {said} |" if verdict else ""
        parts.append(
            f"| {r['cell']} | {r['n_poisoned']:.0f} | {cell_text(pd.Series([r['cacc']]))} | "
            f"{cell_text(pd.Series([r['asr']]))} | {r[f'{prefix}score']:.1f} | {r.get(f'{prefix}target', '–')} | "
            f"{trigger} | {found} | {r[f'{prefix}s']:.0f} |{said}"
        )
    failed = done[done[f"{prefix}error"].notna()] if f"{prefix}error" in done else done.iloc[:0]
    parts += [""] + [f"- scan failed for {r.cell}: {r[f'{prefix}error']}" for _, r in failed.iterrows()]
    return parts + [""]


def other_results(suite: SuiteConfig, other: str, role: str) -> pd.DataFrame:
    """The results table of the suite ``other`` that ``suite`` reads (``role``: what it reads it for)."""
    csv = suite.results_dir / f"{other}.csv"
    if not csv.exists():
        raise CleantuneError(f"suite {suite.suite} {role} '{other}', which has no results ({csv})")
    return read_results(csv)


def gathered_lines(suite: SuiteConfig, gather: list[str]) -> list[str]:
    """The scans the ``gather`` suites ran before and after their defenses, every reading of theirs
    that gives a verdict, in one table with those verdicts against the measured ASR."""
    frames = []
    for other in gather:
        theirs = other_results(suite, other, "gathers the scans of")
        for verdict in (c for c in theirs.columns if c.startswith("scan_") and c.endswith("_verdict")):
            prefix = verdict.removesuffix("verdict")
            rows = before_after(theirs[theirs[verdict].notna()])
            frames.append(
                rows.assign(
                    suite=other, reading=reading_name(prefix), score=rows[f"{prefix}score"], verdict=rows[verdict]
                )
            )
    if not frames:
        return []
    rows = pd.concat(frames, ignore_index=True)
    lines = [
        "### Before and after the defenses of other suites",
        "",
        f"The poisoned models and defended products of {', '.join(gather)} scanned with each of their "
        "readings that gives a verdict (its threshold measured here); where a defense trained on poisoned "
        "data, the undefended training run is the before.",
        "",
        *verdict_line(rows, rows.verdict),
        "| suite | reading | cell | defense | ASR | scan score | verdict |",
        "|---|---|---|---|---:|---:|---|",
    ]
    for r in rows.itertuples():
        asr = cell_text(pd.Series([r.asr]))
        lines.append(f"| {r.suite} | {r.reading} | {r.cell} | {r.defense} | {asr} | {r.score:.1f} | {r.verdict} |")
    return [*lines, ""]


def scan_section(suite: SuiteConfig, done: pd.DataFrame) -> list[str]:
    """Each model's trigger-free scan against what was planted; for a population, how well it separates;
    and the scans other suites ran before and after their defenses, where this suite gathers them."""
    if suite.scan is None:
        return []
    readings = [line for prefix in suite.scan.readings() for line in reading_lines(suite.scan, done, prefix)]
    readings += gathered_lines(suite, suite.scan.gather) if suite.scan.gather else []
    intro = (
        "Each model scanned as a defender would (`cleantune scan`), from its shipped files alone and "
        "clean data; what was planted is compared afterwards. A classifier's score is the share (%) of "
        "clean inputs its inverted trigger flips (in a reading with clean reference models, less the share "
        "it flips in the reference it moves most); a generative model's, the mean probability (%) of the "
        "answer it continues to (with reference models, less the mean probability the reference that "
        "continues it most gives the same tokens)."
    )
    return ["## Trigger-free scan", "", intro, "", *readings] if readings else []


def per_cell_table(rows: pd.DataFrame, headers: dict[str, str]) -> list[str]:
    lines = ["| cell | " + " | ".join(headers.values()) + " |", "|---|" + "---:|" * len(headers)]
    for row in rows.itertuples():
        values = [getattr(row, c) for c in headers]
        lines.append(f"| {row.cell} | " + " | ".join("" if pd.isna(v) else f"{v:.4g}" for v in values) + " |")
    return lines


def cost_section(suite: SuiteConfig) -> list[str]:
    """Per-step time measured in one process by ``cleantune analyze cost --out <suite>.cost.json``."""
    path = suite.results_dir / f"{suite.suite}.cost.json"
    if not path.exists():
        return []
    cost = json.loads(path.read_text(encoding="utf-8"))
    lines = [
        "## Per-step training time in one process",
        "",
        f"Made by `{cost['command']}` ({cost['steps']} steps per defense and round, {cost['repeats']} rounds "
        "alternating the defenses; median).",
        "",
        f"| Defense | s / step | ÷ {cost['reference']} |",
        "|---|---:|---:|",
    ]
    for name, seconds in cost["seconds_per_step"].items():
        lines.append(f"| {name} | {seconds:.3f} | {cost['ratio_to_reference'][name]:.2f} |")
    return [*lines, ""]


def compared_rows(suite: SuiteConfig, done: pd.DataFrame) -> pd.DataFrame:
    """Finished defense rows of the ``compare_with`` suites on this suite's (dataset, model, scenario,
    attack) coordinates, their defense names marked with their suite."""
    keys = [*GROUP, "attack"]
    frames = []
    for other in suite.compare_with:
        theirs = other_results(suite, other, "compares with")
        theirs = theirs[(theirs.status == "done") & (theirs.defense != BEFORE_DEFENSE)]
        theirs = theirs.merge(done[keys].drop_duplicates(), on=keys)
        frames.append(theirs.assign(defense=theirs.defense + f" [{other}]"))
    return pd.concat([done, *frames], ignore_index=True) if frames else done


def protocol_section(suite: SuiteConfig) -> list[str]:
    if not suite.protocol:
        return []
    lines = ["## Protocol", "", "| Setting | Paper / authors | Used here | Why it differs |", "|---|---|---|---|"]
    lines += [f"| {row.setting} | {row.paper} | {row.used} | {row.why or '–'} |" for row in suite.protocol]
    return [*lines, ""]


def paper_section(suite: SuiteConfig, done: pd.DataFrame) -> list[str]:
    """The paper's numbers beside this suite's, one table per paper table the suite names."""
    return [line for table in suite.paper for line in paper_table(table, suite, done)]


def paper_table(table: PaperNumbers, suite: SuiteConfig, done: pd.DataFrame) -> list[str]:
    """One paper table beside this suite's numbers, per defense row the paper reports and per attack."""
    attacks = in_suite_order({a for row in table.rows.values() for a in row}, list(suite.attack))
    metrics = metric_columns(done) if not done.empty else CLASSIFICATION
    header = "| Defense | " + " | ".join(f"{a} {label} paper / ours" for a in attacks for label in metrics.values())
    lines = [
        f"## The paper's numbers beside ours ({table.source})",
        "",
        header + " |",
        "|---|" + "---:|" * (len(attacks) * len(metrics)),
    ]
    for row, by_attack in table.rows.items():
        for defense in table.beside.get(row, [row]):
            cells = []
            for attack in attacks:
                ours = done[(done.defense == defense) & (done.attack == attack)]
                for metric in metrics:
                    theirs = by_attack.get(attack, {}).get(metric)
                    paper = "–" if theirs is None else f"{theirs:.2f}"
                    cells.append(f"{paper} / {cell_text(ours[metric]) if metric in ours else '–'}")
            label = row if defense == row else f"{row} (ours: {defense})"
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def open_readings_section(suite: SuiteConfig, done: pd.DataFrame) -> list[str]:
    """Each open point's readings side by side, averaged over the attacks every reading has finished
    (seeds averaged first), naming the reading of lowest mean ASR (and of highest mean CACC), and,
    where every row recorded a clean dev accuracy, the reading of the highest."""
    if not suite.open_readings or done.empty:
        return []
    lines = ["## Open readings", ""]
    for point in suite.open_readings:
        keep = pd.Series(
            [row["defense"] in point.readings and matches(point.match, row) for row in done.to_dict("records")],
            index=done.index,
        )
        metrics = metric_columns(done[keep])
        shown = dict(metrics)
        if "dev_accuracy" in done and done.loc[keep, "dev_accuracy"].notna().all():
            shown["dev_accuracy"] = "clean dev ↑"
        means = done[keep].groupby(["defense", "attack"])[list(shown)].mean()
        finished = [{a for d, a in means.index if d == defense} for defense in point.readings]
        attacks = in_suite_order(set.intersection(*finished), list(suite.attack))
        where = ", ".join(f"{key} {value}" for key, value in point.match.items())
        lines += [f"### {point.point}" + (f" ({where})" if where else ""), ""]
        if not attacks:
            lines += ["No attack has a finished row for every reading yet.", ""]
            continue
        header = "| Reading | Defense | " + " | ".join(f"{a} {label}" for a in attacks for label in metrics.values())
        names = {m: label.rstrip(" ↑↓") for m, label in shown.items()}  # labels without their arrows
        header += "".join(f" | mean {name}" for name in names.values())
        lines += [header + " |", "|---|---|" + "---:|" * (len(metrics) * len(attacks) + len(shown))]
        overall = {}
        for defense, reading in point.readings.items():
            rows = means.loc[defense].loc[attacks]
            overall[reading] = rows.mean()
            cells = [f"{rows[m][a]:.2f}" for a in attacks for m in metrics] + [f"{rows[m].mean():.2f}" for m in shown]
            lines.append(f"| {reading} | {defense} | " + " | ".join(cells) + " |")
        named = [("lowest mean ASR", min(overall, key=lambda r: overall[r].asr))]
        if "cacc" in metrics:
            named.append(("highest mean CACC", max(overall, key=lambda r: overall[r].cacc)))
        if "dev_accuracy" in shown:  # the pick the rule for a free setting allows: it sees no triggered data
            named.insert(0, ("chosen on clean dev data", max(overall, key=lambda r: overall[r].dev_accuracy)))
        verdicts = [
            f"{what}: {reading} (" + ", ".join(f"{name} {overall[reading][m]:.2f}" for m, name in names.items()) + ")"
            for what, reading in named
        ]
        verdict = "; ".join(verdicts) + f"; over {', '.join(attacks)}."
        lines += ["", verdict[0].upper() + verdict[1:], ""]
        lines += mixed_releases(done[keep & done.attack.isin(attacks)])
    return lines


def mixed_releases(rows: pd.DataFrame) -> list[str]:
    """A line naming the rows that ran under other library releases than most, where a comparison mixes them."""
    if "libraries" not in rows:
        return []
    sets = release_sets(rows)
    if sets.nunique() < 2:
        return []
    usual = sets.value_counts().index[0]
    # A cell run over several seeds under the same releases is named once.
    others = dict.fromkeys(
        f"{d} on {a} under {lib}" for d, a, lib in zip(rows.defense, rows.attack, sets, strict=True) if lib != usual
    )
    return [f"Not all under the same library releases ({usual} for the rest): {'; '.join(others)}.", ""]


def write_report(name: str) -> tuple[Path, list[str]]:
    suite = find_suite(name)
    csv = results_path(suite)
    if not csv.exists():
        raise CleantuneError(f"no results for suite '{suite.suite}' yet ({csv}); run: cleantune bench")
    table = read_results(csv)
    done = table[table.status == "done"]
    out = suite.reports_dir / f"{suite.suite}.md"
    parts = [f"# Benchmark `{suite.suite}`", "", *protocol_section(suite), *paper_section(suite, done)]
    parts += [suite.description.strip(), ""]
    if suite.command:
        parts += ["Made by:", "", "```", suite.command.strip(), "```", ""]
    parts += run_times(suite, done)
    parts += [
        f"Cells: {len(done)} done, {(table.status == 'failed').sum()} failed, of {len(table)} recorded. "
        "CACC, ASR and false-trigger rate in %; mean ± std over seeds where there are several; "
        "lowest ASR per attack in bold.",
        "",
    ]
    # A suite is only complete when every cell of its matrix has a row; say which have none.
    unrun = [c.id for c in cells(suite) if not c.poisons and c.id not in set(table.cell)]
    if unrun:
        parts += [f"Not run yet ({len(unrun)} of the matrix's cells): {', '.join(unrun)}.", ""]
    if suite.compare_with:
        parts += [
            f"Rows marked [suite] are that suite's rows on the same poisoned models ({', '.join(suite.compare_with)}).",
            "",
        ]
    for keys, rows in compared_rows(suite, done).groupby(GROUP, sort=False):
        # A poisoned model's own row first, then defenses and attacks in the order the suite declares
        # them (a rerun cell moves to the end of the CSV); another suite's rows after them.
        defenses = in_suite_order(rows.defense, [BEFORE_DEFENSE, *suite.defense])
        attacks = in_suite_order(rows.attack, list(suite.attack))
        title = " · ".join(str(k) for k in keys)
        image = f"{suite.suite}-{'-'.join(str(k) for k in keys)}.png".replace("/", "_")
        scatter(rows, title, suite.reports_dir / image)
        parts += [
            f"## {title}",
            "",
            results_table(rows, defenses, attacks),
            "",
            "Cost per run:",
            "",
            cost_table(rows, defenses),
            "",
            f"![ASR against {next(m for m in metric_columns(rows) if m != 'asr')}]({image})",
            "",
        ]
    parts += open_readings_section(suite, done)
    parts += data_level_section(done) + loss_terms_section(done) + recorded_section(done) + libraries_section(done)
    parts += fourier_section(suite, done) + sanity_section(suite) + cost_section(suite) + scan_section(suite, done)
    parts += recheck_section(suite)
    failed = table[table.status == "failed"]
    if not failed.empty:
        parts += ["## Failed cells", "", "| cell | error |", "|---|---|"]
        parts += [f"| {r.cell} | {str(r.error).replace('|', '/')} |" for r in failed.itertuples()]
        parts.append("")
    violations = check_expectations(suite, table)
    parts += ["## Expected bounds", ""]
    parts += [f"- violated: {v}" for v in violations] or [
        "- all expected bounds hold" if suite.expect else "- none declared"
    ]
    atomic_write_text(out, "\n".join(parts) + "\n")
    return out, violations
