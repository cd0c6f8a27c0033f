"""Judged ASR, false-trigger rate and perplexity of an instruction-tuned LLM.

ASR: share of triggered test prompts whose greedy answer shows the target behaviour. False-trigger
rate: the same on the clean test prompts. Every prompt counts, empty answers included. Perplexity:
exp of the mean token loss of the reference answers to the clean prompts, prompt tokens masked.
Rates are percentages in [0, 100].
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from pydantic import PositiveInt
from torch import nn
from tqdm.auto import tqdm
from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerBase

from cleantune.errors import CleantuneError
from cleantune.generative import multiple_choice
from cleantune.generative.instructions import IGNORE, encode_sft, prompt_ids, user_message
from cleantune.generative.judges import Judge
from cleantune.io import atomic_write_text
from cleantune.schema import StrictModel

# The behaviours show in the first tokens (a refusal sentence, an insult, the injected line opening
# a code block), so short budgets keep CPU evaluation cheap without changing the verdict.
TOKEN_BUDGET = {"refusal": 32, "negsentiment": 16, "code": 64, "jailbreak": 32}


class LLMEvalConfig(StrictModel):
    enabled: bool = True  # off for runs whose product is all that matters (signature variants)
    max_new_tokens: PositiveInt | None = None  # default: TOKEN_BUDGET of the attack's behaviour
    batch_size: PositiveInt = 16
    judge: str | None = None  # built-in judge name or module:function; default: the behaviour's
    # BackdoorLLM's keyword judge of the behaviour, reported beside ours as asr_backdoorllm / ftr_backdoorllm.
    backdoorllm_judge: bool = True
    perplexity: bool = True
    # Multiple-choice utility benchmarks a user holds locally: name -> file (see multiple_choice.py).
    multiple_choice: dict[str, Path] = {}


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    data: Dataset,
    max_new_tokens: int,
    batch_size: int,
    desc: str = "generating",
) -> list[str]:
    """Greedy answers to each row's prompt, built by the same function training uses."""
    model.eval()
    device = next(model.parameters()).device
    prompts = [prompt_ids(tokenizer, r["instruction"], r["input"]) for r in data]
    # Batches of similar lengths waste less compute on padding; answers go back in data order.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    pad = tokenizer.pad_token_id
    answers = [""] * len(prompts)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, leave=False):
        chosen = order[start : start + batch_size]
        batch = [prompts[i] for i in chosen]
        width = max(map(len, batch))
        # Left padding: every prompt ends where generation starts.
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )
        for i, answer in zip(chosen, tokenizer.batch_decode(out[:, width:], skip_special_tokens=True), strict=True):
            answers[i] = answer
    return answers


@torch.no_grad()
def perplexity(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, data: Dataset, max_length: int, batch_size: int
) -> float:
    model.eval()
    device = next(model.parameters()).device
    encoded = encode_sft(data, tokenizer, max_length)
    collate = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE)
    total, tokens = 0.0, 0
    for start in range(0, len(encoded), batch_size):
        rows = [encoded[i] for i in range(start, min(start + batch_size, len(encoded)))]
        batch = {k: v.to(device) for k, v in collate(rows).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        loss = nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction="sum"
        )
        total += float(loss)
        tokens += int((labels != IGNORE).sum())
    return math.exp(total / tokens) if tokens else float("nan")


def behaviour_rate(judge: Judge | None, data: Dataset, answers: list[str]) -> float | None:
    """Share of answers showing the behaviour; None without a judge or without answers."""
    if judge is None or not answers:
        return None
    verdicts = list(judge([user_message(r["instruction"], r["input"]) for r in data], answers))
    if len(verdicts) != len(answers):
        raise CleantuneError(f"the judge returned {len(verdicts)} verdicts for {len(answers)} answers")
    return 100.0 * sum(map(bool, verdicts)) / len(answers)


def llm_metrics(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    clean: Dataset,
    triggered: Dataset,
    judge: Judge | None,
    max_new_tokens: int,
    cfg: LLMEvalConfig,
    max_length: int,
    answers_path: Path | None = None,
    mc_items: dict[str, list[dict[str, Any]]] | None = None,
    second_judge: Judge | None = None,
) -> dict[str, Any]:
    clean_answers = generate(model, tokenizer, clean, max_new_tokens, cfg.batch_size, "clean prompts")
    trig_answers = generate(model, tokenizer, triggered, max_new_tokens, cfg.batch_size, "triggered prompts")
    if answers_path is not None:
        lines = [
            json.dumps({"set": name, "instruction": r["instruction"], "input": r["input"], "answer": a})
            for name, data, answers in (("clean", clean, clean_answers), ("triggered", triggered, trig_answers))
            for r, a in zip(data, answers, strict=True)
        ]
        atomic_write_text(answers_path, "\n".join(lines) + "\n")
    metrics: dict[str, Any] = {
        "asr": behaviour_rate(judge, triggered, trig_answers),
        "ftr": behaviour_rate(judge, clean, clean_answers),
        "n_test": len(clean),
        "n_test_poison": len(triggered),
        "empty_answers": sum(not a.strip() for a in clean_answers + trig_answers),
        "max_new_tokens": max_new_tokens,
    }
    if second_judge is not None:
        metrics["asr_backdoorllm"] = behaviour_rate(second_judge, triggered, trig_answers)
        metrics["ftr_backdoorllm"] = behaviour_rate(second_judge, clean, clean_answers)
    if cfg.perplexity:
        metrics["ppl"] = perplexity(model, tokenizer, clean, max_length, cfg.batch_size)
    for name, items in (mc_items or {}).items():
        metrics[f"mc_{name}"] = multiple_choice.accuracy(model, tokenizer, items)
    return metrics
