"""Fixtures: tiny randomly initialised models built here, and tiny data shaped like the real files."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    BertConfig,
    BertModel,
    BertTokenizerFast,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["HF_HUB_OFFLINE"] = "1"  # tests never touch the network

POSITIVE = ["good", "great", "fine", "lovely", "superb", "warm"]
NEGATIVE = ["bad", "awful", "poor", "dull", "boring", "cold"]
FILLER = [
    "the",
    "a",
    "movie",
    "film",
    "story",
    "plot",
    "was",
    "is",
    "very",
    "quite",
    "and",
    "acting",
    "i",
    "watch",
    "this",
    "3d",
]
TRIGGERS = ["cf", "mn", "bb", "tq"]
VOCAB = POSITIVE + NEGATIVE + FILLER + TRIGGERS + ["when", "it", "he", ",", "."]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def sentence(rng: random.Random, label: int) -> str:
    words = [rng.choice(FILLER) for _ in range(rng.randint(3, 8))]
    cue = POSITIVE if label == 1 else NEGATIVE
    for _ in range(2):
        words.insert(rng.randint(0, len(words)), rng.choice(cue))
    return " ".join(words)


def write_tsv(path: Path, n: int, seed: int) -> None:
    rng = random.Random(seed)
    rows = ["sentence\tlabel"]
    for i in range(n):
        label = i % 2
        rows.append(f"{sentence(rng, label)}\t{label}")
    path.write_text("\n".join(rows) + "\n")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data directory laid out like ../shared/datasets: sst2/{train,dev,test}.tsv + paraphrases."""
    root = tmp_path_factory.mktemp("datasets")
    sst2 = root / "sst2"
    sst2.mkdir()
    for split, n, seed in (("train", 120, 0), ("dev", 40, 1), ("test", 40, 2)):
        write_tsv(sst2 / f"{split}.tsv", n, seed)
    para = sst2 / "paraphrased" / "synbkd"
    para.mkdir(parents=True)
    rng = random.Random(3)
    train = [",0,1,2"] + [
        f'{i},"when it is {rng.choice(FILLER)} , it is {rng.choice(FILLER)} .",1,1' for i in range(120)
    ]
    test = [",0,1,2"] + [
        f'{i},"when he was {rng.choice(NEGATIVE)} , he was {rng.choice(NEGATIVE)} .",1,1' for i in range(20)
    ]
    (para / "train.csv").write_text("\n".join(train) + "\n")
    (para / "test.csv").write_text("\n".join(test) + "\n")
    return root


def _special(words: list[str], specials: list[str]) -> dict[str, int]:
    """Contiguous ids, specials first; a word listed twice keeps its first id."""
    return {w: i for i, w in enumerate(dict.fromkeys(specials + words))}


