"""The checks of ``inspect`` that look at a checkpoint's layers together: update counters and model copies."""

from __future__ import annotations

from collections.abc import Sequence

from bnaudit.audit.copies import copy_findings
from bnaudit.audit.counters import LayerCount, counter_findings
from bnaudit.audit.read_state import ReadStateDict, trained
from bnaudit.audit.stored_steps import stored_accumulation, stored_steps
from bnaudit.checkpoint.types import Checkpoint
from bnaudit.report.model import Finding


def _counts(read: ReadStateDict) -> list[LayerCount]:
    return [
        LayerCount(read.sd.name, bn.name, stats.num_batches_tracked, trained(stats))
        for bn, stats in read.layers
        if stats.num_batches_tracked is not None
    ]


def model_findings(ckpt: Checkpoint, read: Sequence[ReadStateDict], display: str) -> list[Finding]:
    """Counter findings of every state dict read (the stored steps set against the first one only: they
    count the live model's training, not a copy's), then the copies' findings."""
    steps = stored_steps(ckpt.root)
    accumulation = stored_accumulation(ckpt.root)
    findings: list[Finding] = []
    for index, one in enumerate(r for r in read if r.layers):
        findings += counter_findings(_counts(one), steps if index == 0 else (), accumulation, display)
    return findings + copy_findings(read, display)
