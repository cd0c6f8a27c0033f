"""cleantune: remove backdoors from language models with parameter-efficient fine-tuning.

``cleantune.purify``, ``cleantune.train`` and ``cleantune.run`` are the Python front door
(:mod:`cleantune.api`), ``cleantune.scan`` the trigger-free scanner (:mod:`cleantune.scanner`); they
load torch on first use, so ``import cleantune`` stays fast.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["ScanConfig", "TargetInversionConfig", "__version__", "purify", "run", "scan", "train"]


def __getattr__(name: str) -> Any:
    if name in {"purify", "run", "train"}:
        from cleantune import api

        return getattr(api, name)
    if name in {"scan", "ScanConfig", "TargetInversionConfig"}:
        from cleantune import scanner

        return getattr(scanner, name)
    raise AttributeError(f"module 'cleantune' has no attribute {name!r}")
