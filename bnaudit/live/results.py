"""What a recalibration pass found: per-layer before/after statistics and the pass's totals."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from bnaudit.bn.stats import kl_normal
from bnaudit.live.accumulate import LayerAccumulator, buffer_of
from bnaudit.live.estimators import ESTIMATORS, Estimator, LayerSums
from bnaudit.live.methods import RecalibrationMethod


@dataclass(frozen=True)
class LayerRecalibration:
    """One layer's statistics before and after recalibration (float64 NumPy vectors).

    Attributes:
        name: the module name in the model (``layer1.0.bn1``), as in the model's state dict keys.
        kind: the module class (``BatchNorm2d``).
        channels: number of channels.
        eps: the layer's eps.
        reached: False when no batch reached the layer, then left unchanged (``after_*`` = ``before_*``).
        calls: forward calls that reached the layer (several per batch for a shared layer).
        samples: elements per channel seen (N*H*W summed over calls).
        before_mean, before_var: ``running_mean`` / ``running_var`` before the pass.
        after_mean, after_var: the statistics of the chosen method (what is written); variance unbiased.
        population_mean, population_var: mean and unbiased variance of all the layer's inputs.
        batch_mean_mean, batch_mean_var: average of per-call means and of per-call unbiased variances.
        noise: the sampling variance of the population mean and variance (batch means; None with fewer
            than two calls), for :meth:`noise_kl`.
        single_calls: calls with one value per channel, left out of ``batch_mean_*`` and ``noise`` (no
            unbiased variance); the population statistics include their values.
    """

    name: str
    kind: str
    channels: int
    eps: float
    reached: bool
    calls: int
    samples: float
    before_mean: np.ndarray
    before_var: np.ndarray
    after_mean: np.ndarray
    after_var: np.ndarray
    population_mean: np.ndarray | None
    population_var: np.ndarray | None
    batch_mean_mean: np.ndarray | None
    batch_mean_var: np.ndarray | None
    noise: tuple[np.ndarray, np.ndarray] | None = None
    single_calls: int = 0

    def kl(self) -> np.ndarray:
        """Per channel KL(N(after) || N(before)) in nats, variances plus eps (as ``bn.stats.kl_normal``).

        How wrong normalising with the old statistics is for data that follows the new ones; a non-finite
        old value counts as infinitely wrong.
        """
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            kl = kl_normal(
                self.after_mean, self.after_var + self.eps, self.before_mean, self.before_var + self.eps
            )
        return np.where(np.isfinite(kl), kl, np.inf)

    def noise_kl(self) -> np.ndarray:
        """Per channel, the KL the data sample's own noise adds on average: var(mean) / (2 (v + eps)) +
        var(var) / (4 (v + eps)^2), the second-order expansion of KL(N(estimate) || N(truth)); zeros when the
        noise is unknown (fewer than two calls)."""
        if self.noise is None:
            return np.zeros(self.channels)
        v = self.after_var + self.eps
        with np.errstate(divide="ignore", invalid="ignore"):
            noise: np.ndarray = self.noise[0] / (2 * v) + self.noise[1] / (4 * v * v)
        return np.where(np.isfinite(noise), noise, 0.0)

    def shift(self) -> np.ndarray:
        """Per channel |after_mean - before_mean| / sqrt(after_var + eps): the mean's move in new stds."""
        with np.errstate(invalid="ignore"):
            moved: np.ndarray = np.abs(self.after_mean - self.before_mean) / np.sqrt(
                self.after_var + self.eps
            )
        return moved

    def std_ratio(self) -> np.ndarray:
        """Per channel max(r, 1/r), r = sqrt((after_var + eps) / (before_var + eps)); 1 means unchanged."""
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.sqrt((self.after_var + self.eps) / (self.before_var + self.eps))
            return np.where(np.isfinite(r), np.maximum(r, 1.0 / r), np.inf)

    def metrics(self) -> dict[str, float | int | None]:
        """Headline numbers for a before/after table: mean_kl (over channels), noise_kl (what the data
        sample's noise alone gives), excess_kl (mean_kl less noise_kl, at least 0), max_kl, worst_channel,
        max_shift, max_std_ratio."""
        if not self.reached or self.channels == 0:
            unmeasured = (
                "mean_kl",
                "noise_kl",
                "excess_kl",
                "max_kl",
                "worst_channel",
                "max_shift",
                "max_std_ratio",
            )
            return {**dict.fromkeys(unmeasured), "calls": self.calls, "samples": self.samples}
        kl = self.kl()
        noise = self.noise_kl()
        return {
            "mean_kl": float(np.mean(kl)),
            "noise_kl": float(np.mean(noise)),
            "excess_kl": max(0.0, float(np.mean(kl - noise))),
            "max_kl": float(np.max(kl)),
            "worst_channel": int(np.argmax(kl)),
            "max_shift": float(np.nanmax(self.shift())),
            "max_std_ratio": float(np.nanmax(self.std_ratio())),
            "calls": self.calls,
            "samples": self.samples,
        }


