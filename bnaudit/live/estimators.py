"""The recalibration methods: which mean and variance each makes of a layer's accumulated input (NumPy)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Protocol

import numpy as np

from bnaudit.bn.stats import ChannelStats
from bnaudit.live.methods import RecalibrationMethod


@dataclass
class LayerSums:
    """Sufficient statistics of one layer's input, mergeable across batches, calls and ranks (float64).

    Attributes:
        population: count (elements per channel seen: N*H*W summed over calls), mean and M2 per channel.
        calls: number of forward calls that reached the layer.
        sum_means: sum over calls of each call's mean (for ``batch-mean``).
        sum_vars: sum over calls of each call's *unbiased* variance (for ``batch-mean``).
        sum_sq_means, sum_sq_vars: sums of their squares (the spread between calls: :meth:`noise`).
        single_calls: calls with one value per channel (a batch of one reaching a 1x1 map). Such a call has
            no unbiased variance, so the four per-call sums leave it out (:attr:`variance_calls` is how many
            they hold); the population statistics keep its values.
    """

    population: ChannelStats
    calls: int
    sum_means: np.ndarray
    sum_vars: np.ndarray
    sum_sq_means: np.ndarray
    sum_sq_vars: np.ndarray
    single_calls: int = 0

    @property
    def variance_calls(self) -> int:
        """The calls in the per-call sums: those with more than one value per channel."""
        return self.calls - self.single_calls

    @classmethod
    def empty(cls, channels: int) -> LayerSums:
        zeros = np.zeros(channels, dtype=np.float64)
        return cls(ChannelStats.empty(channels), 0, zeros, zeros.copy(), zeros.copy(), zeros.copy())

    def noise(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The sampling variance of the population mean and variance, by the method of batch means.

        With B calls whose means and variances spread with sample variances s_m² and s_v², the averages of B
        calls vary by s_m² / B and s_v² / B: an estimate of the population estimate's own noise that needs
        no model of the data (correlated pixels, heavy tails). None with fewer than two such calls.
        """
        b = self.variance_calls
        if b < 2:
            return None
        spread_means = (self.sum_sq_means - self.sum_means**2 / b) / (b - 1)
        spread_vars = (self.sum_sq_vars - self.sum_vars**2 / b) / (b - 1)
        return np.maximum(spread_means, 0.0) / b, np.maximum(spread_vars, 0.0) / b

    @property
    def reached(self) -> bool:
        """True when at least one call with at least one value reached the layer."""
        return self.calls > 0 and self.population.count > 0

    def merge(self, other: LayerSums) -> LayerSums:
        return LayerSums(
            self.population.merge(other.population),
            self.calls + other.calls,
            self.sum_means + other.sum_means,
            self.sum_vars + other.sum_vars,
            self.sum_sq_means + other.sum_sq_means,
            self.sum_sq_vars + other.sum_sq_vars,
            self.single_calls + other.single_calls,
        )

    def pack(self) -> np.ndarray:
        p = self.population
        head = np.array([p.count, float(self.calls), float(self.single_calls)], dtype=np.float64)
        vectors = (p.mean, p.m2, self.sum_means, self.sum_vars, self.sum_sq_means, self.sum_sq_vars)
        return np.concatenate([head, *vectors])

    @classmethod
    def unpack(cls, flat: np.ndarray, channels: int) -> LayerSums:
        head = 3
        parts = [flat[head + i * channels : head + (i + 1) * channels].copy() for i in range(6)]
        pop = ChannelStats(float(flat[0]), parts[0], parts[1])
        calls, single = round(float(flat[1])), round(float(flat[2]))
        return cls(pop, calls, parts[2], parts[3], parts[4], parts[5], single)

    @staticmethod
    def packed_size(channels: int) -> int:
        return 3 + 6 * channels


class Estimator(Protocol):
    """Turns a reached layer's :class:`LayerSums` into the (mean, unbiased variance) to write."""

    def estimate(self, sums: LayerSums) -> tuple[np.ndarray, np.ndarray]: ...


class PopulationEstimator:
    """``population``: the exact mean and *unbiased* variance of every value the layer saw.

    Pooled over all elements (N*H*W per channel and call) of all calls and ranks, merged with Chan's parallel
    formulas, so uneven batches, shared layers and any split across processes give the same numbers as one
    pass over the concatenated inputs. The variance is M2 / (count - 1) (NaN for a single value).
    """

    def estimate(self, sums: LayerSums) -> tuple[np.ndarray, np.ndarray]:
        p = sums.population
        var = p.m2 / (p.count - 1) if p.count > 1 else p.m2 * np.nan
        return p.mean, var


class BatchMeanEstimator:
    """``batch-mean``: the average of per-call means and the average of per-call *unbiased* variances.

    What ``torch.optim.swa_utils.update_bn`` computes (a cumulative moving average of each batch's
    statistics). It ignores the spread between batch means, so it is below the population variance whenever
    batches differ, and it weighs a short last batch like a full one. A call with one value per channel has
    no unbiased variance and is left out (``update_bn``'s train-mode forward would refuse it); with no other
    call the estimate is NaN, which the writers refuse.
    """

    def estimate(self, sums: LayerSums) -> tuple[np.ndarray, np.ndarray]:
        b = sums.variance_calls
        if b == 0:
            nan = np.full_like(sums.sum_means, np.nan)
            return nan, nan.copy()
        return sums.sum_means / b, sums.sum_vars / b


ESTIMATORS: Mapping[RecalibrationMethod, Estimator] = MappingProxyType(
    {
        RecalibrationMethod.POPULATION: PopulationEstimator(),
        RecalibrationMethod.BATCH_MEAN: BatchMeanEstimator(),
    }
)
