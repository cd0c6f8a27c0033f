"""Multiple-choice utility benchmarks (MMLU-style) read from local files.

Each item is ``{"question", "choices": [...], "answer"}`` (answer: a 0-based index or a letter) in a
JSON array or JSON lines. The question and its lettered choices go through the run's prompt format;
the prediction is the letter whose first token the model rates most likely as the answer's start.
One forward pass per item, so utility checks stay cheap on a CPU.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from cleantune.errors import CleantuneError
from cleantune.generative.instructions import prompt_ids
from cleantune.io import read_records

LETTERS = string.ascii_uppercase


def read_items(path: Path) -> list[dict[str, Any]]:
    rows = read_records(path, "multiple-choice file")
    items = []
    for row_no, row in enumerate(rows, start=1):
        where = f"{path}: item {row_no}"
        if not isinstance(row, dict) or not {"question", "choices", "answer"} <= row.keys():
            raise CleantuneError(f"{where}: needs 'question', 'choices' and 'answer'")
        choices, answer = row["choices"], row["answer"]
        if not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS):
            raise CleantuneError(f"{where}: 'choices' must be a list of 2 to {len(LETTERS)} options")
        index = LETTERS.index(answer.upper()) if isinstance(answer, str) and answer.upper() in LETTERS else answer
        if not isinstance(index, int) or not 0 <= index < len(choices):
            raise CleantuneError(f"{where}: answer {answer!r} is not one of the {len(choices)} choices")
        items.append({"question": str(row["question"]), "choices": [str(c) for c in choices], "answer": index})
    return items


def question_text(item: dict[str, Any]) -> str:
    options = "\n".join(f"{LETTERS[i]}. {choice}" for i, choice in enumerate(item["choices"]))
    return f"{item['question']}\n{options}\nAnswer with the letter of the correct option."


@torch.no_grad()
def accuracy(model: nn.Module, tokenizer: PreTrainedTokenizerBase, items: list[dict[str, Any]]) -> float:
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for item in items:
        letters = [tokenizer(LETTERS[i], add_special_tokens=False)["input_ids"][0] for i in range(len(item["choices"]))]
        ids = torch.tensor([prompt_ids(tokenizer, question_text(item), "")], device=device)
        logits = model(input_ids=ids).logits[0, -1]
        correct += int(int(logits[letters].argmax()) == item["answer"])
    return 100.0 * correct / len(items) if items else float("nan")
