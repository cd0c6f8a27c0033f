"""The config reference in ``docs/config-reference.md``, generated from the pydantic models so it
cannot drift from them: ``python -m cleantune.reference > docs/config-reference.md``."""

from __future__ import annotations

import types
import typing
from collections.abc import Iterator

from pydantic import BaseModel

from cleantune.config import RunConfig
from cleantune.generative.config import LLMRunConfig


def _models(annotation: object) -> list[type[BaseModel]]:
    """The config classes a field's type names (through unions, Annotated and containers)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models(arg)]


def _name(annotation: object) -> str:
    """A type as a reader writes it: unions with |, constraints (Annotated) left out."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _name(args[0])
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_name(a) for a in args)
    if origin is typing.Literal:
        return f"Literal[{', '.join(repr(a) for a in args)}]"
    if origin is not None:
        return f"{getattr(origin, '__name__', origin)}[{', '.join(_name(a) for a in args)}]"
    if annotation is type(None):
        return "None"
    return annotation.__name__ if isinstance(annotation, type) else str(annotation)


def _type(annotation: object) -> str:
    if len(_models(annotation)) > 1:
        return "one of the sections below, by `name`"
    return _name(annotation)


def _default(value: object) -> str:
    if isinstance(value, BaseModel):
        return f"{{name: {value.model_dump()['name']}}}" if "name" in type(value).model_fields else "(section below)"
    return f"`{value}`"


def _sections(model: type[BaseModel], path: str, seen: set[str], instance: BaseModel | None = None) -> Iterator[str]:
    """``model``'s table, then its sections'; ``instance``, the default the enclosing field gives
    (MuScleLoRA's own LoRA, say), supplies the defaults shown where there is one."""
    key = f"{path}:{model.__name__}:{instance!r}"
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
        if instance is not None:
            value = getattr(instance, name)
        elif field.is_required():
            value = None
        else:
            value = field.get_default(call_default_factory=True)  # a list default comes from a factory
        yield f"| `{name}` | {shown} | {'required' if value is None and field.is_required() else _default(value)} |"
        for sub in _models(field.annotation):
            nested.append((f"{path}.{name}".lstrip("."), sub, value if isinstance(value, sub) else None))
    for sub_path, sub, default in nested:
        yield from _sections(sub, sub_path, seen, default)


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
