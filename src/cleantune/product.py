"""What a run hands over: a PEFT adapter or a full safetensors model, with a model card.

A suspicious *adapter* is purified as the weights it stands for (base + its update, merged); the
product is then turned back into an adapter on the same base, so ``PeftModel.from_pretrained(base,
product)`` loads it. Each changed linear weight becomes a LoRA pair of the smallest rank that holds
the change to ``RELATIVE_TOLERANCE`` (its scaling 1); every other changed module (the classifier
head, a bias, a norm) is saved whole as a PEFT ``modules_to_save`` copy.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from torch import nn

from cleantune.io import atomic_write_json, atomic_write_text, save_atomically
from cleantune.models import Loaded, load_model

log = logging.getLogger("cleantune")

RELATIVE_TOLERANCE = 1e-5  # residual Frobenius norm of a factored update, relative to the update's own
HEADS = ("classifier", "score")  # the heads PEFT keeps whole for sequence classification


def plain(model: nn.Module) -> nn.Module:
    """The model with any adapter merged into its weights."""
    return model.merge_and_unload() if isinstance(model, PeftModel) else model


def factor(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """B (out x k), A (k x in) with BA = ``delta`` up to the tolerance, k as small as that allows."""
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    # residual[k]: the Frobenius norm left when the first k + 1 singular values are kept
    residual = torch.cat([S.pow(2).flip(0).cumsum(0).flip(0)[1:], S.new_zeros(1)]).sqrt()
    k = int((residual > RELATIVE_TOLERANCE * S.pow(2).sum().sqrt()).sum()) + 1
    return (U[:, :k] * S[:k]).float(), Vh[:k].float()


def changes(tuned: nn.Module, base: nn.Module) -> tuple[dict[str, nn.Linear], list[str]]:
    """Modules of ``base`` whose own parameters differ in ``tuned``: linear layers with only the
    weight changed (factored), and the rest (kept whole)."""
    tuned_modules = dict(tuned.named_modules())
    factored, whole = {}, []
    for name, module in base.named_modules():
        own = dict(module.named_parameters(recurse=False))
        other = tuned_modules.get(name)
        if not own or other is None:
            continue
        changed = [p for p, value in own.items() if not torch.equal(value, getattr(other, p))]
        if changed == ["weight"] and isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] not in HEADS:
            factored[name] = other
        elif changed:
            whole.append(name)
    return factored, whole


@torch.no_grad()
def adapter_on_base(tuned: nn.Module, base: nn.Module, base_spec: str) -> PeftModel | None:
    """A LoRA adapter on ``base`` whose model equals ``tuned`` (the same architecture, other weights);
    None when no linear weight changed alone (full fine-tuning), where an adapter saves nothing."""
    factored, whole = changes(tuned, base)
    if not factored:
        return None
    pairs = {name: factor(other.weight - base.get_submodule(name).weight) for name, other in factored.items()}
    ranks = {name: B.shape[1] for name, (B, _) in pairs.items()}
    config = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=max(ranks.values(), default=1),
        lora_alpha=max(ranks.values(), default=1),
        rank_pattern=ranks,
        alpha_pattern=ranks,  # scaling alpha / r = 1: BA is the update itself
        target_modules=list(pairs),
        modules_to_save=list(whole),  # PEFT adds its head names to the list it is given
        lora_dropout=0.0,
        base_model_name_or_path=base_spec,
    )
    tuned_modules = dict(tuned.named_modules())
    adapter = get_peft_model(base, config)
    inner = adapter.base_model.model
    for name, (B, A) in pairs.items():
        layer = inner.get_submodule(name)
        layer.lora_A["default"].weight.copy_(A)
        layer.lora_B["default"].weight.copy_(B)
    for name in whole:
        inner.get_submodule(name).modules_to_save["default"].load_state_dict(tuned_modules[name].state_dict())
    return adapter.eval()


@torch.no_grad()
def max_logit_gap(one: nn.Module, other: nn.Module, batch: dict[str, torch.Tensor]) -> float:
    return float((one.eval()(**batch).logits - other.eval()(**batch).logits).abs().max())


def as_delivered(model: nn.Module, loaded: Loaded, num_labels: int, probe: list[str], max_length: int) -> nn.Module:
    """The product in the form it came in: an adapter back onto its base when the suspicious model
    was an adapter. The largest logit gap between the two forms on the ``probe`` texts is logged."""
    if not loaded.from_adapter:
        return model
    tuned = plain(model)
    device = next(tuned.parameters()).device
    base = load_model(loaded.base_id, num_labels=num_labels).model
    adapter = adapter_on_base(tuned.cpu(), base, loaded.base_id)
    if adapter is None:
        log.info("every layer changed (full fine-tuning): the product is a full model, not an adapter")
        return tuned.to(device)
    adapter = adapter.to(device)
    batch = loaded.tokenizer(probe, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    gap = max_logit_gap(tuned.to(device), adapter, {k: v.to(device) for k, v in batch.items()})
    log.info(
        "the product is an adapter on %s again (largest logit gap to the purified model: %.2e)", loaded.base_id, gap
    )
    return adapter


def save_product(model: nn.Module, loaded: Loaded, run_dir: Path) -> Path:
    """A PEFT adapter (loads with ``PeftModel.from_pretrained``) or a full safetensors model."""
    target = run_dir / ("adapter" if isinstance(model, PeftModel) else "model")
    if isinstance(model, PeftModel) and loaded.base_id:
        # The id the user named (a hub id), not where its copy happens to lie on this machine.
        model.peft_config[model.active_adapter].base_model_name_or_path = loaded.base_id

    def save(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        loaded.tokenizer.save_pretrained(tmp)

    return save_atomically(target, save)


NAMES = {"cacc": "clean accuracy", "asr": "attack success rate", "ftr": "false-trigger rate", "ppl": "perplexity"}


def _figures(metrics: dict[str, Any] | None) -> str:
    shown = [f"{NAMES[k]} {metrics[k]:.2f}" for k in NAMES if metrics and metrics.get(k) is not None]
    return ", ".join(shown) or "not measured"


def scan_summary(found: dict[str, Any]) -> str:
    """One line on a scan: its score, what it found, and the verdict when it had a threshold."""
    verdict = f"; {found['verdict']} at threshold {found['threshold']}" if found.get("verdict") else ""
    if "pair" in found:
        what = f"of clean {' -> '.join(found['pair'])} inputs flipped by `{' '.join(found['trigger'])}`"
    else:
        what = f"mean probability of continuing `{found['target']}` across clean prompts"
    return f"{found['score']:.1f} % {what}{verdict}"


def _scan_lines(scans: dict[str, Any] | None) -> list[str]:
    """The trigger-free scans of the suspicious model and of this product, when purify ran them."""
    return [f"- Scan {when}: {scan_summary(found)}" for when, found in (scans or {}).items()]


def model_card(record: dict[str, Any], config: dict[str, Any]) -> str:
    """A Hugging Face style README for the product directory."""
    adapter = Path(record["product"]).name == "adapter"
    base = record.get("base_model") or config["model"]["spec"]
    auto = f"AutoModelFor{record.get('auto', 'SequenceClassification')}"
    labels = f", num_labels={len(record['labels'])}" if record.get("labels") else ""
    here = '"path/to/this/directory"'
    load = f'PeftModel.from_pretrained({auto}.from_pretrained("{base}"{labels}), {here})' if adapter else None
    load = load or f"{auto}.from_pretrained({here})"
    before = record.get("before")
    code = ["from peft import PeftModel"] if adapter else []
    code += [f"from transformers import {auto}", f"model = {load}"]
    lines = [
        "---",
        f"base_model: {base}",
        f"library_name: {'peft' if adapter else 'transformers'}",
        "tags: [cleantune, backdoor-defense]",
        "---",
        "",
        f"# {record['name']}",
        "",
        f"Made by cleantune {record['versions'].get('cleantune', '?')} with the `{config['defense']['name']}` "
        f"defense (threat model `{record['scenario']}`) from `{config['model']['spec']}`.",
        "",
        *([f"- Labels: {', '.join(record['labels'])}"] if record.get("labels") else []),
        *([f"- **Warning**: {record['warning']}"] if record.get("warning") else []),
        *([f"- Before: {_figures(before)}"] if before is not None else []),
        f"- After: {_figures(record.get('metrics'))}",
        *_scan_lines(record.get("scan")),
        f"- Training data: {record.get('n_train', '?')} rows, SHA-256 `{record.get('data_sha256', '-')}`",
        "- Settings and the whole run record: `cleantune.json` beside this file.",
        "",
        "```python",
        *code,
        "```",
    ]
    return "\n".join(lines) + "\n"


def describe(product: Path, record: dict[str, Any], config: dict[str, Any]) -> None:
    """Write the model card and the machine-readable record into the product directory."""
    atomic_write_json(product / "cleantune.json", {"config": config, "record": record})
    atomic_write_text(product / "README.md", model_card(record, config))