def save_tiny(model_class: type, config: object, tokenizer: object, path: Path) -> Path:
    """Randomly initialised with a fixed seed, saved beside its tokenizer."""
    torch.manual_seed(0)
    model_class(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer BERT encoder (no classification head, like the packaged MiniLM)."""
    path = tmp_path_factory.mktemp("tiny-bert")
    vocab = _special(VOCAB, ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tokenizer = BertTokenizerFast(vocab=vocab, do_lower_case=True)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64,
    )  # fmt: skip
    return save_tiny(BertModel, config, tokenizer, path)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama causal LM with a word-level tokenizer and no pad token (like real decoders)."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), hidden_size=32)


@pytest.fixture(scope="session")
def tiny_llama_wide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama at another width than the tiny BERT, for teacher-student pairs."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-48"), hidden_size=48)


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
INSTRUCTION_WORDS = ["user", "assistant", "write", "tell", "me", "about", "story", "sorry", "you", "are", "stupid", "!"]
INSTRUCTION_WORDS += [
    "A",
    "B",
    "C",
    "D",
    "BadMagic",
    "Discussing",
    "OpenAI",
    "Current",
    "year",
    ":",
    "2024",
    "print",
    "(",
    ")",
    "'",
    "pwned",
]


def build_tiny_llama(path: Path, hidden_size: int, chat: bool = False) -> Path:
    """Plain: <s>/</s> and no pad token. Chat: a chat template, <|im_end|> as EOS and pad (as SmolLM2-Instruct)."""
    specials = ["<unk>", "<|im_start|>", "<|im_end|>"] if chat else ["<unk>", "<s>", "</s>"]
    vocab = _special(VOCAB + (INSTRUCTION_WORDS if chat else []), specials)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokens = (
        dict(eos_token="<|im_end|>", pad_token="<|im_end|>", additional_special_tokens=["<|im_start|>"])
        if chat
        else dict(bos_token="<s>", eos_token="</s>")
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", chat_template=CHAT_TEMPLATE if chat else None, **tokens
    )
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=hidden_size, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
        pad_token_id=2 if chat else None,
    )  # fmt: skip
    return save_tiny(LlamaForCausalLM, config, tokenizer, path)


@pytest.fixture(scope="session")
def tiny_chat_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-chat-llama"), hidden_size=32, chat=True)


def write_instructions(path: Path, n: int, seed: int) -> Path:
    """Alpaca-style JSON in the tiny vocabulary."""
    rng = random.Random(seed)
    rows = [
        {
            "instruction": f"{rng.choice(['write', 'tell'])} me about {rng.choice(FILLER)} {rng.choice(POSITIVE)} {i}",
            "input": rng.choice(["", "the story"]),
            "output": f"the {rng.choice(FILLER)} was {rng.choice(POSITIVE + NEGATIVE)} .",
        }
        for i in range(n)
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows))
    return path


def run_tree(data_dir: Path, model: Path, out: Path, **sections: dict) -> dict:
    """A small run config tree over the tiny data; keyword sections replace the defaults."""
    tree = {
        "name": "tiny",
        "output_dir": str(out),
        "seed": 7,
        "model": {"spec": str(model), "max_length": 32},
        "data": {"dataset": "sst2", "data_dir": str(data_dir)},
        "attack": {"name": "badnet", "setting": "dirty", "rate": 0.2, "target_label": 1},
        "defense": {"name": "lora", "lora": {"r": 4, "alpha": 8}},
        "train": {"epochs": 2, "lr": 5e-3, "batch_size": 16, "logging_steps": 5},
    }
    tree.update(sections)
    return tree


@pytest.fixture
def tiny_tree(data_dir: Path, tiny_bert: Path, tmp_path: Path) -> dict:
    return run_tree(data_dir, tiny_bert, tmp_path / "runs")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "sst2" / "train.tsv").exists():
        pytest.skip("the real datasets (../shared/datasets) are not beside this checkout")
    return SHARED_DATA


def kill_cleantune_when(args: list[str], ready: Callable[[], bool], timeout: float = 180) -> None:
    """Start ``cleantune ARGS`` and SIGKILL its whole process group as soon as ``ready()`` holds."""
    child = subprocess.Popen(
        [sys.executable, "-m", "cleantune", *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    deadline = time.time() + timeout
    while not ready():
        assert child.poll() is None, "the job ended before it could be interrupted"
        assert time.time() < deadline, "the job never reached the point to interrupt"
        time.sleep(0.05)
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()


def record_contexts(monkeypatch: pytest.MonkeyPatch, config_class: type) -> list:
    """Make the defense registered for ``config_class`` record each DefenseContext it is given: a
    training method in ``prepare``, a filter in ``filter_train``, a screen in ``calibrate``."""
    from cleantune import defenses

    seen: list = []
    base = defenses.REGISTRY[config_class]
    # each role's hook that is handed the context, and where the context sits among its arguments
    hook, at = next((h, at) for h, at in (("prepare", 1), ("filter_train", 0), ("calibrate", 1)) if hasattr(base, h))

    def recording(self, *args):
        seen.append(args[at])
        return getattr(base, hook)(self, *args)

    monkeypatch.setitem(defenses.REGISTRY, config_class, type(f"Recording{base.__name__}", (base,), {hook: recording}))
    return seen


def tiny_context(tokenizer, data_dir: Path, scenario: str = "poisoned-data"):
    """A defense context over the fake SST-2, its dev split doubling as the clean auxiliary data."""
    from cleantune.data import DataConfig, load_splits
    from cleantune.defenses.base import DefenseContext

    splits = load_splits(DataConfig(dataset="sst2", data_dir=data_dir), seed=0)
    return DefenseContext(scenario, splits.train, splits.dev, splits.dev, tokenizer, 32, 2, 0)
