"""bnaudit: audit and repair BatchNorm running statistics in PyTorch checkpoints.

The public API is imported lazily, so ``import bnaudit`` stays cheap and never imports torch; the functions
that run a model import it when called.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "compare_ranks": "bnaudit.audit",
    "inspect_checkpoint": "bnaudit.audit",
    "load_checkpoint": "bnaudit.checkpoint",
    "BnauditError": "bnaudit.errors",
    "FailOn": "bnaudit.findings",
    "Finding": "bnaudit.findings",
    "FindingKind": "bnaudit.findings",
    "Report": "bnaudit.findings",
    "Severity": "bnaudit.findings",
    "BnLayer": "bnaudit.layers",
    "find_bn_layers": "bnaudit.layers",
    "normalize_key": "bnaudit.layers",
    "MergeMethod": "bnaudit.stats",
    "average_checkpoints": "bnaudit.repair",
    "AverageResult": "bnaudit.repair",
    "sync_bn_stats": "bnaudit.training",
    "save_rank_stats": "bnaudit.training",
    "recalibrate": "bnaudit.recalibrate",
    "RecalibrationResult": "bnaudit.recalibrate",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'bnaudit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
