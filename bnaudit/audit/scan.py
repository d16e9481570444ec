"""The rank scan shared by ``compare`` and ``average``: pool every rank, then measure each against the pool.

Memory: one rank's BatchNorm tensors (per rank in flight) plus a few float64 vectors per layer; the
concatenated statistics of the ranks are kept between the passes up to CACHE_BUDGET_BYTES, and ranks beyond
it are read again in the second pass. Each pass returns a frozen result; the plan is never changed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from bnaudit.audit.rank_findings import affine_findings, counter_findings, other_tensor_findings
from bnaudit.audit.rank_reader import OpenedRank, RankRead
from bnaudit.audit.rank_stream import LayoutCache, read_rank, read_ranks
from bnaudit.audit.scan_plan import ScanPlan
from bnaudit.bn.archive_policy import checkpoint_findings
from bnaudit.bn.health import health_findings, layers_to_check
from bnaudit.bn.layerstats import LayerStats
from bnaudit.bn.stats import Divergence, DivergenceAccumulator, MergeMethod, RankMerger
from bnaudit.checkpoint.bytesource import is_remote
from bnaudit.checkpoint.provenance import samples_from_metadata
from bnaudit.checkpoint.remote_folder import input_transfer_stats
from bnaudit.checkpoint.types import Checkpoint
from bnaudit.errors import InputError
from bnaudit.report.model import Finding, InputInfo

# Statistics of this many bytes are kept between the two passes instead of being read again: four ranks
# of a large CNN (4 x 120 layers x 512 channels x 2 x 8 bytes = 4 MB) are kept, 1,024 ranks are streamed.
CACHE_BUDGET_BYTES = 32 << 20


@dataclass(frozen=True)
class RankVectors:
    """One rank's running_mean and running_var of every planned layer, concatenated in plan order."""

    mean: np.ndarray
    var: np.ndarray

    @classmethod
    def of(cls, stats: tuple[LayerStats, ...]) -> RankVectors:
        mean = np.concatenate([s.mean for s in stats]) if stats else np.zeros(0)
        var = np.concatenate([s.var for s in stats]) if stats else np.zeros(0)
        return cls(_frozen(mean), _frozen(var))

    @property
    def nbytes(self) -> int:
        return int(self.mean.nbytes + self.var.nbytes)


@dataclass(frozen=True)
class Merged:
    """The ranks merged, every layer's channels concatenated (float64).

    Attributes:
        mean: sum w_r m_r / W.
        pooled_var: sum w_r (v_r + (m_r - mean)^2) / W, the law of total variance over the ranks' running_var.
        mean_var: sum w_r v_r / W.
    """

    mean: np.ndarray
    pooled_var: np.ndarray
    mean_var: np.ndarray

    @classmethod
    def of(cls, merger: RankMerger) -> Merged:
        mean, pooled = merger.result(MergeMethod.POOLED)
        return cls(_frozen(mean), _frozen(pooled), _frozen(merger.result(MergeMethod.MEAN)[1]))

    def var(self, method: MergeMethod) -> np.ndarray:
        """The merged variance of ``method``."""
        return self.pooled_var if method is MergeMethod.POOLED else self.mean_var


@dataclass(frozen=True)
class PoolResult:
    """The first pass: every rank checked and merged.

    Attributes:
        inputs: one per rank, in rank order.
        findings: pickle, health, affine-parameter and (check_weights) other-tensor findings, rank by rank.
        counter_findings: a differing num_batches_tracked (the commands place it after their own findings).
        equal: the ranks merged with equal weights (what the second pass measures against).
        weighted: the ranks merged with the plan's rank weights (``equal`` when they are all 1).
        weights: each rank's weight.
        digests: each rank's SHA-256 of its stored statistics (empty unless the plan asks for them).
        kept: each rank's statistics kept for the second pass, None where it reads the rank again.
        first_stats: the first rank's statistics of every planned layer (what the others are checked against).
        layouts: the layout cache after the pass (None: no layout reuse).
    """

    inputs: tuple[InputInfo, ...]
    findings: tuple[Finding, ...]
    counter_findings: tuple[Finding, ...]
    equal: Merged
    weighted: Merged
    weights: tuple[float, ...]
    digests: tuple[str, ...]
    kept: tuple[RankVectors | None, ...]
    first_stats: tuple[LayerStats, ...]
    layouts: LayoutCache | None


@dataclass(frozen=True)
class MeasureResult:
    """The second pass: per layer, how far the ranks are from the equal-weight pooled statistics."""

    layers: tuple[Divergence, ...]


def pool_ranks(plan: ScanPlan, first: OpenedRank) -> PoolResult:
    """First pass: read every rank once, check it against the reference rank, merge its statistics.

    Args:
        plan: what to read.
        first: the first rank (``plan.files[0]``), already opened by the command to build the plan.

    Raises:
        InputError / ModelMismatchError: a rank cannot be read, is not the planned model, or its sample
            count cannot be used as a weight.
        UnsafeUnreadableRank: see :func:`bnaudit.audit.rank_reader.open_rank`.
    """
    pool = _Pool(plan)
    cache = LayoutCache() if plan.reuse_layouts else None
    read = read_rank(plan, plan.files[0], None, opened=first)
    pool.add(read)
    layouts = cache.offered(read) if cache else None
    for later, after in read_ranks(plan, plan.files[1:], layouts):
        pool.add(later)
        layouts = after
    return pool.result(layouts)


