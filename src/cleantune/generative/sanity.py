"""Where a backdoor lives: the sanity checks of the signature-purification paper (Table 1).

The poisoned update ΔW is the suspicious weights minus the weights they were fine-tuned from (for an
adapter: the merged adapter minus its base). Each check rebuilds the model as base + an edited ΔW and
measures ASR and the false-trigger rate: without the attention update, without the MLP update,
without the MLP update of k consecutive blocks (alone, and with those blocks' attention update),
and with the MLP updates shuffled across blocks. Evaluator-side analysis: it uses the trigger.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from cleantune.errors import CleantuneError
from cleantune.generative.base import decoder_layers
from cleantune.io import atomic_write_json, atomic_write_text, read_json, weights_fingerprint
from cleantune.models import load_model

Part = Literal["attn", "mlp"]
Plan = dict[tuple[int, Part], int | None]  # (layer, part) -> whose update it gets, or None (no update)


def _parts(layer: nn.Module) -> dict[Part, list[nn.Linear]]:
    return {
        "attn": [m for m in layer.self_attn.modules() if isinstance(m, nn.Linear)],
        "mlp": [m for m in layer.mlp.modules() if isinstance(m, nn.Linear)],
    }


class PoisonedUpdate:
    """The suspicious model's linear weights as base + ΔW, editable per (layer, part) and restorable."""

    def __init__(self, model: nn.Module, base: nn.Module) -> None:
        self.model = model
        self.parts = [_parts(layer) for layer in decoder_layers(model)]
        base_parts = [_parts(layer) for layer in decoder_layers(base)]
        self.base = [{p: [m.weight.detach().clone() for m in mods[p]] for p in mods} for mods in base_parts]
        self.delta = [
            {p: [m.weight.detach() - b for m, b in zip(mods[p], self.base[i][p], strict=True)] for p in mods}
            for i, mods in enumerate(self.parts)
        ]

    @property
    def num_layers(self) -> int:
        return len(self.parts)

    def identity(self) -> Plan:
        return {(i, p): i for i in range(self.num_layers) for p in ("attn", "mlp")}

    @torch.no_grad()
    def apply(self, plan: Plan) -> None:
        for (layer, part), source in plan.items():
            for k, module in enumerate(self.parts[layer][part]):
                update = self.delta[source][part][k] if source is not None else 0.0
                module.weight.copy_(self.base[layer][part][k] + update)


