"""Scanning a model for a backdoor without its trigger. A generative model goes to target inversion
(``generative/target_inversion.py``); a classifier (an encoder, or a decoder that scores its last
token) to trigger inversion in the style of DBS (Shen et al., 2022), on the model and clean data
alone, here.

For each (source, target) label pair, a relaxed trigger of a few token slots (a softmax over the
vocabulary per slot, its temperature lowered step by step until each slot settles on one token) is
inserted at the start of clean source-label inputs (after an encoder's [CLS] or a decoder's BOS) and
optimised to turn them into the target label. The settled tokens are then inserted into other clean
source-label inputs the model classifies correctly: the share turned into the target is the pair's
flip rate, and the model's score is its most suspicious pair's. A backdoor gives a short trigger that
flips nearly everything; a clean model's best few tokens flip fewer inputs. How many fewer depends on
the task (a sentiment model is moved by ordinary sentiment words), so a verdict needs a threshold
measured on clean models of the same task: without one the scan reports its score and no verdict.

Ordinary label words move every model of the task; a backdoor's trigger moves only its own. Given
clean reference models of the same task and vocabulary (trusted ones: trained by the defender on
clean data), the scan looks for that difference: the relaxed trigger is optimised to turn the
scanned model to the target while each reference keeps the source label (with ``reference_clamp``,
while no reference moves further from the source than it is without a trigger; with
``reference_objective`` off, on the scanned model alone), and a pair's score is the share of
held-out inputs its trigger flips in the scanned model less the share it flips in the reference it
flips most.

The scanner sees the model and clean data only: no attack record, trigger or triggered test set.
"""

from __future__ import annotations

import itertools
import random
import time
from pathlib import Path
from typing import Any, cast

import torch
from pydantic import Field, PositiveInt, model_validator
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from cleantune.data import DataConfig, load_splits
from cleantune.defenses.base import is_decoder_classifier
from cleantune.errors import CleantuneError
from cleantune.generative.instructions import read_instructions
from cleantune.generative.target_inversion import TargetInversionConfig, invert_target
from cleantune.io import atomic_write_json
from cleantune.models import Loaded, detect_task, load_model
from cleantune.schema import StrictModel


class ScanConfig(StrictModel):
    tokens: PositiveInt = 3  # trigger slots
    steps: PositiveInt = 200  # optimisation steps per label pair
    lr: float = Field(0.5, gt=0)
    temperature: tuple[float, float] = (2.0, 0.05)  # from, to (geometric), so the slots settle on tokens
    samples: PositiveInt = 64  # clean source-label inputs the trigger is optimised on
    holdout: PositiveInt = 200  # other clean source-label inputs its flip rate is measured on
    batch_size: PositiveInt = 32
    max_length: PositiveInt = 128
    # Score (%: the flip rate, or its excess over the references') at or above which the model is
    # reported backdoored; measure it on clean models of the same task at the false-positive rate
    # you accept. None: the score, no verdict.
    threshold: float | None = Field(None, ge=0, le=100)
    # Clean classifiers of the same task and vocabulary (directories or hub ids) the trigger must not
    # move; none: the trigger is optimised on the scanned model alone and scored by its flip rate.
    reference: list[str] = Field(default_factory=list)
    # Whether the references enter the trigger's optimisation (True) or only its score (False: the
    # trigger is the one the scanned model alone gives, then discounted by what it does to them).
    reference_objective: bool = True
    # With the references in the optimisation: count only what the trigger adds to a reference's
    # trigger-free loss, so a word that pushes a reference further towards the source earns nothing.
    reference_clamp: bool = False
    seed: int = 42

    @model_validator(mode="after")
    def _clamp_needs_objective(self) -> ScanConfig:
        if self.reference_clamp and not self.reference_objective:
            raise ValueError("reference_clamp goes with reference_objective: true")
        return self