def measure_ranks(plan: ScanPlan, pooled: PoolResult) -> MeasureResult:
    """Second pass: each rank's divergence from the pooled statistics, from the kept vectors or a re-read."""
    accumulator = DivergenceAccumulator(
        pooled.equal.mean, pooled.equal.pooled_var, plan.eps, [layer.start for layer in plan.layers]
    )
    uncached = [rf for rf, kept in zip(plan.files, pooled.kept, strict=True) if kept is None]
    reread = read_ranks(plan, uncached, pooled.layouts)
    for index, kept in enumerate(pooled.kept):
        vectors = kept if kept is not None else RankVectors.of(next(reread)[0].stats)
        accumulator.add(index, vectors.mean, vectors.var)
    return MeasureResult(tuple(accumulator.layer(i) for i in range(len(plan.layers))))


class _Pool:
    """The first pass's running state; lives inside :func:`pool_ranks` only, on the consuming thread."""

    def __init__(self, plan: ScanPlan) -> None:
        self.plan = plan
        self.equal = RankMerger(plan.channels)
        self.weighted = self.equal if plan.weights.equal else RankMerger(plan.channels)
        self.reference: RankRead | None = None
        self.inputs: list[InputInfo] = []
        self.findings: list[Finding] = []
        self.counters: list[list[tuple[int, int]]] = [[] for _ in plan.layers]
        self.weights: list[float] = []
        self.digests: list[str] = []
        self.kept: list[RankVectors | None] = []
        self.kept_bytes = 0
        self.samples_recorded = False  # the first rank's metadata records a sample count

    def add(self, read: RankRead) -> None:
        plan, rf = self.plan, read.rf
        self.inputs.append(
            InputInfo(rf.display, read.ckpt.format, rf.rank, tuple(sd.name for sd in read.sds))
        )
        self.findings.extend(checkpoint_findings(read.ckpt, rf.display))
        if not self.weights:
            self.samples_recorded = _recorded_samples(read.ckpt) is not None
        weight = _rank_weight(plan, read, len(self.weights), self.samples_recorded)
        self.weights.append(weight)
        if read.digest is not None:
            self.digests.append(read.digest)
        vectors = RankVectors.of(read.stats)
        self.equal.add(vectors.mean, vectors.var)
        if self.weighted is not self.equal:
            self.weighted.add(vectors.mean, vectors.var, weight)
        self._check(read)
        within = self.kept_bytes + vectors.nbytes <= CACHE_BUDGET_BYTES
        self.kept.append(vectors if within else None)
        self.kept_bytes += vectors.nbytes if within else 0

    def _check(self, read: RankRead) -> None:
        plan, rf = self.plan, read.rf
        for i in layers_to_check(read.stats, plan.eps):
            layer = plan.layers[i]
            self.findings.extend(
                health_findings(read.stats[i], plan.eps, file=rf.display, state_dict=layer.state_dict,
                                layer=layer.name, rank=rf.rank)
            )  # fmt: skip
        for counts, stats in zip(self.counters, read.stats, strict=True):
            if stats.num_batches_tracked is not None:
                counts.append((rf.rank, stats.num_batches_tracked))
        if self.reference is None:
            self.reference = read
            return
        self.findings.extend(affine_findings(plan.layers, self.reference.stats, read.stats, rf, plan.texts))
        if plan.check_weights:
            self.findings.extend(other_tensor_findings(self.reference.sds, read.sds, rf, plan.files[0]))

    def result(self, layouts: LayoutCache | None) -> PoolResult:
        plan = self.plan
        counters = tuple(tuple(c) for c in self.counters)
        equal = Merged.of(self.equal)
        return PoolResult(
            inputs=tuple(self.inputs),
            findings=tuple(self.findings),
            counter_findings=tuple(counter_findings(plan.layers, counters, plan.files, plan.texts)),
            equal=equal,
            weighted=equal if self.weighted is self.equal else Merged.of(self.weighted),
            weights=tuple(self.weights),
            digests=tuple(self.digests),
            kept=tuple(self.kept),
            first_stats=self.reference.stats if self.reference is not None else (),
            layouts=layouts,
        )


def _rank_weight(plan: ScanPlan, read: RankRead, index: int, first_recorded: bool) -> float:
    """A rank's weight: the explicit one, its recorded sample count (when the first rank records one), or 1.

    Raises:
        InputError: the sample count is unreadable, or recorded by some ranks and not by others.
    """
    weights, rf = plan.weights, read.rf
    if weights.explicit is not None:
        return weights.explicit[index]
    if weights.equal:
        return 1.0
    try:
        samples = samples_from_metadata(read.ckpt.metadata)
    except ValueError as exc:
        raise InputError(str(exc), path=rf.display, fix="re-save the file or pass --rank-weights") from None
    if (samples is not None) != first_recorded:
        raise InputError(
            f"{'records no' if first_recorded else 'records a'} sample count but the first rank "
            f"{'does' if first_recorded else 'does not'}",
            path=rf.display,
            where=f"rank {rf.rank}",
            fix="pass --rank-weights to set every rank's weight",
        )
    return 1.0 if samples is None else samples


def _recorded_samples(ckpt: Checkpoint) -> float | None:
    """The sample count a per-rank statistics file records, or None (also for an unreadable entry)."""
    try:
        return samples_from_metadata(ckpt.metadata)
    except ValueError:
        return None


def _frozen(values: np.ndarray) -> np.ndarray:
    values.flags.writeable = False
    return values


def with_transfers(inputs: Sequence[InputInfo]) -> tuple[InputInfo, ...]:
    """The inputs with what reading each remote one cost (bytes, requests), once every read is done."""
    return tuple(
        replace(i, transfer=input_transfer_stats(i.path)) if is_remote(i.path) else i for i in inputs
    )
