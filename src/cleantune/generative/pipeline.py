"""One generative run: instructions -> (poisons) -> model -> defense -> (fine-tune) -> judged evaluation.

poisoned-data runs train on the poisoned instruction set: with LoRA that is backdoor injection and
the product is the adapter a defender later receives. poisoned-llm runs take a suspicious model or
adapter (``model.spec``) and the defender's clean samples. Inputs are checked before the run
directory is created; results are written atomically; an interrupted fine-tune resumes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate import PartialState
from datasets import Dataset
from peft import PeftModel
from transformers import DataCollatorForSeq2Seq, set_seed

from cleantune.data import subsample
from cleantune.generative.attacks import from_files, poison_pool, trigger_test
from cleantune.generative.base import LLMContext, LLMDefense
from cleantune.generative.config import AsIs, AsIsConfig, LLMRunConfig, build_llm_defense
from cleantune.generative.evaluation import TOKEN_BUDGET, llm_metrics
from cleantune.generative.instructions import FIELDS, IGNORE, encode_sft, read_instructions
from cleantune.generative.judges import Judge, backdoorllm_judge, resolve_judge
from cleantune.generative.multiple_choice import read_items
from cleantune.models import load_model, resolve
from cleantune.product import save_product
from cleantune.rundir import close_run, count_parameters, fingerprint, open_run_dir
from cleantune.training import build_trainer, fit, trained_model


@dataclass(frozen=True)
class LLMPrepared:
    """Validated inputs; ``poisoned_idx`` and ``triggered`` stay on the evaluator's side."""

    cfg: LLMRunConfig
    model_path: Path
    train: Dataset
    poisoned_idx: list[int]
    test: Dataset
    triggered: Dataset
    defense: LLMDefense
    judge: Judge | None
    max_new_tokens: int
    multiple_choice: dict[str, list[dict[str, Any]]]  # utility benchmark items, read and checked up front
    second_judge: Judge | None = None  # BackdoorLLM's keyword judge of the behaviour, reported beside ours


def _empty() -> Dataset:
    return Dataset.from_dict({f: [] for f in FIELDS})


def _training_set(cfg: LLMRunConfig, pool: Dataset, file_poisons: Dataset | None) -> tuple[Dataset, list[int]]:
    attack, seed = cfg.attack, cfg.seed
    if cfg.scenario == "poisoned-llm" or attack is None:
        # Drawn apart from the attacker's choice of rows, which uses the plain seed.
        return subsample(pool, cfg.data.clean_train, f"clean-{seed}"), []
    if file_poisons is None:
        return poison_pool(pool, cfg.data.clean_train, attack, seed)
    poisons = subsample(file_poisons, attack.count, seed)
    clean = subsample(pool, cfg.data.clean_train, seed)
    rows = poisons.to_list() + clean.to_list()
    return Dataset.from_list(rows), list(range(len(poisons)))


def prepare(cfg: LLMRunConfig) -> LLMPrepared:
    defense = build_llm_defense(cfg.defense)
    defense.check_scenario(cfg.scenario)
    model_path = resolve(cfg.model.spec, cfg.model.allow_pickle)
    data_dir, seed = cfg.data.data_dir, cfg.seed
    test = subsample(read_instructions(cfg.data.test, data_dir), cfg.data.max_test, seed)
    attack = cfg.attack
    files = from_files(attack, data_dir) if attack and attack.files else None
    train, poisoned_idx = _training_set(cfg, read_instructions(cfg.data.train, data_dir), files and files[0])
    if attack is None:
        triggered = _empty()
    elif files is not None:
        triggered = subsample(files[1], cfg.data.max_test, seed)
    else:
        triggered = trigger_test(test, attack, seed)
    behaviour = attack.behaviour if attack else None
    judge_spec = cfg.eval.judge or behaviour
    budget = cfg.eval.max_new_tokens or TOKEN_BUDGET[behaviour or "refusal"]
    judge = resolve_judge(judge_spec) if judge_spec else None
    choice_items = {name: read_items(path) for name, path in cfg.eval.multiple_choice.items()}
    second = backdoorllm_judge(behaviour) if behaviour and cfg.eval.backdoorllm_judge else None
    return LLMPrepared(
        cfg, model_path, train, poisoned_idx, test, triggered, defense, judge, budget, choice_items, second
    )


def execute(prepared: LLMPrepared) -> dict[str, Any]:
    cfg = prepared.cfg
    started = time.time()
    attack = cfg.attack.model_dump(mode="json") if cfg.attack else None
    run_dir = open_run_dir(cfg, attack, prepared.poisoned_idx)

    set_seed(cfg.seed)
    loaded = load_model(prepared.model_path, allow_pickle=cfg.model.allow_pickle, named=cfg.model.spec)
    defense, tokenizer, max_length = prepared.defense, loaded.tokenizer, cfg.model.max_length
    adapter_only = isinstance(loaded.model, PeftModel)
    ctx = LLMContext(prepared.train, tokenizer, max_length, adapter_only, cfg.seed, prepared.model_path)
    state = PartialState()
    model = defense.prepare(loaded.model.to(state.device), ctx)
    trainable, total = count_parameters(model)
    train_info = None
    if defense.trains:
        checkpoints = run_dir / "checkpoints"
        trainer = build_trainer(
            model,
            tokenizer,
            defense,
            cfg.train,
            checkpoints,
            cfg.seed,
            train=encode_sft(defense.training_rows(ctx), tokenizer, max_length),
            collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE),
        )
        train_info = fit(trainer, checkpoints)
        model = trained_model(trainer)
    model = defense.finalize(model)
    metrics = (
        llm_metrics(
            model,
            tokenizer,
            prepared.test,
            prepared.triggered,
            prepared.judge,
            prepared.max_new_tokens,
            cfg.eval,
            max_length,
            run_dir / "answers.jsonl" if state.is_main_process else None,
            prepared.multiple_choice,
            prepared.second_judge,
        )
        if cfg.eval.enabled
        else {}
    )
    # "as-is" changes nothing: its product would be a copy of the input.
    product = None
    if state.is_main_process and not isinstance(defense, AsIs):
        product = save_product(model, loaded, run_dir)
    record = {
        "task": "generation",
        "metrics": metrics,
        "train": train_info,
        "model_path": str(loaded.path),
        "adapter_only": ctx.adapter_only,
        "product": str(product) if product else None,
        "base_model": loaded.base_id,
        "auto": "CausalLM",
        "n_train": len(ctx.train),
        "data_sha256": fingerprint(ctx.train),
        "n_poisoned": len(prepared.poisoned_idx),
        "defense_info": defense.info(),
        "trainable_params": trainable,
        "total_params": total,
    }
    return close_run(cfg, record, started, state.is_main_process)


def evaluate(cfg: LLMRunConfig, spec: str) -> dict[str, Any]:
    """Judged metrics of a saved model or adapter (``spec``) on the prompts ``cfg`` describes."""
    prepared = prepare(cfg.model_copy(update={"scenario": "poisoned-llm", "defense": AsIsConfig()}))
    loaded = load_model(spec, allow_pickle=cfg.model.allow_pickle)
    model = loaded.model.to(PartialState().device)
    return llm_metrics(
        model,
        loaded.tokenizer,
        prepared.test,
        prepared.triggered,
        prepared.judge,
        prepared.max_new_tokens,
        cfg.eval,
        cfg.model.max_length,
        mc_items=prepared.multiple_choice,
        second_judge=prepared.second_judge,
    )
