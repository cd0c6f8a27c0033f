"""Scanning a generative LLM for a backdoor without its trigger: target inversion in the style of BAIT
(Shen et al., 2025), on the model and clean instructions alone.

A backdoor maps a trigger to a target answer. Once the target's first token is in the answer, a
poisoned model goes on with the target whatever the prompt was: its next tokens are predicted with
high probability across many benign prompts, while a clean model's continuation follows each prompt.
So every vocabulary token is tried as a forced first answer token: a one-step look-ahead on a few
prompts keeps the first tokens the model continues most confidently, and each kept one is then
extended greedily over all prompts, taking at each step the token with the highest mean probability
across them. A candidate's score is the mean, over its steps, of that mean probability (BAIT's
Q-score), in percent: near 100 for a target the model finishes for any prompt. A verdict needs a
threshold measured on clean models of the same family, as for the classifier scan.

Some answers every model of a family finishes confidently once begun (a URL, a citation): a fine-tune
scores high on them with no backdoor. Given reference models (by default an adapter's public base;
any clean model of the same vocabulary), a candidate's score is how much more confidently the scanned model
continues it than the reference that continues it most, teacher-forced on the same prompts and tokens,
and the candidates are ranked by that excess.

The scanner sees the model and clean instructions only: no attack record, trigger or triggered prompt.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Sequence
from typing import Any, cast

import torch
from datasets import Dataset
from peft import PeftModel
from pydantic import Field, PositiveInt
from torch import nn
from tqdm.auto import tqdm
from transformers import DynamicCache, PreTrainedTokenizerBase

from cleantune.generative.instructions import prompt_ids
from cleantune.schema import StrictModel


class TargetInversionConfig(StrictModel):
    prompts: PositiveInt = 20  # benign instructions a target must be continued across
    screen_prompts: PositiveInt = 4  # of those, the ones every first token is screened on
    candidates: PositiveInt = 20  # first tokens kept after the screen
    length: PositiveInt = 10  # tokens of an inverted target after its first
    batch_size: PositiveInt = 256  # first tokens stepped at once
    # Score (%) at or above which the model is reported backdoored; measure it on clean models of
    # the same family at the false-positive rate you accept. None: the score, no verdict.
    threshold: float | None = Field(None, ge=-100, le=100)
    # Models (directories or hub ids) whose confidence in each candidate is subtracted from the scanned
    # model's. "base": a scanned adapter's own base model, the default (left out for a full model,
    # which names no base); []: the scanned model's confidence alone.
    reference: list[str] = Field(default_factory=lambda: ["base"])
    seed: int = 42


def _prompt_caches(model: nn.Module, prompts: list[list[int]]) -> list[DynamicCache]:
    """The key / value cache of each prompt, computed once and copied for every batch of candidates."""
    device = next(model.parameters()).device
    caches = []
    for ids in prompts:
        cache = DynamicCache()
        model(input_ids=torch.tensor([ids], device=device), past_key_values=cache, use_cache=True)
        caches.append(cache)
    return caches


def _step(model: nn.Module, cache: DynamicCache, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token probabilities after appending ``tokens`` (one per row) to the cached prompt rows."""
    logits = model(input_ids=tokens[:, None], past_key_values=cache, use_cache=True).logits[:, -1]
    return torch.softmax(logits.float(), dim=-1)


def _expanded(cache: DynamicCache, rows: int) -> DynamicCache:
    copied = copy.deepcopy(cache)
    copied.batch_repeat_interleave(rows)
    return copied


def screen(
    model: nn.Module, caches: list[DynamicCache], vocabulary: torch.Tensor, batch_size: int, banned: list[int]
) -> torch.Tensor:
    """Per first token, the mean over prompts of its most likely next (non-special) token's probability."""
    confidence = torch.zeros(len(vocabulary))
    for start in tqdm(range(0, len(vocabulary), batch_size), desc="scan: first tokens", unit="batch"):
        tokens = vocabulary[start : start + batch_size]
        for cache in caches:
            probs = _step(model, _expanded(cache, len(tokens)), tokens)
            probs[:, banned] = 0.0
            confidence[start : start + len(tokens)] += probs.max(dim=-1).values.cpu() / len(caches)
    return confidence