def sanity_plans(layers: int, blocks: Sequence[int], seed: int) -> dict[str, Callable[[Plan], Plan]]:
    """Table 1's rows as edits of the identity plan, with the span rows for each size in ``blocks``
    (a span two sizes share is one row)."""

    def without(part: Part, span: range) -> Callable[[Plan], Plan]:
        return lambda plan: plan | {(i, part): None for i in span}

    def without_both(span: range) -> Callable[[Plan], Plan]:
        return lambda plan: without("attn", span)(without("mlp", span)(plan))

    order = list(range(layers))
    random.Random(seed).shuffle(order)
    everything = range(layers)
    rows: dict[str, Callable[[Plan], Plan]] = {
        "poisoned update": lambda plan: plan,
        "without attention update": without("attn", everything),
        "without MLP update": without("mlp", everything),
    }
    for block in blocks:
        for start in sorted({0, (layers - block) // 2, layers - block}):
            span = range(start, start + block)
            rows[f"without MLP update, blocks {span.start}-{span.stop - 1}"] = without("mlp", span)
            rows[f"without MLP and attention update, blocks {span.start}-{span.stop - 1}"] = without_both(span)
    rows["MLP updates shuffled across blocks"] = lambda plan: plan | {(i, "mlp"): order[i] for i in everything}
    return rows


def run_sanity(
    update: PoisonedUpdate,
    blocks: Sequence[int],
    seed: int,
    measure: Callable[[], dict[str, Any]],
    done: dict[str, dict[str, Any]] | None = None,
    save: Callable[[dict[str, dict[str, Any]]], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Apply each row's edit not in ``done``, measure, hand the results so far to ``save``, and leave
    the model as it came; a bar counts the edits and each result is printed as it comes (a run with
    several span sizes takes an hour on a CPU, so an interrupted one resumes from what was saved)."""
    sizes = sorted({max(1, min(block, update.num_layers)) for block in blocks})
    plans = sanity_plans(update.num_layers, sizes, seed)
    results = {name: result for name, result in (done or {}).items() if name in plans}
    pending = [(name, edit) for name, edit in plans.items() if name not in results]
    try:
        for name, edit in tqdm(pending, desc="sanity checks", total=len(plans), initial=len(plans) - len(pending)):
            update.apply(edit(update.identity()))
            results[name] = measure()
            shown = (f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in results[name].items())
            tqdm.write(f"{name}: {', '.join(shown)}")
            if save is not None:
                save(results)
    finally:
        update.apply(update.identity())
    return {name: results[name] for name in plans}  # Table 1's order, however the edits were split


def _identity(cfg: Any, spec: str, base_spec: str | None) -> str:
    """What an edit's measurement depends on: the config (prompts, attack, seed, decoding) and the
    weights of the model and its base. The span sizes are not in it: an edit's name fixes the edit, so
    a rerun with more sizes keeps the spans already measured."""
    local = [Path(s).expanduser() for s in (spec, base_spec) if s]
    weights = [weights_fingerprint(path) for path in local if path.is_dir()]  # a hub id is its own name
    identity = [cfg.model_dump(mode="json"), spec, base_spec, weights]
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _resume(partial: Path, identity: str) -> dict[str, dict[str, Any]]:
    """The edits an interrupted run of the same identity measured; none from another config."""
    if not partial.exists():
        return {}
    saved = read_json(partial)
    if saved.get("identity") != identity:
        tqdm.write(f"{partial} was made for another config or model; measuring every edit again")
        return {}
    tqdm.write(f"resuming from {partial}: {len(saved['results'])} edits already measured")
    return dict(saved["results"])


def analyze(cfg: Any, spec: str, base_spec: str | None, blocks: Sequence[int], out: Path) -> dict[str, dict[str, Any]]:
    """Table 1 for the model or adapter ``spec`` on the prompts and attack of the generative ``cfg``;
    writes ``sanity.json`` and ``sanity.md`` to ``out``, and each edit as measured to
    ``sanity.partial.json`` there, from which a rerun of the same config resumes."""
    from peft import PeftModel

    from cleantune.generative.config import AsIsConfig
    from cleantune.generative.evaluation import llm_metrics
    from cleantune.generative.pipeline import prepare

    if cfg.attack is None:
        raise CleantuneError("the sanity checks measure ASR: the config needs an attack")
    prepared = prepare(cfg.model_copy(update={"scenario": "poisoned-llm", "defense": AsIsConfig()}))
    loaded = load_model(spec, allow_pickle=cfg.model.allow_pickle)
    if isinstance(loaded.model, PeftModel):
        base = load_model(loaded.model.peft_config["default"].base_model_name_or_path).model
        model = loaded.model.merge_and_unload()
    elif base_spec is None:
        raise CleantuneError("a full model's poisoned update needs the model it was fine-tuned from: give --base")
    else:
        base, model = load_model(base_spec, allow_pickle=cfg.model.allow_pickle).model, loaded.model
    update = PoisonedUpdate(model, base)
    del base
    quick = cfg.eval.model_copy(update={"perplexity": False})

    def measure() -> dict[str, Any]:
        metrics = llm_metrics(
            model, loaded.tokenizer, prepared.test, prepared.triggered, prepared.judge, prepared.max_new_tokens,
            quick, cfg.model.max_length,
        )  # fmt: skip
        return {k: metrics[k] for k in ("asr", "ftr")}

    partial, identity = out / "sanity.partial.json", _identity(cfg, spec, base_spec)
    results = run_sanity(
        update, blocks, cfg.seed, measure, _resume(partial, identity),
        lambda so_far: atomic_write_json(partial, {"identity": identity, "results": so_far}),
    )  # fmt: skip
    rows = [{"edit": name, **result} for name, result in results.items()]  # a list keeps Table 1's order
    record = {"model": spec, "base": base_spec, "layers": update.num_layers, "blocks": list(blocks), "results": rows}
    atomic_write_json(out / "sanity.json", record)
    atomic_write_text(out / "sanity.md", "\n".join([f"# Sanity checks (Table 1): {spec}", "", *sanity_table(record)]))
    partial.unlink(missing_ok=True)  # the record is whole
    return results


def sanity_table(record: dict[str, Any]) -> list[str]:
    """What ``sanity.json`` holds as Markdown lines: the span sizes, then a row per edit."""
    sizes = ", ".join(map(str, record["blocks"]))
    lines = [f"{record['layers']} blocks, spans of {sizes}.", ""]
    lines += ["| edit of the poisoned update | ASR % | false-trigger % |", "|---|---:|---:|"]
    lines += [f"| {r['edit']} | {r['asr']:.1f} | {r['ftr']:.1f} |" for r in record["results"]]
    return [*lines, ""]
