"""ONION (Qi et al., 2021): remove the words that make a test input improbable, then classify.

An inserted trigger word raises a sentence's perplexity under a language model. Each word's
suspicion is how much the perplexity falls without it; words above a threshold are removed before
the input reaches the classifier. The paper uses GPT-2; the default here is the packaged
SmolLM2-135M (any causal LM by ``lm``). The threshold is the lowest one (most words removed) whose
clean dev accuracy stays within ``max_dev_drop`` points of the unfiltered accuracy; it never sees
triggered data. Suspicion depends only on the LM and the text, so it is cached per text and shared
by every run that scores the same sentences (the clean test set of every attack).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field, PositiveInt
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from cleantune.defenses.base import DefenseContext, InputScreen, Screened, Victim
from cleantune.defenses.data_level import Under, accuracy, deletion_variants, dev_sample, words
from cleantune.defenses.finetune import FineTuneConfig
from cleantune.models import load_model
from cleantune.offline import SMOLLM2_ID, cache_dir
from cleantune.registry import CLASSIFICATION
from cleantune.schema import StrictModel

# Grid of candidate thresholds, as quantiles of the clean dev words' suspicion.
QUANTILES = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995)


class OnionConfig(StrictModel):
    name: Literal["onion"] = "onion"
    under: Under = FineTuneConfig(name="none")
    lm: str = SMOLLM2_ID  # hub id, local directory or packaged copy of a causal LM
    max_dev_drop: float = Field(2.0, ge=0)  # points of clean dev accuracy the filtering may cost
    dev_samples: PositiveInt = 300
    lm_batch_size: PositiveInt = 32
    lm_max_tokens: PositiveInt = 128
    cache: bool = True


@torch.no_grad()
def perplexities(
    lm: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: list[str], batch_size: int, max_tokens: int
) -> np.ndarray:
    """Per-text perplexity after a BOS (or EOS) token; NaN for a text with no tokens."""
    lm.eval()
    device = next(lm.parameters()).device
    start_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    ids = [[start_id, *row[:max_tokens]] for row in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    out = np.full(len(texts), np.nan)
    order = np.argsort([len(row) for row in ids], kind="stable")
    for begin in range(0, len(order), batch_size):
        chosen = order[begin : begin + batch_size]
        width = max(len(ids[i]) for i in chosen)
        batch = torch.zeros((len(chosen), width), dtype=torch.long)
        mask = torch.zeros_like(batch)
        for row, i in enumerate(chosen):
            batch[row, : len(ids[i])] = torch.tensor(ids[i])
            mask[row, : len(ids[i])] = 1
        batch, mask = batch.to(device), mask.to(device)
        logits = lm(input_ids=batch, attention_mask=mask).logits[:, :-1].float()
        nll = nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")
        counted = mask[:, 1:].float()
        mean = (nll * counted).sum(1) / counted.sum(1)
        out[chosen] = torch.exp(mean).cpu().numpy()
    return out


def suspicion(ppl_full: float, ppl_without: np.ndarray) -> np.ndarray:
    # Qi et al. (2021): f_i = p_0 - p_i, the drop in perplexity when word i is removed.
    return np.nan_to_num(ppl_full - ppl_without, nan=0.0)


class Onion(InputScreen):
    scenarios = frozenset({"poisoned-data", "poisoned-weights"})

    def __init__(self, cfg: OnionConfig) -> None:
        super().__init__(cfg)
        self._lm: tuple[nn.Module, PreTrainedTokenizerBase] | None = None
        self._cache_file: Path | None = None
        self._scores: dict[str, list[float]] = {}
        self.threshold: float | None = None

    def _language_model(self) -> tuple[nn.Module, PreTrainedTokenizerBase]:
        if self._lm is None:
            loaded = load_model(self.cfg.lm)
            self._lm = (loaded.model.to("cuda" if torch.cuda.is_available() else "cpu"), loaded.tokenizer)
            self.decided["lm"] = str(loaded.path)
            if self.cfg.cache:
                lm_key = hashlib.sha256(f"{loaded.path.resolve()}|{self.cfg.lm_max_tokens}".encode()).hexdigest()[:16]
                self._cache_file = cache_dir() / "onion" / f"{lm_key}.jsonl"
                self._scores = self._read_cache(self._cache_file)
        return self._lm

    @staticmethod
    def _read_cache(path: Path) -> dict[str, list[float]]:
        scores: dict[str, list[float]] = {}
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by an interruption; it is recomputed
                scores[entry["key"]] = entry["scores"]
        return scores

    def word_suspicion(self, texts: list[str], chunk: int = 64) -> list[np.ndarray]:
        """Suspicion of every word of every text, computed once per text and LM."""
        lm, tokenizer = self._language_model()
        keys = [hashlib.sha256(text.encode()).hexdigest() for text in texts]
        missing = list(dict.fromkeys(i for i, key in enumerate(keys) if key not in self._scores))
        for begin in tqdm(range(0, len(missing), chunk), desc="onion: word suspicion", unit="chunk"):
            todo = missing[begin : begin + chunk]
            variants, spans = deletion_variants([texts[i] for i in todo])
            ppl = perplexities(lm, tokenizer, variants, self.cfg.lm_batch_size, self.cfg.lm_max_tokens)
            fresh = {
                keys[i]: suspicion(ppl[at], ppl[at + 1 : at + 1 + n]).tolist()
                for i, (at, n) in zip(todo, spans, strict=True)
            }
            self._scores |= fresh
            if self._cache_file is not None:
                self._cache_file.parent.mkdir(parents=True, exist_ok=True)
                with self._cache_file.open("a", encoding="utf-8") as handle:
                    handle.writelines(json.dumps({"key": k, "scores": v}) + "\n" for k, v in fresh.items())
        return [np.asarray(self._scores[key]) for key in keys]

    @staticmethod
    def filtered(texts: list[str], scores: list[np.ndarray], threshold: float) -> list[str]:
        return [
            " ".join(w for w, f in zip(words(text), score, strict=True) if f <= threshold)
            for text, score in zip(texts, scores, strict=True)
        ]

    def calibrate(self, victim: Victim, ctx: DefenseContext) -> None:
        dev = dev_sample(ctx, self.cfg.dev_samples)
        texts, labels = list(dev["text"]), list(dev["label"])
        scores = self.word_suspicion(texts)
        pooled_scores = np.concatenate([s for s in scores if len(s)])
        floor = accuracy(victim, texts, labels) - self.cfg.max_dev_drop
        self.threshold = float("inf")  # nothing removed, when every candidate costs too much accuracy
        for candidate in sorted(set(np.quantile(pooled_scores, QUANTILES).tolist())):
            if accuracy(victim, self.filtered(texts, scores, candidate), labels) >= floor:
                self.threshold = candidate
                break
        removed = float(np.mean(pooled_scores > self.threshold) * 100)
        self.decided |= {"threshold": min(self.threshold, np.finfo(np.float64).max), "dev_accuracy_floor": floor}
        self.decided["dev_words_removed_pct"] = removed

    def screen(self, victim: Victim, texts: list[str]) -> Screened:
        if self.threshold is None:
            raise RuntimeError("ONION screens inputs only after calibrate() has chosen its threshold")
        cleaned = self.filtered(texts, self.word_suspicion(texts), self.threshold)
        return Screened(cleaned, np.zeros(len(texts), dtype=bool))


CLASSIFICATION.register(OnionConfig, Onion)
