"""Run configuration: one validated YAML file per run; ``--set key=value`` overrides any field."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Discriminator, Tag, TypeAdapter, ValidationError

from cleantune.analysis.fourier import FourierConfig
from cleantune.attacks import AttackConfig, NoAttackConfig
from cleantune.data import DataConfig
from cleantune.defenses import DefenseConfig
from cleantune.defenses.peft_baselines import LoraTuningConfig
from cleantune.errors import CleantuneError
from cleantune.generative.config import LLMRunConfig
from cleantune.io import read_yaml
from cleantune.lora import upgrade
from cleantune.models import ModelConfig
from cleantune.schema import RunBase
from cleantune.training import TrainConfig

DEFAULT_CONFIG = Path(__file__).parent / "defaults" / "demo.yaml"


class RunConfig(RunBase):
    task: Literal["classification"] = "classification"
    # poisoned-data: the training set may be poisoned; poisoned-weights: the model may be.
    scenario: Literal["poisoned-data", "poisoned-weights"] = "poisoned-data"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    attack: AttackConfig = NoAttackConfig()
    defense: DefenseConfig = LoraTuningConfig()
    train: TrainConfig = TrainConfig()
    # Score CACC/ASR on another task's data (weight poisoning: train on the IMDB proxy, test on SST-2).
    eval_data: DataConfig | None = None
    # Record the Fourier analysis of the clean and backdoor mappings during training (evaluator side).
    fourier: FourierConfig | None = None


def _task(value: Any) -> str:
    return value.get("task", "classification") if isinstance(value, dict) else value.task


AnyRunConfig = Annotated[
    Annotated[RunConfig, Tag("classification")] | Annotated[LLMRunConfig, Tag("generation")], Discriminator(_task)
]
RUN_CONFIG: TypeAdapter[AnyRunConfig] = TypeAdapter(AnyRunConfig)


def set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for key in parents:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise CleantuneError(f"--set {dotted}: '{key}' is not a section")
        node = child
    node[leaf] = value


def parse_overrides(pairs: list[str]) -> list[tuple[str, Any]]:
    parsed = []
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise CleantuneError(f"--set expects key=value, got '{pair}'")
        parsed.append((key.strip(), yaml.safe_load(raw)))
    return parsed


def overridden(tree: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """``tree`` with each ``key.path=value`` override set (nested sections are copied, not shared)."""
    tree = copy.deepcopy(tree)
    for key, value in parse_overrides(overrides or []):
        set_path(tree, key, value)
    return tree


def validate(tree: dict[str, Any], source: str) -> AnyRunConfig:
    """A run config of the task ``tree`` names (``task``, default classification)."""
    if isinstance(tree.get("defense"), dict):
        tree = {**tree, "defense": upgrade(tree["defense"])}
    try:
        return RUN_CONFIG.validate_python(tree)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'][1:]) or 'task'}: {e['msg']}"  # loc[0]: the task's tag
            + (f" ({e['input']!r})" if e["type"] == "extra_forbidden" else "")
            for e in err.errors()
        )
        raise CleantuneError(f"invalid config {source}: {problems}") from None


def changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two dumped configs."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [k for key in keys for k in changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")]
    return [] if old == new else [prefix.rstrip(".")]


def made_differently(cfg: AnyRunConfig) -> list[str]:
    """The keys in which the config that made ``cfg.run_dir`` differs from ``cfg`` (none: reusable)."""
    path = cfg.run_dir / "config.yaml"
    if not path.exists():
        return []
    try:
        old = validate(read_yaml(path), str(path)).model_dump(mode="json")
    except CleantuneError:
        return ["(the saved config.yaml no longer validates)"]
    return changed_keys(old, cfg.model_dump(mode="json"))


def load_config(path: Path | None = None, overrides: list[str] | None = None) -> AnyRunConfig:
    path = path or DEFAULT_CONFIG
    tree = overridden(read_yaml(path), overrides)
    return validate(anchored(tree, Path(path).parent), str(path))


def anchored(tree: dict[str, Any], base: Path) -> dict[str, Any]:
    """Relative local data files named in a config file are relative to that file, not to where the
    command runs."""
    data = tree.get("data")
    if tree.get("task") == "generation" or not isinstance(data, dict) or data.get("dataset") != "local":
        return tree  # instruction sources are relative to data.data_dir
    keys = [k for k in ("train", "dev", "test") if isinstance(data.get(k), str) and not Path(data[k]).is_absolute()]
    return {**tree, "data": {**data, **{k: str(base / data[k]) for k in keys}}}
