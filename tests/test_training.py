"""The defense hooks as the Trainer calls them, on a tiny BERT."""

from __future__ import annotations

import pytest
import torch
from peft import TaskType, get_peft_model
from transformers import TrainerCallback

from cleantune.data import DataConfig, load_splits
from cleantune.defenses.base import Defense
from cleantune.defenses.peft_baselines import VirtualTokenConfig, virtual_token_config
from cleantune.models import load_model
from cleantune.training import TrainConfig, build_trainer, fit, tokenize


class Recorder(TrainerCallback):
    """Runs after the defense hook: sees the gradients the optimizer will use."""

    def __init__(self) -> None:
        self.norms: list[float] = []
        self.logs: list[dict[str, float]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        grads = [p.grad for p in kwargs["model"].parameters() if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))


class Hooks(Defense):
    scenarios = frozenset({"poisoned-data"})

    def __init__(self, extra: float = 0.0, blow_up: bool = False) -> None:
        super().__init__(None)
        self.extra, self.blow_up, self.edits = extra, blow_up, 0
        self.task_losses: list[float] = []

    def extra_loss(self, model, inputs, outputs):
        self.task_losses.append(float(outputs["loss"].detach()))
        return {"extra": torch.tensor(self.extra)} if self.extra else {}

    def edit_gradients(self, model, step):
        self.edits += 1
        if self.blow_up:
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.mul_(1e6)


def train(tiny_bert, data_dir, tmp_path, defense, max_grad_norm=1.0):
    loaded = load_model(str(tiny_bert), num_labels=2)
    splits = load_splits(DataConfig(dataset="sst2", data_dir=data_dir, max_train=64), seed=0)
    data = tokenize(splits.train, loaded.tokenizer, 32)
    cfg = TrainConfig(epochs=1, batch_size=16, lr=1e-3, max_grad_norm=max_grad_norm, select_best=False, logging_steps=2)
    trainer = build_trainer(loaded.model, loaded.tokenizer, defense, cfg, tmp_path / "ckpt", 0, train=data)
    recorder = Recorder()
    trainer.add_callback(recorder)
    return fit(trainer, tmp_path / "ckpt"), recorder


def test_extra_loss_is_added_to_the_task_loss(tiny_bert, data_dir, tmp_path):
    # Compared within one run: two trainings agree only on a CPU; on a GPU Adam turns rounding noise
    # in near-zero gradients into full-size steps, and the runs part after one update.
    defense = Hooks(extra=5.0)
    extra, recorder = train(tiny_bert, data_dir, tmp_path, defense)
    assert len(defense.task_losses) == extra["steps"] == 4
    assert extra["train_loss"] == pytest.approx(sum(defense.task_losses) / 4 + 5.0, abs=1e-4)
    # The term is logged by name beside the loss, once per logging interval of 2 of the 4 steps.
    assert [log["extra"] for log in recorder.logs if "loss" in log] == [5.0, 5.0]
    assert extra["loss_terms"] == {"extra": 5.0}


def test_gradients_are_clipped_after_the_defense_edits_them(tiny_bert, data_dir, tmp_path):
    defense = Hooks(blow_up=True)
    info, recorder = train(tiny_bert, data_dir, tmp_path, defense, max_grad_norm=0.5)
    assert defense.edits == info["steps"] == 4
    assert max(recorder.norms) <= 0.5 + 1e-4


def test_no_clipping_when_disabled(tiny_bert, data_dir, tmp_path):
    _, recorder = train(tiny_bert, data_dir, tmp_path, Hooks(blow_up=True), max_grad_norm=0.0)
    assert min(recorder.norms) > 1e3


def test_progress_bar_stays_on_when_transformers_logs_only_errors(tmp_path):
    from transformers.utils import logging

    from cleantune.training import training_arguments

    previous = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        args = training_arguments(TrainConfig(), tmp_path, seed=0, has_dev=False)
    finally:
        logging.set_verbosity(previous)
    assert args.disable_tqdm is False


@pytest.mark.parametrize("scheduler", ["linear", "cosine"])
def test_the_learning_rate_schedule_is_the_configs(tmp_path, scheduler):
    from cleantune.training import training_arguments

    args = training_arguments(TrainConfig(scheduler=scheduler, warmup_ratio=0.1), tmp_path, seed=0, has_dev=False)
    assert args.lr_scheduler_type == scheduler and args.warmup_steps == 0.1


def ptuning_trainer(tiny_bert, data_dir, out):
    loaded = load_model(str(tiny_bert), num_labels=2)
    model = get_peft_model(loaded.model, virtual_token_config(VirtualTokenConfig(name="ptuning"), TaskType.SEQ_CLS))
    splits = load_splits(DataConfig(dataset="sst2", data_dir=data_dir, max_train=32, max_dev=16), seed=0)
    train, dev = (tokenize(d, loaded.tokenizer, 32) for d in (splits.train, splits.dev))
    cfg = TrainConfig(epochs=1, batch_size=16, lr=1e-2)
    return build_trainer(model, loaded.tokenizer, Hooks(), cfg, out, 0, train=train, dev=dev)


def test_a_ptuning_checkpoint_loads_back_as_the_model_that_was_scored(tiny_bert, data_dir, tmp_path):
    # PEFT checkpoints hold p-tuning's encoder output; loaded into a training model, it went through
    # the encoder a second time (dev accuracy 86 % at the checkpoint, 60 % test accuracy after it).
    trainer = ptuning_trainer(tiny_bert, data_dir, tmp_path / "a")
    fit(trainer, tmp_path / "a")
    scored = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h][-1]
    assert trainer.state.best_model_checkpoint is not None
    assert trainer.evaluate()["eval_loss"] == pytest.approx(scored, rel=1e-5)

    resumed = ptuning_trainer(tiny_bert, data_dir, tmp_path / "b")
    resumed._load_from_checkpoint(trainer.state.best_model_checkpoint)
    assert resumed.evaluate()["eval_loss"] == pytest.approx(scored, rel=1e-5)
