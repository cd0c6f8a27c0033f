"""Training on the Hugging Face Trainer, so DDP, FSDP and DeepSpeed work unchanged via accelerate.

Defense hooks are called from the Trainer's own extension points: ``compute_loss`` for an extra
loss, the ``on_pre_optimizer_step`` callback for gradient edits (gradients are then accumulated and
already reduced across processes). Checkpoints are selected on clean dev accuracy only.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from datasets import Dataset
from peft import PeftModel, PeftType
from pydantic import Field, PositiveInt
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    DataCollatorWithPadding,
    EvalPrediction,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.trainer_utils import get_last_checkpoint

from cleantune.schema import StrictModel

SIDE = "side_"  # prefix of the side-encoding columns in a batch; popped before the model's forward


@dataclass(frozen=True)
class SideEncoding:
    """A second tokenizer whose encoding of each training text rides along in the batch (a teacher's)."""

    tokenizer: PreTrainedTokenizerBase
    max_length: int


@dataclass(frozen=True)
class StepInfo:
    """Where training stands when ``edit_gradients`` runs."""

    epoch: float  # fractional epochs done, as the Trainer counts them
    num_epochs: float
    global_step: int
    reduce_mean: Callable[[torch.Tensor], torch.Tensor]  # average a tensor over processes (identity on one)


class TrainingHooks(Protocol):
    """What the Trainer calls on a defense; every defense provides it (cleantune.defenses.base)."""

    def side_encoding(self) -> SideEncoding | None: ...

    def extra_loss(
        self, model: nn.Module, inputs: dict[str, torch.Tensor], outputs: Any
    ) -> dict[str, torch.Tensor]: ...

    def edit_gradients(self, model: nn.Module, step: StepInfo) -> None: ...

    def as_evaluated(self, model: nn.Module) -> AbstractContextManager[None]: ...


class TrainConfig(StrictModel):
    epochs: float = Field(3.0, gt=0)
    lr: float = Field(2e-5, gt=0)
    batch_size: PositiveInt = 32
    eval_batch_size: PositiveInt = 64
    grad_accum: PositiveInt = 1
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    scheduler: Literal["linear", "cosine", "constant_with_warmup"] = "linear"  # the learning rate's decay
    max_grad_norm: float = Field(1.0, ge=0)
    eval_steps: PositiveInt | None = None  # evaluate + checkpoint every N steps; None: every epoch
    select_best: bool = True  # restore the checkpoint with the best clean dev accuracy
    keep_checkpoints: bool = False  # checkpoints exist to resume; drop them once the run is done
    bf16: bool = False
    logging_steps: PositiveInt = 50


def tokenize(
    data: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int, side: SideEncoding | None = None
) -> Dataset:
    def encode(batch: dict[str, list[Any]]) -> dict[str, Any]:
        out = dict(tokenizer(batch["text"], truncation=True, max_length=max_length))
        if side is not None:
            extra = side.tokenizer(batch["text"], truncation=True, max_length=side.max_length)
            out |= {SIDE + k: v for k, v in extra.items()}
        return out

    return data.map(encode, batched=True, remove_columns=[c for c in data.column_names if c != "label"])


class PairCollator:
    """Pads the model's inputs, and the side encoding (when the batch has one) with its own tokenizer."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, side: SideEncoding | None = None) -> None:
        self.main = DataCollatorWithPadding(tokenizer)
        self.side = DataCollatorWithPadding(side.tokenizer) if side else None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.main([{k: v for k, v in f.items() if not k.startswith(SIDE)} for f in features])
        if self.side is not None and any(k.startswith(SIDE) for k in features[0]):
            side = self.side([{k.removeprefix(SIDE): v for k, v in f.items() if k.startswith(SIDE)} for f in features])
            batch |= {SIDE + k: v for k, v in side.items()}
        return batch


def accuracy(pred: EvalPrediction) -> dict[str, float]:
    logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
    return {"accuracy": float((np.argmax(logits, axis=-1) == pred.label_ids).mean())}


class _EditThenClip(TrainerCallback):
    """Defense gradient edits, then clipping. The Trainer clips before ``on_pre_optimizer_step``, so it
    is told not to (``max_grad_norm=0``) and clipping happens here, after the edit, through accelerate
    (which handles DDP and FSDP)."""

    def __init__(self, trainer: Trainer, defense: TrainingHooks, max_grad_norm: float) -> None:
        self.trainer, self.defense, self.max_grad_norm = trainer, defense, max_grad_norm

    def on_pre_optimizer_step(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        model = kwargs["model"]
        accelerator = self.trainer.accelerator
        step = StepInfo(
            epoch=state.epoch or 0.0,
            num_epochs=args.num_train_epochs,
            global_step=state.global_step,
            reduce_mean=lambda tensor: accelerator.reduce(tensor, reduction="mean"),
        )
        self.defense.edit_gradients(model, step)
        if self.max_grad_norm > 0:
            self.trainer.accelerator.clip_grad_norm_(model.parameters(), self.max_grad_norm)


# Beside each checkpoint: the full state of a reparameterised prompt encoder (see _prompt_encoder).
PROMPT_ENCODER_STATE = "prompt_encoder.safetensors"


def _prompt_encoder(model: nn.Module) -> nn.Module | None:
    """The prompt encoder of a p-tuning or projected prefix-tuning adapter, whose checkpoints PEFT
    writes as the encoder's output: a model still training would pass that output through the encoder
    again when the Trainer loads it (the best checkpoint at the end, or the last one on resume)."""
    if not isinstance(model, PeftModel):
        return None
    config = model.peft_config[model.active_adapter]
    projected = config.peft_type == PeftType.PREFIX_TUNING and getattr(config, "prefix_projection", False)
    if config.inference_mode or not (config.peft_type == PeftType.P_TUNING or projected):
        return None
    return model.prompt_encoder[model.active_adapter]


class DefenseTrainer(Trainer):
    def __init__(self, *args: Any, defense: TrainingHooks, max_grad_norm: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.defense = defense
        # Every step's value of each loss term in this process, and how many of them are already logged.
        self._terms: dict[str, list[torch.Tensor]] = {}
        self._logged: dict[str, int] = {}
        self.add_callback(_EditThenClip(self, defense, max_grad_norm))

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        side = {k: inputs.pop(k) for k in [k for k in inputs if k.startswith(SIDE)]}
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        terms = self.defense.extra_loss(model, inputs | side, outputs) if model.training else {}
        for name, term in terms.items():
            loss = loss + term
            # Kept on the device: reading each step's value would stall a GPU every step.
            self._terms.setdefault(name, []).append(term.detach())
        return (loss, outputs) if return_outputs else loss

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        # Checkpoints are chosen on the model as the defense will deliver it (e.g. after a rescale).
        with self.defense.as_evaluated(self.accelerator.unwrap_model(self.model)):
            return super().evaluate(*args, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)
        encoder = _prompt_encoder(self.accelerator.unwrap_model(self.model))
        if encoder is not None and self.args.should_save:
            state = {k: v.detach().contiguous() for k, v in encoder.state_dict().items()}
            target = output_dir or self.args.output_dir
            assert target is not None  # the Trainer always has an output directory
            save_file(state, str(Path(target) / PROMPT_ENCODER_STATE))

    def _restore_prompt_encoder(self, checkpoint: str) -> None:
        encoder = _prompt_encoder(self.accelerator.unwrap_model(self.model))
        path = Path(checkpoint) / PROMPT_ENCODER_STATE
        if encoder is not None and path.exists():
            encoder.load_state_dict(load_file(str(path), device=str(next(encoder.parameters()).device)))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._restore_prompt_encoder(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        super()._load_best_model()
        if self.state.best_model_checkpoint:
            self._restore_prompt_encoder(self.state.best_model_checkpoint)

    def loss_term_means(self) -> dict[str, float]:
        """Each loss term's mean over the steps this process trained (already weighted)."""
        return {name: float(torch.stack(values).mean()) for name, values in self._terms.items()}

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Each term's mean since the last log (this process's batches), so a user sees whether a
        # regulariser is weighted into irrelevance or drowns the task loss.
        if "loss" in logs:
            for name, values in self._terms.items():
                fresh = values[self._logged.get(name, 0) :]
                if fresh:
                    logs[name] = round(float(torch.stack(fresh).mean()), 4)
                self._logged[name] = len(values)
        super().log(logs, start_time)

    def _set_signature_columns_if_needed(self) -> None:
        # The Trainer keeps only columns the model's forward takes; the side encoding must survive
        # until compute_loss pops it.
        super()._set_signature_columns_if_needed()
        columns = getattr(self.train_dataset, "column_names", None) or []
        kept = [*(self._signature_columns or []), *(c for c in columns if c.startswith(SIDE))]
        self._signature_columns = kept  # type: ignore[assignment]  # the Trainer's stub types it None


