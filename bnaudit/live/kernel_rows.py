"""BatchNorm's own kernel writing each call's batch statistics straight into a row of a per-layer table.

A measuring call that lets the CPU kernel compute the batch statistics (see ``measure.kernel_is_exact``)
passes it, as its "running" buffers, the next free row of two float32 tables and momentum 1: the kernel
writes the batch mean and unbiased variance there itself, and the call costs nothing beyond the kernel's.
The rows are folded into the layer's float64 sums in one vectorised merge when the table is full or the
sums are read — where folding every call in as it comes took about ten small tensor operations per call
(a quarter of a BatchNorm call's time on small inputs).

Exactness: the kernel sums in double and rounds the mean and the variance to float32 once (relative
2**-24 each). That is within 1e-6 of the float64 statistics unless a channel's mean dwarfs its spread;
the layer's first call is checked against that (``FIRST_CALL_RATIO``) and such a layer keeps the float64
path, and each merge computes the bound that the rounding of the rows' means puts on the merged mean
(:attr:`KernelRows.worst_mean_bound`, in units of the layer's std), so that a layer whose inputs drift
towards that regime later in the pass stops using the kernel and is reported.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from bnaudit.bn.stats import ChannelStats
from bnaudit.live.estimators import LayerSums

log = logging.getLogger(__name__)

ROWS = 64
CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}
# The float32 rounding of a row's mean is at most 2**-24 of it: the bound on the merged mean's error.
FLOAT32_HALF_ULP = 2.0**-24
# The first call takes the kernel only when every channel's |mean| / std is below this (4x below the
# ratio at which the rounding reaches 1e-6 std), leaving room for later calls to drift.
FIRST_CALL_RATIO = 4.0
# A merged mean whose rounding bound exceeds this many stds makes the layer leave the kernel path.
MEAN_BOUND_LIMIT = 5e-7


def kernel_is_exact(x: torch.Tensor, weight: Any, bias: Any) -> bool:
    """True where BatchNorm's CPU kernel gives statistics as exact as ````accumulate.moments````:
    float32 (parameters too) in plain contiguous layout with more than one value per sample and channel.

    That kernel sums in double, two passes (mean, then squared deviations); its channels-last path (also taken
    for (N, C) and N x C x 1 x 1 inputs) sums in float32, which is not exact enough, and is left to
    ``var_mean``. tests/live/test_recalibrate.py holds it to the float64 reference on a million values per
    channel.
    """
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() < 3 or not x.is_contiguous():
        return False
    if x.dim() in CHANNELS_LAST and x.is_contiguous(memory_format=CHANNELS_LAST[x.dim()]):
        return False  # ambiguous strides (C == 1, or H = W = 1): the kernel may take its channels-last path
    if x.numel() // max(1, x.shape[0] * x.shape[1]) <= 1:
        return False
    return all(p is None or p.dtype == torch.float32 for p in (weight, bias))


class KernelRows:
    """Float32 tables of one layer's per-call (mean, unbiased variance), merged in blocks (float64 NumPy).

    The merge runs in NumPy on views of the tables: on vectors of a few hundred channels a NumPy operation
    costs a fraction of a torch one, and the merge is most of a layer's fixed cost per pass.
    """

    def __init__(self, name: str, channels: int) -> None:
        self.name = name
        # Normal tensors even when the pass runs under inference mode: the merge empties them outside it.
        with torch.inference_mode(False):
            self.means = torch.zeros(ROWS, channels, dtype=torch.float32)
            self.vars = torch.zeros(ROWS, channels, dtype=torch.float32)
        self._means_np, self._vars_np = self.means.numpy(), self.vars.numpy()
        # Row views, made once each as first used: indexing a row per call costs a tensor operation.
        self._mean_rows: list[torch.Tensor] = []
        self._var_rows: list[torch.Tensor] = []
        self.counts: list[int] = []
        self.merged = LayerSums.empty(channels)
        self.worst_mean_bound = 0.0  # the largest merged-mean rounding bound seen, in stds

    def normalise(self, x: torch.Tensor, n: int, weight: Any, bias: Any, eps: float) -> torch.Tensor:
        """Train-mode BatchNorm of ``x`` (``n`` values per channel), its statistics kept in the next row."""
        row = len(self.counts)
        if row == ROWS:
            self.flush()
            row = 0
        if row == len(self._mean_rows):
            with torch.inference_mode(False):
                self._mean_rows.append(self.means[row])
                self._var_rows.append(self.vars[row])
        out = torch.batch_norm(
            x, weight, bias, self._mean_rows[row], self._var_rows[row], True, 1.0, eps, False
        )
        self.counts.append(n)
        return out

    def last_fits(self) -> bool:
        """Whether the last call's means are small enough against its spread for the kernel (first call)."""
        row, n = len(self.counts) - 1, self.counts[-1]
        var = self._vars_np[row].astype(np.float64) * ((n - 1) / n)
        return bool((np.abs(self._means_np[row].astype(np.float64)) <= FIRST_CALL_RATIO * np.sqrt(var)).all())

    def flush(self) -> None:
        """Merge the filled rows into :attr:`merged` (one vectorised float64 merge) and empty the table."""
        k = len(self.counts)
        if k == 0:
            return
        n = np.asarray(self.counts, dtype=np.float64)[:, None]
        means = self._means_np[:k].astype(np.float64)
        unbiased = self._vars_np[:k].astype(np.float64)
        total = float(n.sum())
        mean = (n * means).sum(0) / total
        deviation = means - mean
        m2 = (unbiased * (n - 1)).sum(0) + (n * deviation * deviation).sum(0)
        block = LayerSums(
            ChannelStats(total, mean, m2), k, means.sum(0), unbiased.sum(0),
            (means * means).sum(0), (unbiased * unbiased).sum(0),
        )  # fmt: skip
        self.merged = self.merged.merge(block)
        self._note_bound((n * np.abs(means)).sum(0) * FLOAT32_HALF_ULP / total, np.sqrt(m2 / total))
        self.discard()

    def _note_bound(self, bound: np.ndarray, std: np.ndarray) -> None:
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(std > 0, bound / std, np.where(bound > 0, np.inf, 0.0))
        worst = float(ratio.max())
        if worst > MEAN_BOUND_LIMIT >= self.worst_mean_bound:
            log.warning(
                "layer '%s': its inputs' means grew to dwarf their spread during the pass; the float32 "
                "rounding of the means merged so far may reach %.1e std (limit %.0e); the rest of the pass "
                "takes float64 moments",
                self.name, worst, MEAN_BOUND_LIMIT,
            )  # fmt: skip
        self.worst_mean_bound = max(self.worst_mean_bound, worst)

    @property
    def trusted(self) -> bool:
        """False once a merge found the rounding bound above MEAN_BOUND_LIMIT: leave the kernel path."""
        return self.worst_mean_bound <= MEAN_BOUND_LIMIT

    def discard(self) -> None:
        """Empty the table (momentum 1 computes 0 * old + mean: an Inf / NaN left in a row would poison the
        next call, so the used rows are zeroed)."""
        k = len(self.counts)
        self._means_np[:k] = 0.0
        self._vars_np[:k] = 0.0
        self.counts.clear()

    def sums(self) -> LayerSums:
        """Everything merged so far (the table flushed first)."""
        self.flush()
        return self.merged

    def reset(self) -> None:
        """Forget everything (the next pass of ``--mode sequential`` starts afresh)."""
        self.discard()
        self.merged = LayerSums.empty(self.merged.sum_means.shape[0])
