"""Atomic file and directory writes: a reader never sees a half-written result."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def atomic_write_yaml(path: Path, data: Any) -> None:
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory that replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def save_atomically(path: Path, save: Callable[[Path], None]) -> Path:
    with atomic_dir(path) as tmp:
        save(tmp)
    return path


def read_yaml(path: Path) -> dict[str, Any]:
    """A config file's mapping; a missing file, bad YAML or non-UTF-8 text is one line naming the place."""
    from cleantune.errors import CleantuneError

    path = Path(path)
    if not path.is_file():
        raise CleantuneError(f"config file '{path}' does not exist")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as err:
        raise CleantuneError(f"config file '{path}': byte {err.start} is not UTF-8 text") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise CleantuneError(f"config file '{path}': {where}{getattr(err, 'problem', None) or err}") from None
    if not isinstance(tree, dict):
        raise CleantuneError(f"config file '{path}' must hold a mapping at the top level")
    return tree


def weights_fingerprint(path: Path) -> str:
    """Changes when the weights in ``path`` change (name, size and time of each weight and config file)."""
    files = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.json"))
    return json.dumps([[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files])


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def read_records(path: Path, what: str) -> list[Any]:
    """The rows of a JSON array or JSON-lines file; ``what`` names the file in errors."""
    from cleantune.errors import CleantuneError

    path = Path(path)
    if not path.is_file():
        raise CleantuneError(f"{what} '{path}' does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        return json.loads(text) if text.lstrip().startswith("[") else [json.loads(x) for x in text.splitlines() if x]
    except json.JSONDecodeError as err:
        raise CleantuneError(f"cannot parse '{path}' as JSON or JSON lines: {err}") from err


def save_figure(fig: Any, path: Path, dpi: int = 110) -> Path:
    """Write a matplotlib figure atomically and close it."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    tmp.replace(path)
    return path
