"""W2SDefense (Zhao et al., 2025): a small clean teacher makes a poisoned student unlearn its backdoor.

Scenario: the defender holds a poisoned (larger) model and clean training data, and builds a small
teacher from a model it trusts. The teacher (default: the packaged MiniLM) is fully fine-tuned on the
clean data with a projection from its hidden size to the student's (Eqs. 4-5), trained once per
(teacher model, data, student width, seed) and cached; then only the student's PEFT parameters train
on α·CE + β·KD + γ·FA (Eq. 14). Teacher and student tokenise the same text with their own tokenizers.

As the authors' code: the teacher's feature is ReLU(projection([CLS])), its classifier sits on that
feature, and it is frozen during distillation. Their feature loss compares the last example's teacher
vector with every token of every student example (an indexing slip). Here example i of the student is
always paired with example i of the teacher: ``fa_on="tokens"`` (the authors' token-level loss) takes
every non-pad final-layer token state of example i, ``"pooled"`` one vector per example (its [CLS], or
for a decoder its last non-pad token). The loss weights (α, β, γ) come from the authors' per-attack
sets by name (``weights``); a defender who does not know the attack keeps one. Ablation switches
``kd`` and ``fa`` give Table 8's rows; ``student`` takes LoRA or a virtual-token method (Table 7).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from typing import Annotated, Any, Literal

import torch
from datasets import Dataset
from pydantic import Field, PositiveInt
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

from cleantune.defenses.base import Defense, DefenseContext, is_decoder_classifier, pooled
from cleantune.defenses.peft_baselines import LoraTuningConfig, VirtualTokenConfig, peft_model
from cleantune.io import atomic_dir, atomic_write_json, read_json
from cleantune.lora import LoraSpec
from cleantune.models import load_model
from cleantune.offline import MINILM_ID, cache_dir
from cleantune.registry import CLASSIFICATION
from cleantune.schema import StrictModel
from cleantune.training import SIDE, SideEncoding, TrainConfig, build_trainer, fit, tokenize


class TeacherConfig(StrictModel):
    """The authors' teacher training: full fine-tuning, 5 epochs at lr 2e-5 with 6 % warmup."""

    spec: str = MINILM_ID
    max_length: PositiveInt = 128
    epochs: float = Field(5.0, gt=0)
    lr: float = Field(2e-5, gt=0)
    warmup_ratio: float = Field(0.06, ge=0, lt=1)
    batch_size: PositiveInt = 32


# The authors' (α CE, β KD, γ FA) per attack.
WEIGHTS: dict[str, tuple[float, float, float]] = {
    "badnet": (5.0, 0.001, 0.001),
    "insent": (3.0, 0.01, 0.001),
    "synattack": (1.0, 0.035, 0.002),
}


class W2SDefenseConfig(StrictModel):
    name: Literal["w2sdefense"] = "w2sdefense"
    # The paper's student: LoRA r 512, alpha 512 on a 4,096-wide model, an eighth of its width.
    student: Annotated[LoraTuningConfig | VirtualTokenConfig, Field(discriminator="name")] = LoraTuningConfig(
        lora=LoraSpec(r=0.125, alpha="r")
    )
    teacher: TeacherConfig = TeacherConfig()
    weights: Literal["badnet", "insent", "synattack"] = "insent"
    # Each replaces its term's weight in the chosen set.
    ce_weight: float | None = Field(None, ge=0)  # α
    kd_weight: float | None = Field(None, ge=0)  # β
    fa_weight: float | None = Field(None, ge=0)  # γ
    temperature: float = Field(2.0, gt=0)
    kd: bool = True
    fa: bool = True
    fa_on: Literal["tokens", "pooled"] = "tokens"

    def loss_weights(self) -> tuple[float, float, float]:
        alpha, beta, gamma = WEIGHTS[self.weights]
        return (
            alpha if self.ce_weight is None else self.ce_weight,
            beta if self.kd_weight is None else self.kd_weight,
            gamma if self.fa_weight is None else self.fa_weight,
        )


class Teacher(nn.Module):
    """A trusted encoder, a projection to the student's width (Eq. 4) and a classifier on it."""

    def __init__(self, encoder: PreTrainedModel, student_hidden: int, num_labels: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.project = nn.Linear(encoder.config.hidden_size, student_hidden)
        self.classifier = nn.Linear(student_hidden, num_labels)

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **extra: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        # Eq. 4: z^(L+1) = W z^(L) + b on the [CLS] vector, then ReLU as in the authors' code
        return torch.relu(self.project(hidden[:, 0]))

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None, **extra: Any
    ) -> SequenceClassifierOutput:
        logits = self.classifier(self.features(input_ids, attention_mask, **extra))
        # Eq. 5: the teacher's own cross-entropy on the clean training data
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    # Eqs. 8-10: T² · KL(softmax(z_t / T) ‖ softmax(z_s / T)), averaged over the batch
    log_student = F.log_softmax(student_logits / temperature, dim=-1)
    teacher = F.softmax(teacher_logits / temperature, dim=-1)
    return F.kl_div(log_student, teacher, reduction="batchmean") * temperature**2


def feature_alignment_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    # Eqs. 11-12: mean over examples of ‖h_s,i − h_t,i‖², example i against example i
    return (student - teacher).pow(2).sum(dim=-1).mean()


