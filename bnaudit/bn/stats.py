"""Mergeable per-channel statistics (count / mean / M2), rank merges and divergence metrics, in float64."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bnaudit.bn.merge_method import MergeMethod as MergeMethod  # re-exported: the merges take it
from bnaudit.defaults import DEFAULT_EPS as DEFAULT_EPS  # re-exported: callers import it from here


@dataclass
class ChannelStats:
    """Sufficient statistics of a set of samples, per channel: count, mean and M2 (sum of squared deviations).

    Two ``ChannelStats`` merge exactly with Chan et al.'s parallel formulas, so ranks, batches and processes
    all combine the same way, in any order. Counts may be fractional weights.
    """

    count: float
    mean: np.ndarray
    m2: np.ndarray

    @classmethod
    def empty(cls, channels: int) -> ChannelStats:
        return cls(0.0, np.zeros(channels, dtype=np.float64), np.zeros(channels, dtype=np.float64))

    @classmethod
    def from_moments(cls, count: float, mean: np.ndarray, var_biased: np.ndarray) -> ChannelStats:
        """Build from a mean and a *biased* variance (M2 / count) over ``count`` samples."""
        mean64 = np.asarray(mean, dtype=np.float64)
        return cls(float(count), mean64.copy(), np.asarray(var_biased, dtype=np.float64) * count)

    def merge(self, other: ChannelStats) -> ChannelStats:
        """Return the statistics of the union of both sample sets (neither input is modified)."""
        if other.count == 0:
            return ChannelStats(self.count, self.mean.copy(), self.m2.copy())
        if self.count == 0:
            return ChannelStats(other.count, other.mean.copy(), other.m2.copy())
        total = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / total)
        m2 = self.m2 + other.m2 + delta * delta * (self.count * other.count / total)
        return ChannelStats(total, mean, m2)

    @property
    def var_biased(self) -> np.ndarray:
        """Population variance M2 / count (what BatchNorm normalises a batch with)."""
        return self.m2 / self.count

    @property
    def var_unbiased(self) -> np.ndarray:
        """Sample variance M2 / (count - 1) (what BatchNorm stores in ``running_var``)."""
        return self.m2 / (self.count - 1)


class RankMerger:
    """Streams ranks' (running_mean, running_var) into weighted pooled and mean merges, one rank at a time.

    Memory is a few float64 vectors per layer, whatever the number of ranks.
    """

    def __init__(self, channels: int) -> None:
        self.pooled = ChannelStats.empty(channels)
        self.weighted_var_sum = np.zeros(channels, dtype=np.float64)

    def add(self, mean: np.ndarray, var: np.ndarray, weight: float = 1.0) -> None:
        """Add one rank whose statistics describe ``weight`` samples."""
        if weight <= 0:
            raise ValueError(f"rank weight must be positive, got {weight}")
        var64 = np.asarray(var, dtype=np.float64)
        # Treat a rank as ``weight`` samples with the given mean and variance: M2 = weight * var. Chan's merge
        # then yields exactly the law of total variance sum w (v + (m - mean)^2) / W.
        self.pooled = self.pooled.merge(ChannelStats.from_moments(weight, mean, var64))
        self.weighted_var_sum += weight * var64

    def result(self, method: MergeMethod) -> tuple[np.ndarray, np.ndarray]:
        """The merged (mean, var) for ``method``."""
        if self.pooled.count == 0:
            raise ValueError("no ranks were added")
        if method is MergeMethod.POOLED:
            return self.pooled.mean.copy(), self.pooled.var_biased
        return self.pooled.mean.copy(), self.weighted_var_sum / self.pooled.count


def kl_normal(mean_p: np.ndarray, var_p: np.ndarray, mean_q: np.ndarray, var_q: np.ndarray) -> np.ndarray:
    """KL(N(mean_p, var_p) || N(mean_q, var_q)) per channel, in nats.

    With p the pooled distribution and q a rank's statistics, this is how wrong normalising with rank q's
    statistics is for data that follows p. Variances must already include BatchNorm's eps.
    """
    ratio = var_p / var_q
    kl: np.ndarray = 0.5 * (ratio - 1.0 - np.log(ratio) + (mean_p - mean_q) ** 2 / var_q)
    return kl


@dataclass(frozen=True)
class Divergence:
    """Per-channel worst divergence of the ranks from the pooled statistics of one layer.

    ``kl``: max over ranks of KL(N(pooled) || N(rank)); ``shift``: max |m_r - mean| / sqrt(var + eps);
    ``var_ratio``: max of max((v_r + eps) / (var + eps), its inverse) — 1 means equal; ``kl_rank``: the rank
    index (position in the stream) attaining ``kl`` per channel. ``per_rank_*``: one value per rank, the
    layer's max (or mean) over its channels; ``identical``: every rank's statistics equal the first's, bit
    for bit, in every layer of the accumulator.
    """

    kl: np.ndarray
    shift: np.ndarray
    var_ratio: np.ndarray
    kl_rank: np.ndarray
    per_rank_max_kl: tuple[float, ...] = ()
    per_rank_max_shift: tuple[float, ...] = ()
    per_rank_mean_kl: tuple[float, ...] = ()
    identical: bool = False

    @property
    def mean_kl(self) -> float:
        """The worst rank's mean over the layer's channels of KL(pooled || rank) (0.0 without ranks)."""
        return max(self.per_rank_mean_kl, default=0.0)

    @property
    def mean_kl_rank(self) -> int:
        """The rank index (position in the stream) attaining :attr:`mean_kl`."""
        values = self.per_rank_mean_kl
        return max(range(len(values)), key=values.__getitem__) if values else 0


def segment_sums(values: np.ndarray, sizes: Sequence[int]) -> np.ndarray:
    """The sum of ``values`` over each consecutive segment of the given sizes (0 for empty ones); boolean
    flags are counted."""
    array = values.astype(np.int64) if values.dtype == np.bool_ else values
    starts = np.cumsum([0, *sizes[:-1]], dtype=np.intp)
    nonempty = np.asarray(sizes) > 0
    out = np.zeros(len(sizes), dtype=array.dtype)
    if nonempty.any():
        out[nonempty] = np.add.reduceat(array, starts[nonempty])
    return out


class DivergenceAccumulator:
    """Second pass of ``compare``: streams ranks against the pooled statistics, keeping per-channel maxima.

    Several layers can share one accumulator, their channels concatenated and ``layer_starts`` giving each
    layer's first channel: the NumPy work is then a few calls per rank instead of a few per layer and rank
    (a 120-layer model spends ten times less in call overhead than in arithmetic).
    """

    def __init__(
        self, pooled_mean: np.ndarray, pooled_var: np.ndarray, eps: float, layer_starts: Sequence[int] = (0,)
    ) -> None:
        self.mean = np.asarray(pooled_mean, dtype=np.float64)
        self.var_eps = np.asarray(pooled_var, dtype=np.float64) + eps
        self.eps = eps
        channels = len(self.mean)
        self.starts = np.asarray(layer_starts, dtype=np.intp)
        self.ends = np.append(self.starts[1:], channels).astype(np.intp)[: len(self.starts)]
        self.kl = np.full(channels, -np.inf)
        self.shift = np.zeros(channels)
        self.var_ratio = np.ones(channels)
        self.kl_rank = np.zeros(channels, dtype=np.int64)
        self._rank_layer_max_kl: list[np.ndarray] = []  # per rank added: each layer's max over its channels
        self._rank_layer_max_shift: list[np.ndarray] = []
        self._rank_layer_mean_kl: list[np.ndarray] = []
        self._first: tuple[np.ndarray, np.ndarray] | None = None
        self.identical = True

    def add(self, rank_index: int, mean: np.ndarray, var: np.ndarray) -> None:
        """Fold in one rank's statistics (every layer's channels, concatenated like the pooled ones)."""
        m = np.asarray(mean, dtype=np.float64)
        v_eps = np.asarray(var, dtype=np.float64) + self.eps
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = kl_normal(self.mean, self.var_eps, m, v_eps)
            shift = np.abs(m - self.mean) / np.sqrt(self.var_eps)
            ratio = np.maximum(v_eps / self.var_eps, self.var_eps / v_eps)
        # A non-finite or non-positive variance makes the rank's normalisation meaningless: rank it worst.
        kl = np.where(np.isfinite(kl), kl, np.inf)
        # A negative pooled or rank variance has no meaningful shift or ratio: count it as infinitely off.
        shift = np.where(np.isnan(shift), np.inf, shift)
        ratio = np.where(np.isfinite(ratio) & (ratio > 0), ratio, np.inf)
        better = kl > self.kl
        self.kl = np.where(better, kl, self.kl)
        self.kl_rank = np.where(better, rank_index, self.kl_rank)
        self.shift = np.maximum(self.shift, shift)
        self.var_ratio = np.maximum(self.var_ratio, ratio)
        self._rank_layer_max_kl.append(self._layer_max(kl))
        self._rank_layer_max_shift.append(self._layer_max(shift))
        self._rank_layer_mean_kl.append(self._layer_mean(kl))
        self._track_identical(m, v_eps)

    def _track_identical(self, mean: np.ndarray, var_eps: np.ndarray) -> None:
        # Bit-identical ranks (SyncBatchNorm, buffers all-reduced before saving) are a cause of their own.
        if self._first is None:
            self._first = (mean.copy(), var_eps.copy())
        elif self.identical:
            self.identical = bool(
                np.array_equal(mean, self._first[0]) and np.array_equal(var_eps, self._first[1])
            )

    def _layer_mean(self, values: np.ndarray) -> np.ndarray:
        # Each layer's mean over its channels; 0.0 for a layer without channels.
        sizes = self.ends - self.starts
        sums = segment_sums(values, [int(n) for n in sizes])
        means: np.ndarray = np.divide(sums, sizes, out=np.zeros(len(sizes)), where=sizes > 0)
        return means

    def _layer_max(self, values: np.ndarray) -> np.ndarray:
        # Each layer's maximum; 0.0 for a layer without channels.
        out = np.zeros(len(self.starts))
        nonempty = self.ends > self.starts
        if nonempty.any():
            # Empty layers are left out of the segment starts, so each segment is exactly one layer.
            out[nonempty] = np.maximum.reduceat(values, self.starts[nonempty])
        return out

    def layer(self, index: int) -> Divergence:
        """The divergence of layer ``index`` (its channels' maxima and each rank's worst value)."""
        part = slice(int(self.starts[index]), int(self.ends[index]))
        return Divergence(
            kl=self.kl[part],
            shift=self.shift[part],
            var_ratio=self.var_ratio[part],
            kl_rank=self.kl_rank[part],
            per_rank_max_kl=tuple(float(m[index]) for m in self._rank_layer_max_kl),
            per_rank_max_shift=tuple(float(m[index]) for m in self._rank_layer_max_shift),
            per_rank_mean_kl=tuple(float(m[index]) for m in self._rank_layer_mean_kl),
            identical=self.identical and self._first is not None,
        )

    @property
    def result(self) -> Divergence:
        """The divergence of an accumulator holding one layer."""
        if len(self.starts) != 1:
            raise ValueError(f"this accumulator holds {len(self.starts)} layers; use layer(index)")
        return self.layer(0)
