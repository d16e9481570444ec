"""Findings about how a checkpoint's file is put together, next to those about its pickles' globals."""

from __future__ import annotations

from bnaudit.bn.pickle_policy import pickle_findings
from bnaudit.checkpoint.types import Checkpoint
from bnaudit.report.model import Finding, FindingKind, Severity


def archive_findings(ckpt: Checkpoint, display: str) -> list[Finding]:
    """One ``ambiguous-archive`` error per way torch.load and Python's zipfile would read the file apart."""
    return [
        Finding(
            Severity.ERROR,
            FindingKind.AMBIGUOUS_ARCHIVE,
            f"the archive reads differently in torch.load and in Python's zipfile: {difference}; bnaudit "
            "scanned every pickle either could read, but a scanner may pass a pickle torch.load does not run "
            "— do not torch.load the file, re-save it from a trusted copy",
            file=display,
        )
        for difference in ckpt.ambiguities
    ]


def checkpoint_findings(ckpt: Checkpoint, display: str) -> list[Finding]:
    """The security findings of a checkpoint: its pickles' globals, then its archive's ambiguities."""
    return [*pickle_findings(ckpt.globals, display), *archive_findings(ckpt, display)]
