"""The one LoRA spec every method that trains LoRA nests as ``lora:``, and its PEFT ``LoraConfig``.

As in PEFT, DoRA and the PiSSA / OLoRA initialisations are flags on LoRA rather than methods of
their own. The rank may be a share of the model's hidden width, so that a paper's proportion (r 512
on a 4,096-wide model) carries over to a smaller model.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, cast

from peft import LoraConfig, TaskType
from pydantic import BeforeValidator, Field, PositiveInt, model_validator
from torch import nn
from transformers import PretrainedConfig

from cleantune.schema import StrictModel

WidthShare = Annotated[float, Field(gt=0, lt=1)]
Variant = Literal["lora", "dora", "pissa", "olora"]


class LoraSpec(StrictModel):
    r: PositiveInt | WidthShare = 8  # a rank, or a share of the hidden width (0.125 of 4,096 is 512)
    alpha: Annotated[float, Field(gt=0)] | Literal["r"] = 16.0  # "r": equal to the rank, a scale of 1
    dropout: float = Field(0.1, ge=0, lt=1)  # on the adapter's input
    # None: PEFT's default for the architecture (query/value, q_proj/v_proj); "all-linear" adds the MLP.
    target_modules: list[str] | Literal["all-linear"] | None = None
    use_dora: bool = False
    init: Literal["default", "pissa", "olora"] = "default"  # PEFT's init_lora_weights

    @model_validator(mode="after")
    def _one_variant(self) -> LoraSpec:
        if self.use_dora and self.init != "default":
            raise ValueError("use_dora and a PiSSA / OLoRA init are separate variants; choose one")
        return self

    @property
    def variant(self) -> Variant:
        return "dora" if self.use_dora else "lora" if self.init == "default" else self.init


def filled_from(default: LoraSpec) -> BeforeValidator:
    """For a ``lora:`` field whose default is a method's own LoRA: a partial section fills in from
    that default (``lora: {r: 4}`` keeps MuScleLoRA's alpha 32), not from LoraSpec's."""

    def fill(value: Any) -> Any:
        return {**default.model_dump(exclude_unset=True), **value} if isinstance(value, dict) else value

    return BeforeValidator(fill)


def rank(spec: LoraSpec, model: nn.Module) -> int:
    """``spec.r`` as a rank for ``model``: a share of its hidden width rounds to the nearest rank."""
    if isinstance(spec.r, int):
        return spec.r
    config = cast(PretrainedConfig, model.config)
    return max(1, round(spec.r * config.hidden_size))


def lora_config(spec: LoraSpec, model: nn.Module, task_type: TaskType | None = None, **extra: Any) -> LoraConfig:
    r = rank(spec, model)
    return LoraConfig(
        task_type=task_type,
        r=r,
        lora_alpha=r if spec.alpha == "r" else spec.alpha,  # type: ignore[arg-type]  # PEFT takes a float
        lora_dropout=spec.dropout,
        target_modules=spec.target_modules,
        use_dora=spec.use_dora,
        init_lora_weights=True if spec.init == "default" else spec.init,
        **extra,
    )


def upgrade(defense: dict[str, Any]) -> dict[str, Any]:
    """A defense section in the shape of cleantune before the one spec (flat ``r`` / ``alpha``, the
    names ``dora`` / ``pissa`` / ``olora``, RoRA's ``variant``, MuScleLoRA's ``lora_*``, the generative
    ``targets``) in today's, so that saved run configs and older suites still read the same."""
    out = dict(defense)
    name = out.get("name")
    flat = {"r", "alpha", "dropout", "target_modules"}
    if name in ("lora", "dora", "pissa", "olora", "rora"):
        variant = out.pop("variant", None) if name == "rora" else name
        spec = {k: out.pop(k) for k in sorted(flat & out.keys())}
        if variant == "dora":
            spec["use_dora"] = True
        elif variant in ("pissa", "olora"):
            spec["init"] = variant
        if spec:
            out["lora"] = {**spec, **out.get("lora", {})}
        out["name"] = "rora" if name == "rora" else "lora"
    if name == "muscle-lora":
        renamed = {"lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "lora_targets": "target_modules"}
        spec = {new: out.pop(old) for old, new in renamed.items() if old in out}
        if spec:
            out["lora"] = {**spec, **out.get("lora", {})}
    if isinstance(out.get("lora"), dict) and "targets" in out["lora"]:
        out["lora"] = {**out["lora"], "target_modules": out["lora"]["targets"]}
        del out["lora"]["targets"]
    for key in ("student", "under"):
        if isinstance(out.get(key), dict):
            out[key] = upgrade(out[key])
    return out