@dataclass(frozen=True)
class RecalibrationResult:
    """What a recalibration pass found (and wrote).

    Attributes:
        method: ``population`` or ``batch-mean``.
        layers: per-layer results, in model order.
        batches: batches used (all ranks together).
        samples: samples used (all ranks together; None when the batch size could not be read).
        world_size: processes that took part.
        written: True when ``running_mean`` / ``running_var`` of the reached layers were overwritten.
        seconds: wall time of the pass and the reduction.
        mode: ``population`` or ``sequential``.
        passes: passes over the data (1 in population mode).
        last_move: ``sequential``: the largest relative move of a statistic in the last pass (None:
            population mode).
    """

    method: str
    layers: tuple[LayerRecalibration, ...]
    batches: int
    samples: int | None
    world_size: int
    written: bool
    seconds: float
    mode: str = "population"
    passes: int = 1
    last_move: float | None = None

    def unreached(self) -> list[LayerRecalibration]:
        """The layers no batch reached (left unchanged)."""
        return [layer for layer in self.layers if not layer.reached]

    def layer(self, name: str) -> LayerRecalibration:
        """The result for the module called ``name``; KeyError when there is none."""
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)


def _before(module: torch.nn.Module, name: str) -> np.ndarray:
    return buffer_of(module, name).detach().cpu().double().numpy().copy()


def finalise(
    accs: list[LayerAccumulator], sums: list[LayerSums], estimator: Estimator
) -> list[LayerRecalibration]:
    """Each layer's result: its buffers now, both methods' statistics, and ``estimator``'s as ``after_*``."""
    population = ESTIMATORS[RecalibrationMethod.POPULATION]
    batch_mean = ESTIMATORS[RecalibrationMethod.BATCH_MEAN]
    out = []
    for acc, s in zip(accs, sums, strict=True):
        module = acc.module
        before_mean, before_var = _before(module, "running_mean"), _before(module, "running_var")
        pop: tuple[np.ndarray, np.ndarray] | tuple[None, None] = (None, None)
        per_call: tuple[np.ndarray, np.ndarray] | tuple[None, None] = (None, None)
        after = (before_mean.copy(), before_var.copy())
        if s.reached:
            pop, per_call = population.estimate(s), batch_mean.estimate(s)
            # InstanceNorm's running statistics are, by torch's definition, averages over instances.
            after = per_call if acc.per_instance else estimator.estimate(s)
        out.append(
            LayerRecalibration(
                name=acc.name,
                kind=type(module).__name__,
                channels=acc.channels,
                eps=float(module.eps),  # type: ignore[arg-type]
                reached=s.reached,
                calls=s.calls,
                samples=s.population.count,
                before_mean=before_mean,
                before_var=before_var,
                after_mean=after[0],
                after_var=after[1],
                population_mean=pop[0],
                population_var=pop[1],
                batch_mean_mean=per_call[0],
                batch_mean_var=per_call[1],
                noise=s.noise() if s.reached else None,
                single_calls=s.single_calls,
            )
        )
    return out