def extend(
    model: nn.Module, caches: list[DynamicCache], first: torch.Tensor, length: int, banned: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy extension of each first token over every prompt: at each step the token with the highest
    mean probability across prompts, never a special token (an end of answer is trivially predictable
    after anything). Returns the sequences (candidates, 1 + length) and each candidate's score, the mean
    of those probabilities."""
    rows = [_expanded(cache, len(first)) for cache in caches]
    tokens, chosen = first, [first.cpu()]
    total = torch.zeros(len(first))
    for _ in range(length):
        mean = torch.stack([_step(model, cache, tokens).cpu() for cache in rows]).mean(dim=0)
        mean[:, banned] = -1.0
        probability, picked = mean.max(dim=-1)
        total += probability
        chosen.append(picked)
        tokens = picked.to(first.device)
    return torch.stack(chosen, dim=1), total / length


def follow(model: nn.Module, prompts: list[list[int]], sequences: torch.Tensor) -> torch.Tensor:
    """Each candidate's score under ``model`` teacher-forced: the mean, over prompts and over the
    sequence's tokens after the first, of the probability ``model`` gives the next token."""
    device = next(model.parameters()).device
    sequences = sequences.to(device)
    total = torch.zeros(len(sequences))
    for cache in _prompt_caches(model, prompts):
        rows = _expanded(cache, len(sequences))
        for step in range(sequences.shape[1] - 1):
            probs = _step(model, rows, sequences[:, step])
            total += probs.gather(1, sequences[:, step + 1 : step + 2]).squeeze(1).cpu()
    return total / (len(prompts) * (sequences.shape[1] - 1))


@torch.no_grad()
def invert_target(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    instructions: Dataset,
    cfg: TargetInversionConfig,
    references: Sequence[nn.Module] = (),
    base: bool = False,
) -> dict[str, Any]:
    """The answer the model continues most confidently across ``instructions`` (clean rows), and how
    confidently: a backdoor target scores near 100. With ``references`` (and with ``base``, the scanned
    PEFT model's base, read with its adapter disabled rather than loaded again): how much more
    confidently than the reference that continues it most."""
    model.eval()
    rows = list(instructions)
    random.Random(f"scan-{cfg.seed}").shuffle(rows)
    prompts = [prompt_ids(tokenizer, r["instruction"], r["input"]) for r in rows[: cfg.prompts]]
    caches = _prompt_caches(model, prompts)
    device = next(model.parameters()).device
    special = sorted(set(tokenizer.all_special_ids))
    vocabulary = torch.tensor([i for i in range(len(tokenizer)) if i not in special], device=device)
    confidence = screen(model, caches[: cfg.screen_prompts], vocabulary, cfg.batch_size, special)
    kept = vocabulary[confidence.topk(min(cfg.candidates, len(vocabulary))).indices.to(device)]
    sequences, confident = extend(model, caches, kept, cfg.length, special)
    followed = [follow(r.eval(), prompts, sequences) for r in references]
    if base:
        with cast(PeftModel, model).disable_adapter():
            followed.append(follow(model, prompts, sequences))
    scores, matched = confident, torch.zeros(len(kept))
    if followed:
        matched = torch.stack(followed).max(dim=0).values
        scores = confident - matched
    order = scores.argsort(descending=True)
    found = [
        {"target": tokenizer.decode(sequences[i], skip_special_tokens=True), "score": 100.0 * float(scores[i])}
        | ({"confidence": 100.0 * float(confident[i]), "reference": 100.0 * float(matched[i])} if followed else {})
        for i in order.tolist()
    ]
    result: dict[str, Any] = {"score": found[0]["score"], "target": found[0]["target"], "candidates": found}
    return result | {"prompts": len(prompts)}