def with_trigger(
    ids: torch.Tensor, mask: torch.Tensor, trigger: torch.Tensor, starts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``trigger`` (slots, ...) inserted into each row of ``ids`` (token ids or embeddings) at its
    position in ``starts``, the attention mask grown to match."""
    ones = torch.ones(trigger.shape[0], dtype=mask.dtype)
    cut = starts.tolist()
    inserted = torch.stack([torch.cat([row[:s], trigger, row[s:]]) for row, s in zip(ids, cut, strict=True)])
    masks = torch.stack([torch.cat([row[:s], ones, row[s:]]) for row, s in zip(mask, cut, strict=True)])
    return inserted, masks


def _loss(
    model: PreTrainedModel, weights: torch.Tensor | None, batch: dict[str, torch.Tensor], label: int
) -> torch.Tensor:
    """Cross-entropy towards ``label`` of each input of ``batch`` with the relaxed trigger ``weights``
    (slots, vocabulary) inserted, read through ``model``'s own embeddings; None: without a trigger."""
    lookup = cast(nn.Embedding, model.get_input_embeddings())
    embeds, mask = lookup(batch["input_ids"]), batch["attention_mask"]
    if weights is not None:
        embeds, mask = with_trigger(embeds, mask, weights @ lookup.weight, batch["start"])
    # A decoder handed embeddings scores the last position: its inputs are padded on the left (tokenised).
    logits = model(inputs_embeds=embeds, attention_mask=mask).logits
    return F.cross_entropy(logits, torch.full((embeds.shape[0],), label), reduction="none")


def kept_term(losses: torch.Tensor, floor: torch.Tensor | None) -> torch.Tensor:
    """A reference's part of the objective: its loss towards the source with the trigger, or (clamped
    at its trigger-free ``floor``) only what the trigger adds to that loss."""
    return (losses if floor is None else F.relu(losses - floor)).mean()


def invert(
    model: PreTrainedModel,
    batches: list[dict[str, torch.Tensor]],
    pair: tuple[int, int],
    banned: list[int],
    cfg: ScanConfig,
    references: list[PreTrainedModel],
) -> tuple[list[int], float]:
    """The trigger tokens that best turn ``batches`` from the pair's source label into its target
    while ``references`` keep the source, and the final loss (a progress bar per label pair: a scan
    of a real model takes minutes on a CPU)."""
    source, target = pair
    vocabulary = cast(nn.Embedding, model.get_input_embeddings()).num_embeddings
    generator = torch.Generator().manual_seed(cfg.seed)
    logits = nn.Parameter(0.01 * torch.randn(cfg.tokens, vocabulary, generator=generator))
    forbidden = torch.zeros(vocabulary)
    forbidden[banned] = float("-inf")  # special tokens are no trigger
    optimizer = torch.optim.Adam([logits], lr=cfg.lr)
    start, end = cfg.temperature
    loss = torch.tensor(0.0)
    guarded = references if cfg.reference_objective else []  # what moves the clean references too is no trigger
    with torch.no_grad():
        floors = [[_loss(r, None, b, source) if cfg.reference_clamp else None for b in batches] for r in guarded]
    steps = tqdm(
        zip(range(cfg.steps), itertools.cycle(enumerate(batches))), total=cfg.steps, desc=f"scan: to label {target}"
    )
    for step, (index, batch) in steps:
        temperature = start * (end / start) ** (step / max(1, cfg.steps - 1))
        weights = F.softmax((logits + forbidden) / temperature, dim=-1)  # (slots, vocabulary)
        loss = _loss(model, weights, batch, target).mean()
        if guarded:
            terms = [
                kept_term(_loss(r, weights, batch, source), f[index]) for r, f in zip(guarded, floors, strict=True)
            ]
            loss = loss + sum(terms) / len(terms)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return (logits.detach() + forbidden).argmax(dim=-1).tolist(), float(loss.detach())


@torch.no_grad()
def predict(model: PreTrainedModel, batches: list[dict[str, torch.Tensor]], trigger: list[int] | None) -> torch.Tensor:
    found = []
    for batch in batches:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if trigger is not None:
            ids, mask = with_trigger(ids, mask, torch.tensor(trigger), batch["start"])
        found.append(model(input_ids=ids, attention_mask=mask).logits.argmax(dim=-1))
    return torch.cat(found) if found else torch.zeros(0, dtype=torch.long)


def flip_rate(
    model: PreTrainedModel, held: list[dict[str, torch.Tensor]], correct: torch.Tensor, target: int, trigger: list[int]
) -> tuple[float, int]:
    """The share (%) of the ``held`` inputs ``model`` gets right (``correct``) that ``trigger`` turns
    into ``target``; and how many inputs that share is of."""
    flipped = predict(model, held, trigger)[correct] == target
    return (100.0 * float(flipped.float().mean()) if len(flipped) else 0.0), len(flipped)


def _leading_specials(tokenizer: PreTrainedTokenizerBase) -> int:
    """How many special tokens the tokenizer puts before a text ([CLS], BOS or none): a trigger goes after them."""
    word = tokenizer("a", add_special_tokens=False)["input_ids"]
    ids = tokenizer("a")["input_ids"]
    return next(i for i in range(len(ids)) if ids[i : i + len(word)] == word)


def tokenised(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], cfg: ScanConfig, decoder: bool
) -> list[dict[str, torch.Tensor]]:
    """Tokenised in batches, each row's trigger position in ``start``; a decoder's padded on the left,
    so that the last position it scores when handed embeddings is the last real token."""
    chunks = [texts[i : i + cfg.batch_size] for i in range(0, len(texts), cfg.batch_size)]
    limit = cfg.max_length - cfg.tokens  # room for the trigger
    side = "left" if decoder else "right"
    settings: dict[str, Any] = {"truncation": True, "max_length": limit, "padding": True, "padding_side": side}
    lead = _leading_specials(tokenizer)
    batches = []
    for chunk in chunks:
        batch = dict(tokenizer(chunk, return_tensors="pt", return_token_type_ids=False, **settings))
        batch["start"] = batch["attention_mask"].argmax(dim=1) + lead  # the first real token's place, past the lead
        batches.append(batch)
    return batches


