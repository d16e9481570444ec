"""The checks of ``inspect`` that look at a checkpoint's layers together: update counters and model copies."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bnaudit.audit.counters import LayerCount, counter_findings
from bnaudit.audit.stored_steps import stored_accumulation, stored_steps
from bnaudit.bn.layers import BnLayer
from bnaudit.bn.layerstats import LayerStats
from bnaudit.checkpoint.types import Checkpoint, StateDictRef
from bnaudit.report.model import Finding


@dataclass(frozen=True)
class ReadStateDict:
    """One state dict's well-formed layers, as ``inspect`` read them."""

    sd: StateDictRef
    layers: tuple[tuple[BnLayer, LayerStats], ...]


def trained(stats: LayerStats) -> bool:
    """Whether the statistics moved away from their initial values (mean 0, var 1)."""
    return not (bool(np.all(stats.mean == 0)) and bool(np.all(stats.var == 1)))


def _counts(read: ReadStateDict) -> list[LayerCount]:
    return [
        LayerCount(read.sd.name, bn.name, stats.num_batches_tracked, trained(stats))
        for bn, stats in read.layers
        if stats.num_batches_tracked is not None
    ]


def model_findings(ckpt: Checkpoint, read: Sequence[ReadStateDict], display: str) -> list[Finding]:
    """Counter findings of every state dict read (the stored steps set against the first one only: they
    count the live model's training, not a copy's)."""
    steps = stored_steps(ckpt.root)
    accumulation = stored_accumulation(ckpt.root)
    findings: list[Finding] = []
    for index, one in enumerate(r for r in read if r.layers):
        findings += counter_findings(_counts(one), steps if index == 0 else (), accumulation, display)
    return findings