def trained_model(trainer: Trainer) -> nn.Module:
    """The model a trainer holds (the Trainer types it as optional; it is always set here)."""
    assert trainer.model is not None
    return trainer.model


def training_arguments(cfg: TrainConfig, output_dir: Path, seed: int, has_dev: bool) -> TrainingArguments:
    strategy = "steps" if cfg.eval_steps else "epoch"
    return TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=cfg.epochs,
        learning_rate=cfg.lr,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.eval_batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio of all steps
        lr_scheduler_type=cfg.scheduler,
        max_grad_norm=0.0,  # clipped after defense gradient edits, in _EditThenClip
        eval_strategy=strategy if has_dev else "no",
        save_strategy=strategy,
        eval_steps=cfg.eval_steps,
        save_steps=cfg.eval_steps or 500,  # read only with the "steps" strategy
        load_best_model_at_end=cfg.select_best and has_dev,
        metric_for_best_model="accuracy",
        greater_is_better=True,
        save_total_limit=1,  # with select_best, the Trainer keeps the best checkpoint as well
        logging_steps=cfg.logging_steps,
        seed=seed,
        data_seed=seed,
        bf16=cfg.bf16,
        report_to=[],
        disable_tqdm=False,  # the Trainer hides its bar when transformers logs only errors, as our CLI sets
        dataloader_pin_memory=torch.cuda.is_available(),
        # Without an accelerator the Trainer ignores a torchrun / accelerate launch unless told to
        # use the CPU: every process would then train alone on all the data (gloo DDP with it).
        use_cpu=not torch.accelerator.is_available(),
    )