def trigger_words(tokenizer: PreTrainedTokenizerBase, trigger: list[int]) -> list[str]:
    """Each trigger token as the text it stands for: a byte-level BPE's "Ġmn" or SentencePiece's
    "▁mn" reads "mn", so it can be compared with a planted word (a WordPiece "##" piece stays one)."""
    return [tokenizer.convert_tokens_to_string([t]).strip() or t for t in tokenizer.convert_ids_to_tokens(trigger)]


def _frozen(model: PreTrainedModel) -> PreTrainedModel:
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def scan_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: dict[int, list[str]],
    cfg: ScanConfig,
    references: list[PreTrainedModel] | None = None,
) -> dict[str, Any]:
    """Invert a trigger for every (source, target) pair of ``texts`` (clean inputs by label), against
    the clean ``references`` when given."""
    model, references = _frozen(model), [_frozen(r) for r in references or []]
    decoder = is_decoder_classifier(model)  # an adapter answers for its base model
    banned = sorted(set(tokenizer.all_special_ids))
    pairs: list[dict[str, Any]] = []
    for source in sorted(texts):
        rows = texts[source][:]
        random.Random(f"scan-{cfg.seed}-{source}").shuffle(rows)
        fit = tokenised(tokenizer, rows[: cfg.samples], cfg, decoder)
        held = tokenised(tokenizer, rows[cfg.samples :][: cfg.holdout], cfg, decoder)
        # The inputs each model gets right without a trigger: the ones a trigger can flip.
        correct = [predict(m, held, None) == source for m in (model, *references)]
        for target in sorted(set(texts) - {source}):
            trigger, loss = invert(model, fit, (source, target), banned, cfg, references)
            rate, n = flip_rate(model, held, correct[0], target, trigger)
            words = trigger_words(tokenizer, trigger)
            pair = {"source": source, "target": target, "flip_rate": rate, "trigger": words, "loss": loss, "n": n}
            if references:
                moved = max(
                    flip_rate(r, held, c, target, trigger)[0] for r, c in zip(references, correct[1:], strict=True)
                )
                pair |= {"reference_flip_rate": moved, "excess": rate - moved}
            pairs.append(pair)
    worst = max(pairs, key=lambda p: p["excess" if references else "flip_rate"])
    score: float = worst["excess" if references else "flip_rate"]
    found: dict[str, Any] = {"score": score, "source": worst["source"], "target": worst["target"]}
    found |= {"trigger": worst["trigger"], "pairs": pairs}
    return found


