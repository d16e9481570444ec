"""Per-call moments of a layer's input and their running merge on the layer's device (float64, Chan)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.modules.instancenorm import _InstanceNorm

from bnaudit.bn.stats import ChannelStats
from bnaudit.errors import InputError
from bnaudit.live.estimators import LayerSums
from bnaudit.live.kernel_rows import KernelRows, kernel_is_exact

# Above this |mean| / std ratio a float32 mean (relative rounding 6e-8) may miss 1e-6 * std: use float64.
FLOAT32_MEAN_STD_RATIO = 8.0

LOW_PRECISION = (torch.float16, torch.bfloat16)


def moments(x: torch.Tensor, dims: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (biased variance, mean) of ``x`` over ``dims``, accurate to float64 tolerance.

    On CPU a float32 ``var_mean`` (accumulated in double inside ATen) is as cheap as BatchNorm's own
    statistics and exact to float32 rounding of its results, enough unless a channel's mean dwarfs its
    spread; those calls are recomputed in float64. A half / bfloat16 input (under ``amp``) is widened to
    float32 first, which is exact (every such value is a float32 value), so only the forward itself is low
    precision, never the moments. Elsewhere (CUDA: no host sync wanted) the input is widened to float64.
    """
    if x.dtype in LOW_PRECISION and x.device.type == "cpu":
        x = x.float()
    if x.dtype == torch.float32 and x.device.type == "cpu":
        var, mean = torch.var_mean(x, dim=dims, correction=0)
        if bool((mean.abs() <= FLOAT32_MEAN_STD_RATIO * var.sqrt()).all()):
            return var, mean
    return torch.var_mean(x.to(torch.float64), dim=dims, correction=0)


def buffer_of(module: nn.Module, name: str) -> torch.Tensor:
    """The tensor buffer ``name`` of a BatchNorm-like module (``running_mean``, ``running_var``)."""
    buf = getattr(module, name)
    if not isinstance(buf, torch.Tensor):
        raise InputError("has no tensor buffer", where=f"module {type(module).__name__}", found=name)
    return buf


