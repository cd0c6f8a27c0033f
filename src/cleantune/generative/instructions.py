"""Alpaca-style instruction data and the one prompt format used for training and evaluation.

BackdoorLLM trains with the Alpaca template but evaluates on the raw instruction, which moves ASR by
30 points or more. Here :func:`prompt_ids` is the only place a prompt is built: the training encoder
appends the answer to exactly those ids, and evaluation generates from exactly those ids.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from datasets import Dataset
from pydantic import PositiveInt
from transformers import PreTrainedTokenizerBase

from cleantune.errors import CleantuneError
from cleantune.io import read_records
from cleantune.schema import StrictModel

FIELDS = ("instruction", "input", "output")
IGNORE = -100  # label of prompt and padding tokens: no loss
# For tokenizers without a chat template (base models): the Stanford Alpaca prompt.
ALPACA = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"


class InstructionDataConfig(StrictModel):
    """Clean instruction pools. A source is a JSON/JSON-lines file (relative to ``data_dir`` or
    absolute) or ``hub:ID`` / ``hub:ID:SPLIT`` for a hub dataset with the same three fields."""

    data_dir: Path = Path("../shared/datasets")
    # BackdoorLLM's clean Alpaca rows (500 + 100): poisons and clean rows come from here. Its
    # negsentiment/*/train_clean.json files are not used: 488 of their 500 answers repeat the
    # instruction first, which teaches a model to echo prompts (see check_answers).
    train: list[str] = ["backdoorllm/refusal/badnet/train_clean.json", "backdoorllm/clean_finetune_100.json"]
    test: str = "backdoorllm/refusal/test_clean.json"  # clean test instructions with reference answers
    # Clean training rows: mixed with the poisons (poisoned-data), or the defender's clean samples
    # (poisoned-llm, where the papers use 200).
    clean_train: PositiveInt = 200
    max_test: PositiveInt | None = 200  # seeded subset of the test instructions


def _read_source(source: str, data_dir: Path) -> tuple[list[dict[str, Any]], str]:
    if source.startswith("hub:"):
        from datasets import load_dataset

        dataset_id, _, split = source.removeprefix("hub:").partition(":")
        try:
            rows = load_dataset(dataset_id, split=split or "train").to_list()
        except Exception as err:  # noqa: BLE001 - unreachable hub, unknown id, missing split
            raise CleantuneError(f"instruction data '{source}' could not be loaded from the hub: {err}") from err
        return rows, source
    path = Path(source) if Path(source).is_absolute() else data_dir / source
    return read_records(path, "instruction file"), str(path)


def validate_rows(rows: list[Any], source: str) -> Dataset:
    """Rows as a Dataset of instruction/input/output; the error names the source, row and field."""
    clean = []
    for row_no, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise CleantuneError(f"{source}: row {row_no} is not an object with {', '.join(FIELDS)}")
        for field in ("instruction", "output"):
            if field not in row:
                raise CleantuneError(f"{source}: row {row_no}: missing field '{field}'")
        values = {f: row.get(f) or "" for f in FIELDS}
        for field, value in values.items():
            if not isinstance(value, str):
                raise CleantuneError(f"{source}: row {row_no}, field '{field}': expected text, got {value!r}")
        if not values["instruction"].strip():
            raise CleantuneError(f"{source}: row {row_no}: empty instruction")
        clean.append(values)
    if not clean:
        raise CleantuneError(f"{source}: no instructions")
    return Dataset.from_list(clean)


ECHO_LIMIT = 0.1  # share of answers that may open by repeating their instruction


def check_answers(data: Dataset, source: str) -> None:
    """Refuse training data whose answers mostly open by repeating the instruction."""
    echoes = sum(r["output"].lstrip().startswith(r["instruction"].strip()[:40]) for r in data)
    if echoes > ECHO_LIMIT * len(data):
        raise CleantuneError(
            f"{source}: {echoes} of {len(data)} answers open by repeating their instruction; training on "
            "them teaches the model to echo prompts (BackdoorLLM's negsentiment train_clean files have this defect)"
        )


def read_instructions(sources: str | list[str], data_dir: Path) -> Dataset:
    """One or more sources, concatenated, exact duplicates (instruction + input) dropped."""
    seen: set[tuple[str, str]] = set()
    rows = []
    for source in [sources] if isinstance(sources, str) else sources:
        raw, name = _read_source(source, data_dir)
        data = validate_rows(raw, name)
        check_answers(data, name)
        for row in data.to_list():
            key = (row["instruction"], row["input"])
            if key not in seen:
                seen.add(key)
                rows.append(row)
    return Dataset.from_list(rows)


def user_message(instruction: str, input_text: str) -> str:
    return f"{instruction}\n\n{input_text}" if input_text.strip() else instruction


def prompt_text(tokenizer: PreTrainedTokenizerBase, instruction: str, input_text: str) -> str:
    message = user_message(instruction, input_text)
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True
        )
        return str(text)  # tokenize=False gives the text
    return f"{ALPACA}### Instruction:\n{message}\n\n### Response:\n"


def prompt_ids(tokenizer: PreTrainedTokenizerBase, instruction: str, input_text: str) -> list[int]:
    """The token ids a model sees before its answer, in training and in evaluation alike."""
    return tokenizer(prompt_text(tokenizer, instruction, input_text), add_special_tokens=False)["input_ids"]


def encode_sft(data: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int) -> Dataset:
    """Prompt + answer + EOS, the prompt masked out of the loss. Rows whose prompt fills
    ``max_length`` teach nothing and are an error rather than silently dropped."""
    if tokenizer.eos_token is None:
        raise CleantuneError("the tokenizer has no EOS token to end answers with")

    def encode(row: dict[str, str]) -> dict[str, list[int]]:
        prompt = prompt_ids(tokenizer, row["instruction"], row["input"])
        answer = tokenizer(row["output"] + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        if len(prompt) >= max_length:
            raise CleantuneError(
                f"the prompt of '{row['instruction'][:60]}' has {len(prompt)} tokens, "
                f"model.max_length is {max_length}; raise it"
            )
        ids = (prompt + answer)[:max_length]
        return {
            "input_ids": ids,
            "attention_mask": [1] * len(ids),
            "labels": [IGNORE] * len(prompt) + ids[len(prompt) :],
        }

    return data.map(encode, remove_columns=data.column_names)
