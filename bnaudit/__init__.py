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
    "compare_ranks": "bnaudit.audit.compare",
    "CompareOptions": "bnaudit.audit.options",
    "inspect_checkpoint": "bnaudit.audit.inspect",
    "inspect_checkpoints": "bnaudit.audit.inspect",
    "InspectOptions": "bnaudit.audit.options",
    "load_checkpoint": "bnaudit.checkpoint",
    "read_tensor": "bnaudit.checkpoint",
    "BnauditError": "bnaudit.errors",
    "FailOn": "bnaudit.report.model",
    "Finding": "bnaudit.report.model",
    "FindingKind": "bnaudit.report.model",
    "Report": "bnaudit.report.model",
    "Severity": "bnaudit.report.model",
    "BnLayer": "bnaudit.bn.layers",
    "find_bn_layers": "bnaudit.bn.layers",
    "normalize_key": "bnaudit.bn.layers",
    "MergeMethod": "bnaudit.bn.merge_method",
    "average_checkpoints": "bnaudit.repair.average",
    "AverageOptions": "bnaudit.repair.options",
    "AverageResult": "bnaudit.repair.average",
    "sync_bn_stats": "bnaudit.live.training",
    "save_rank_stats": "bnaudit.live.training",
    "recalibrate": "bnaudit.live.recalibrate",
    "RecalibrationResult": "bnaudit.live.results",
    "LayerRecalibration": "bnaudit.live.results",
    "RecalibrationOptions": "bnaudit.live.options",
    "RecalibrationMethod": "bnaudit.live.methods",
    "CalibrationSpec": "bnaudit.live.options",
    "recalibrate_checkpoint": "bnaudit.repair.recalibrate",
    "CheckpointRecalibrationResult": "bnaudit.repair.recalibrate",
    "WriteOptions": "bnaudit.repair.options",
    "drift_checkpoint": "bnaudit.audit.drift",
    "DriftResult": "bnaudit.audit.drift",
    "DriftThresholds": "bnaudit.audit.options",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'bnaudit' has no attribute {name!r}")
    try:
        value = getattr(importlib.import_module(module), name)
    except ImportError as exc:
        from bnaudit.optional import MissingDependencyError, missing_optional

        missing = missing_optional(exc)
        if missing is None:
            raise
        # e.g. sync_bn_stats in the gate-only install: say which extra brings torch
        raise MissingDependencyError(missing, where=f"bnaudit.{name}") from exc
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