def token_alignment_loss(hidden: torch.Tensor, attention_mask: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Eqs. 11-12 on every real token: ‖h_s,i,t − h_t,i‖² averaged over the batch's non-pad tokens.
    Virtual tokens a prompt method prepends (``hidden`` longer than the mask) are left out."""
    hidden = hidden[:, hidden.shape[1] - attention_mask.shape[1] :]
    distance = (hidden - teacher[:, None, :]).pow(2).sum(dim=-1)
    mask = attention_mask.to(distance.dtype)
    return (distance * mask).sum() / mask.sum()


def fingerprint(data: Dataset) -> str:
    digest = hashlib.sha256()
    for text, label in zip(data["text"], data["label"], strict=True):
        digest.update(f"{label}\t{text}\n".encode())
    return digest.hexdigest()


def teacher_for(cfg: TeacherConfig, ctx: DefenseContext, student_hidden: int) -> tuple[Teacher, Any, dict[str, Any]]:
    """The teacher for this clean data, trained on first use and cached under the user cache."""
    loaded = load_model(cfg.spec, num_labels=ctx.num_labels)
    key = {
        "teacher": cfg.model_dump(),
        "model_path": str(loaded.path),
        "train": fingerprint(ctx.train),
        "dev": fingerprint(ctx.dev),
        "student_hidden": student_hidden,
        "num_labels": ctx.num_labels,
        "seed": ctx.seed,
    }
    home = cache_dir() / "teachers" / hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    teacher = Teacher(loaded.model.base_model, student_hidden, ctx.num_labels)
    if (home / "teacher.json").exists():
        teacher.load_state_dict(load_file(home / "teacher.safetensors"))
        return (
            teacher.eval().requires_grad_(False),
            loaded.tokenizer,
            read_json(home / "teacher.json") | {"reused": True},
        )

    # Checkpoints live beside the cache entry, so an interrupted teacher resumes; the entry itself
    # appears only once the teacher is complete.
    partial = home.with_name(home.name + ".checkpoints")
    started = time.time()
    trainer = build_trainer(
        teacher,
        loaded.tokenizer,
        Defense(None),
        TrainConfig(epochs=cfg.epochs, lr=cfg.lr, warmup_ratio=cfg.warmup_ratio, batch_size=cfg.batch_size),
        partial,
        ctx.seed,
        tokenize(ctx.train, loaded.tokenizer, cfg.max_length),
        tokenize(ctx.dev, loaded.tokenizer, cfg.max_length),
    )
    info = fit(trainer, partial)
    record = {**key, "train_s": round(time.time() - started, 1), "dev_accuracy": info["best_dev_accuracy"]}
    # Every process of a distributed run holds the same teacher; one writes it, so none replaces
    # the entry while another is moving its own copy into place.
    if trainer.is_world_process_zero():
        with atomic_dir(home) as tmp:
            save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, tmp / "teacher.safetensors")
            atomic_write_json(tmp / "teacher.json", record)
        shutil.rmtree(partial, ignore_errors=True)
    return teacher.eval().requires_grad_(False), loaded.tokenizer, record | {"reused": False}


class W2SDefense(Defense):
    scenarios = frozenset({"poisoned-weights"})  # it assumes the training data is clean

    def prepare(self, model: nn.Module, ctx: DefenseContext) -> nn.Module:
        cfg: W2SDefenseConfig = self.cfg
        self.decoder = is_decoder_classifier(model)
        self.teacher, tokenizer, self.teacher_record = teacher_for(cfg.teacher, ctx, model.config.hidden_size)
        self.side = SideEncoding(tokenizer, cfg.teacher.max_length)
        student = peft_model(model, cfg.student, ctx)
        student.get_base_model().base_model.register_forward_hook(self._keep_hidden)
        self._hidden: torch.Tensor | None = None
        return student

    def _keep_hidden(self, module: nn.Module, args: Any, output: Any) -> None:
        self._hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state

    def side_encoding(self) -> SideEncoding | None:
        # None until prepare: scoring a saved student (cleantune eval) builds a Trainer without it.
        return getattr(self, "side", None)

    def extra_loss(self, model: nn.Module, inputs: dict[str, torch.Tensor], outputs: Any) -> dict[str, torch.Tensor]:
        cfg: W2SDefenseConfig = self.cfg
        side = {k.removeprefix(SIDE): v for k, v in inputs.items() if k.startswith(SIDE)}
        if not side:
            return {}
        self.teacher.to(outputs.logits.device)
        with torch.no_grad():
            teacher_features = self.teacher.features(**side)
            teacher_logits = self.teacher.classifier(teacher_features)
        alpha, beta, gamma = cfg.loss_weights()
        # Eq. 14: α·CE + β·KD + γ·FA; the Trainer has already added the CE once.
        terms = {"ce_reweight": (alpha - 1) * outputs.loss}
        if cfg.kd:
            terms["kd"] = beta * distillation_loss(outputs.logits, teacher_logits, cfg.temperature)
        if cfg.fa:
            terms["fa"] = gamma * self._feature_loss(inputs["attention_mask"], teacher_features.float())
        return terms

    def _feature_loss(self, attention_mask: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        assert self._hidden is not None  # set by the forward hook during this batch's forward
        if self.cfg.fa_on == "tokens":
            return token_alignment_loss(self._hidden.float(), attention_mask, teacher)
        return feature_alignment_loss(pooled(self._hidden, attention_mask, self.decoder).float(), teacher)

    def info(self) -> dict[str, Any]:
        record = self.teacher_record
        # A reused teacher's training time is still part of the defense's cost, paid once.
        return {f"teacher_{k}": record[k] for k in ("train_s", "reused", "dev_accuracy")}


CLASSIFICATION.register(W2SDefenseConfig, W2SDefense)
