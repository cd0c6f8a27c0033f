"""The config reference in ``docs/config-reference.md``, generated from the pydantic models so it
cannot drift from them: ``python -m cleantune.reference > docs/config-reference.md``."""

from __future__ import annotations

import re
import typing
from collections.abc import Iterator

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from cleantune.config import RunConfig
from cleantune.generative.config import LLMRunConfig


def _models(annotation: object) -> list[type[BaseModel]]:
    """The config classes a field's type names (through unions, Annotated and containers)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models(arg)]


def _type(annotation: object) -> str:
    choices = _models(annotation)
    if len(choices) > 1:
        return "one of the sections below, by `name`"
    text = repr(annotation) if not isinstance(annotation, type) else annotation.__name__
    for noise in ("typing.", "pathlib.", "annotated_types.", "NoneType"):
        text = text.replace(noise, "None" if noise == "NoneType" else "")
    text = re.sub(r"Annotated\[(\w+), [^\]]*\]", r"\1", text)
    return re.sub(r"(\w+\.)+(\w+Config)", r"\2", text)


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)  # a list default comes from a factory
    if isinstance(value, BaseModel):
        return f"{{name: {value.name}}}" if "name" in type(value).model_fields else "(section below)"
    return f"`{value}`"


def _sections(model: type[BaseModel], path: str, seen: set[str]) -> Iterator[str]:
    key = f"{path}:{model.__name__}"
    if key in seen:
        return
    seen.add(key)
    yield f"\n### `{path or 'top level'}` ({model.__name__})\n"
    if model.__doc__ and model.__doc__ != BaseModel.__doc__:
        yield " ".join(model.__doc__.split()) + "\n"
    yield "| key | type | default |\n|---|---|---|"
    nested = []
    for name, field in model.model_fields.items():
        shown = _type(field.annotation).replace("|", "\\|")  # a pipe would end the table cell
        yield f"| `{name}` | {shown} | {_default(field)} |"
        nested += [(f"{path}.{name}".lstrip("."), sub) for sub in _models(field.annotation)]
    for sub_path, sub in nested:
        yield from _sections(sub, sub_path, seen)


def reference() -> str:
    lines = [
        "# Config reference",
        "",
        "Generated from the pydantic models by `python -m cleantune.reference`; "
        "a test fails when this file is out of date. A union section (`defense`, `attack`) lists one "
        "table per choice, picked by its `name`.",
    ]
    for title, model in (("Classification runs", RunConfig), ("Generative runs (`task: generation`)", LLMRunConfig)):
        lines += ["", f"## {title}"]
        lines += list(_sections(model, "", set()))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(reference(), end="")