def build_trainer(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    defense: TrainingHooks,
    cfg: TrainConfig,
    output_dir: Path,
    seed: int,
    train: Dataset | None = None,
    dev: Dataset | None = None,
    callbacks: list[TrainerCallback] | None = None,
    collator: Any = None,
) -> DefenseTrainer:
    """A Trainer for ``model``; ``collator`` defaults to padding classification batches."""
    return DefenseTrainer(
        model=model,
        args=training_arguments(cfg, output_dir, seed, has_dev=dev is not None and len(dev) > 0),
        train_dataset=train,
        eval_dataset=dev,
        data_collator=collator or PairCollator(tokenizer, defense.side_encoding()),
        processing_class=tokenizer,
        compute_metrics=accuracy,
        defense=defense,
        max_grad_norm=cfg.max_grad_norm,
        callbacks=callbacks,
    )


def fit(trainer: DefenseTrainer, output_dir: Path) -> dict[str, Any]:
    """Train, resuming from the newest checkpoint in ``output_dir`` if an earlier run was interrupted."""
    last = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
    result = trainer.train(resume_from_checkpoint=last)
    return {
        "train_loss": result.training_loss,
        "steps": result.global_step,
        # Includes the periodic dev evaluations; a resumed run counts only the steps it ran itself.
        "train_runtime_s": result.metrics["train_runtime"],
        "resumed_from": Path(last).name if last else None,
        "best_checkpoint": Path(trainer.state.best_model_checkpoint).name
        if trainer.state.best_model_checkpoint
        else None,
        "best_dev_accuracy": trainer.state.best_metric,
        "loss_terms": trainer.loss_term_means(),
    }
