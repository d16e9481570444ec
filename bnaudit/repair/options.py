"""The options of the repairs (average, recalibrate): frozen dataclasses, light to import (no NumPy)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bnaudit.bn.merge_method import MergeMethod
from bnaudit.defaults import DEFAULT_EPS


@dataclass(frozen=True)
class AverageOptions:
    """How ``average`` merges and what it writes.

    Attributes:
        method: ``pooled`` (law of total variance, the default) or ``mean`` (mean of the variances).
        rank_weights: per-rank sample counts in rank order; default: the counts recorded by
            ``save_rank_stats`` when every rank has one, else equal weights.
        key: merge only this state dict of the reference.
        reference: the file whose bytes are copied (default: the lowest rank).
        to: ``pt`` or ``safetensors`` to convert; default: the reference's format.
        force: replace an existing output (never an input).
        dry_run: compute and report, write nothing.
        allow_unsafe_input: write even when an input's pickle references dangerous callables.
        eps: BatchNorm eps for the divergence metrics.
        ignore: glob patterns of layers to leave unchanged.
    """

    method: MergeMethod | str = MergeMethod.POOLED
    rank_weights: tuple[float, ...] | None = None
    key: str | None = None
    reference: str | Path | None = None
    to: str | None = None
    force: bool = False
    dry_run: bool = False
    allow_unsafe_input: bool = False
    eps: float = DEFAULT_EPS
    ignore: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "ignore", tuple(self.ignore))
        if self.rank_weights is not None:
            object.__setattr__(self, "rank_weights", tuple(self.rank_weights))


@dataclass(frozen=True)
class WriteOptions:
    """How :func:`recalibrate_checkpoint` treats its output.

    Attributes:
        force: replace an existing output (never an input).
        dry_run: run the pass and report, write nothing.
        allow_unsafe_input: write even when the pickle references dangerous callables (the output keeps them).
    """

    force: bool = False
    dry_run: bool = False
    allow_unsafe_input: bool = False