class LayerAccumulator:
    """Collects one layer's input statistics on the layer's device, without a host sync per call."""

    def __init__(self, name: str, module: nn.Module) -> None:
        self.name = name
        self.module = module
        self.channels = buffer_of(module, "running_mean").numel()
        # BatchNorm's kernel writing the statistics into a table (kernel_rows), once the first call showed
        # it exact enough for this layer (None: not decided yet)
        self.rows: KernelRows | None = None
        self.use_kernel: bool | None = None
        # the (shape, strides, dtype, device) of the last input found fit for the kernel, and its count per
        # channel: most calls repeat it, and checking it again costs a quarter of a small BatchNorm call
        self._kernel_layout: tuple[Any, ...] | None = None
        self._kernel_values = 0
        self.reset()
        no_batch = getattr(module, "_get_no_batch_dim", None)
        self.no_batch_dim: int | None = no_batch() if callable(no_batch) else None
        # torch's InstanceNorm tracks the mean over instances of each instance's mean and unbiased variance
        # (not the variance of all values): every instance is folded in as a call of its own.
        self.per_instance = isinstance(module, _InstanceNorm)

    def reset(self) -> None:
        """Forget what was collected (the next pass of ``--mode sequential`` starts afresh)."""
        if self.rows is not None:
            self.rows.reset()
        self.count = 0.0
        self.calls = 0
        self.single_calls = 0  # calls with one value per channel (left out of the per-call sums)
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None
        self.sum_means: torch.Tensor | None = None
        self.sum_vars: torch.Tensor | None = None
        # Squares of the per-call moments: the spread between calls gives the estimate's own noise (drift).
        self.sum_sq_means: torch.Tensor | None = None
        self.sum_sq_vars: torch.Tensor | None = None

    def check(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The input with its batch dimension and its count of values per channel; InputError if misshapen."""
        if self.no_batch_dim is not None and x.dim() == self.no_batch_dim:
            x = x.unsqueeze(0)  # an unbatched InstanceNorm input is one sample
        if x.dim() < 2 or x.shape[1] != self.channels:
            raise InputError(
                "got an input with the wrong number of channels",
                where=f"layer '{self.name}'",
                expected=f"{self.channels} channels",
                found=f"an input of shape {list(x.shape)}",
            )
        return x, x.numel() // self.channels

    def add(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Fold one call's input in; returns that call's (mean, biased variance), None for an empty input."""
        x, n = self.check(x)
        if n == 0:
            return None
        if self.per_instance:
            self._add_instances(x, n // x.shape[0])
            return None
        var, mean = moments(x.detach(), [0, *range(2, x.dim())])
        self._merge(n, mean.to(torch.float64), var.to(torch.float64))
        return mean, var

    def _add_instances(self, x: torch.Tensor, per_instance: int) -> None:
        """Fold in each instance (one sample's channel over its positions) as a call of its own, at once."""
        whole_var, whole_mean = moments(x.detach(), [0, *range(2, x.dim())])
        # The population of all the values is the whole call's; the per-call sums are the instances'.
        self._merge_population(
            x.shape[0] * per_instance, whole_mean.to(torch.float64), whole_var.to(torch.float64)
        )
        self.calls += x.shape[0]
        if per_instance == 1:
            self.single_calls += x.shape[0]
            return
        var, mean = moments(x.detach(), list(range(2, x.dim())))  # instances x channels
        mean, unbiased = mean.to(torch.float64), var.to(torch.float64) * per_instance / (per_instance - 1)
        self._add_call_sums(mean.sum(0), unbiased.sum(0), (mean * mean).sum(0), (unbiased * unbiased).sum(0))

    def kernel_values(self, x: torch.Tensor, weight: Any, bias: Any) -> int:
        """The values per channel of ``x`` when BatchNorm's kernel may measure it, else 0 (the ``var_mean``
        path): an exact layout (:func:`kernel_is_exact`) with more than one value per channel (train-mode
        BatchNorm refuses one), in a layer whose inputs have not shown means dwarfing their spread."""
        if self.use_kernel is False:
            return 0
        layout = (x.shape, x.stride(), x.dtype, x.device)
        if layout != self._kernel_layout:
            if not kernel_is_exact(x, weight, bias):
                return 0
            n = self.check(x)[1]
            if n <= 1:
                return 0
            self._kernel_layout, self._kernel_values = layout, n
        return self._kernel_values

    def kernel_forward(
        self, x: torch.Tensor, n: int, weight: Any, bias: Any, eps: float
    ) -> torch.Tensor | None:
        """Train-mode BatchNorm of ``x`` by the kernel, its statistics kept (kernel_rows); None where this
        layer's inputs are not for the kernel (the caller takes the ``var_mean`` path instead)."""
        rows = self.rows
        if rows is None:
            rows = self.rows = KernelRows(self.name, self.channels)
        out = rows.normalise(x, n, weight, bias, eps)
        if self.use_kernel is None:
            self.use_kernel = rows.last_fits()
            if not self.use_kernel:  # keep this call's exact moments instead of the kernel's
                rows.discard()
                self.add(x)
        elif not rows.trusted:  # a merge found the means drifting towards float32's limit: float64 from now
            self.use_kernel = False
        return out

    def _merge(self, n: int, mean: torch.Tensor, var: torch.Tensor) -> None:
        self._merge_population(n, mean, var)
        self.calls += 1
        if n == 1:
            # One value per channel has no unbiased variance: the per-call sums (batch-mean, the noise)
            # leave the call out; the population statistics keep its value.
            self.single_calls += 1
            return
        unbiased = var * n / (n - 1)
        self._add_call_sums(mean, unbiased, mean * mean, unbiased * unbiased)

    def _merge_population(self, n: int, mean: torch.Tensor, var: torch.Tensor) -> None:
        m2 = var * n
        if self.mean is None or self.m2 is None:
            self.count, self.mean, self.m2 = float(n), mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        # Chan et al.: merge (count, mean, M2) of the running total with this call's.
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta * delta * (self.count * n / total)
        self.count = total

    def _add_call_sums(
        self, means: torch.Tensor, variances: torch.Tensor, sq_means: torch.Tensor, sq_vars: torch.Tensor
    ) -> None:
        """Add calls' means, unbiased variances and their squares (summed over the calls) to the sums."""
        if (
            self.sum_means is None
            or self.sum_vars is None
            or self.sum_sq_means is None
            or self.sum_sq_vars is None
        ):
            self.sum_means, self.sum_vars = means.clone(), variances.clone()
            self.sum_sq_means, self.sum_sq_vars = sq_means.clone(), sq_vars.clone()
            return
        self.sum_means = self.sum_means + means
        self.sum_vars = self.sum_vars + variances
        self.sum_sq_means = self.sum_sq_means + sq_means
        self.sum_sq_vars = self.sum_sq_vars + sq_vars

    def sums(self) -> LayerSums:
        """What was collected, as float64 NumPy sufficient statistics (one host copy per layer)."""
        kernel = self.rows.sums() if self.rows is not None else None
        if self.mean is None or self.m2 is None:
            return kernel if kernel is not None else LayerSums.empty(self.channels)
        zeros = torch.zeros_like(self.mean)
        per_call = (self.sum_means, self.sum_vars, self.sum_sq_means, self.sum_sq_vars)
        kept = (self.mean, self.m2, *(zeros if t is None else t for t in per_call))
        mean, m2, sum_means, sum_vars, sum_sq_means, sum_sq_vars = (
            t.cpu().numpy().astype(np.float64) for t in kept
        )
        population = ChannelStats(self.count, mean, m2)
        sums = LayerSums(
            population, self.calls, sum_means, sum_vars, sum_sq_means, sum_sq_vars, self.single_calls
        )
        return sums if kernel is None else sums.merge(kernel)