AnyScanConfig = ScanConfig | TargetInversionConfig


def settings_for(model: str | Path, tree: dict[str, Any]) -> AnyScanConfig:
    """The scan settings of ``model``'s task: trigger inversion for a classifier, target inversion
    for a generative model."""
    kind = ScanConfig if detect_task(str(model)) == "classification" else TargetInversionConfig
    try:
        return kind.model_validate(tree)
    except ValueError as err:  # pydantic's ValidationError
        raise CleantuneError(f"invalid scan settings: {err}".splitlines()[0]) from None


def scan(
    model: str | Path, clean_data: str | Path, out: str | Path | None = None, cfg: AnyScanConfig | None = None
) -> dict[str, Any]:
    """Scan a classifier or a generative model (a model or an adapter, safetensors only) with clean
    data: labelled texts (a CSV/TSV/JSON(L) file with text and label columns) for a classifier,
    instructions for a generative model. Writes the result as JSON to ``out``."""
    cfg = cfg or settings_for(model, {})
    started = time.time()
    if isinstance(cfg, TargetInversionConfig):
        instructions = read_instructions(str(Path(clean_data).resolve()), Path.cwd())
        loaded = load_model(str(model))
        named, base = _generative_references(cfg, loaded)
        references = [_reference(path, loaded.tokenizer) for path in named]
        found = invert_target(loaded.model, loaded.tokenizer, instructions, cfg, references, base)
        found["references"] = [loaded.base_id] * base + named
    else:
        found = _scan_classifier(model, clean_data, cfg)
    found |= {"model": str(model), "clean_data": str(clean_data), "seconds": round(time.time() - started, 1)}
    found["config"] = cfg.model_dump(mode="json")
    found["threshold"] = cfg.threshold
    found["verdict"] = None if cfg.threshold is None else ("backdoored" if found["score"] >= cfg.threshold else "clean")
    if out is not None:
        atomic_write_json(Path(out), found)
    return found


def _scan_classifier(model: str | Path, clean_data: str | Path, cfg: ScanConfig) -> dict[str, Any]:
    splits = load_splits(DataConfig(dataset="local", train=str(Path(clean_data).resolve())), cfg.seed)
    rows = [*splits.train, *splits.dev, *splits.test]
    texts = {label: [r["text"] for r in rows if r["label"] == label] for label in range(splits.num_labels)}
    short = [splits.label_names[k] for k, v in texts.items() if len(v) <= cfg.samples]
    if short:
        raise CleantuneError(f"{clean_data}: fewer than {cfg.samples + 1} clean inputs of label(s) {', '.join(short)}")
    loaded = load_model(str(model), num_labels=splits.num_labels)
    references = [_reference(path, loaded.tokenizer, splits.num_labels) for path in cfg.reference]
    return scan_model(loaded.model, loaded.tokenizer, texts, cfg, references) | {"labels": splits.label_names}


def _reference(path: str, tokenizer: PreTrainedTokenizerBase, num_labels: int | None = None) -> PreTrainedModel:
    """A clean reference model, refused unless it reads the scanned model's token ids as the same words."""
    loaded = load_model(path, num_labels=num_labels)
    if loaded.tokenizer.get_vocab() != tokenizer.get_vocab():
        raise CleantuneError(f"reference {path}: its vocabulary differs from the scanned model's")
    return loaded.model


def _generative_references(cfg: TargetInversionConfig, scanned: Loaded) -> tuple[list[str], bool]:
    """The reference models target inversion loads, and whether the scanned adapter's own base is one
    ("base"); a full model has no base, which is an error only where it was asked for, not defaulted."""
    from peft import PeftModel

    named = [path for path in cfg.reference if path != "base"]
    if "base" not in cfg.reference or isinstance(scanned.model, PeftModel):
        return named, "base" in cfg.reference
    if "reference" in cfg.model_fields_set:
        raise CleantuneError(f"reference 'base' names an adapter's base model; {scanned.path} is a full model")
    return named, False
