"""Exact population statistics of each BatchNorm layer's input on calibration data (one or many processes)."""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from bnaudit.bn.stats import ChannelStats, kl_normal
from bnaudit.errors import BnauditError, InputError, NoBatchNormError, UsageError

log = logging.getLogger(__name__)

METHODS = ("population", "batch-mean")

ProgressCallback = Callable[[int, "int | None"], None]
ForwardFn = Callable[[nn.Module, Any], Any]


class _StopForward(BaseException):
    """Raised from a hook once the last BatchNorm call of a forward is recorded: the rest is not needed.

    A BaseException so that a model's own ``except Exception`` cannot swallow it.
    """


def is_recalibratable(module: nn.Module) -> bool:
    """True for BatchNorm1d/2d/3d, SyncBatchNorm and InstanceNorm layers that keep running statistics."""
    from torch.nn.modules.batchnorm import _BatchNorm
    from torch.nn.modules.instancenorm import _InstanceNorm

    if not isinstance(module, _BatchNorm | _InstanceNorm):
        return False
    return bool(module.track_running_stats) and isinstance(module.running_mean, torch.Tensor)


def find_bn_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every BatchNorm-like module that keeps running statistics, with its name, in ``named_modules`` order.

    A module shared by several parents appears once, under its first name.
    """
    return [(name, m) for name, m in model.named_modules() if is_recalibratable(m)]


# ---------------------------------------------------------------------------------------------- statistics


@dataclass
class LayerSums:
    """Sufficient statistics of one layer's input, mergeable across batches, calls and ranks (float64).

    Attributes:
        population: count (elements per channel seen: N*H*W summed over calls), mean and M2 per channel.
        calls: number of forward calls that reached the layer.
        sum_means: sum over calls of each call's mean (for ``batch-mean``).
        sum_vars: sum over calls of each call's *unbiased* variance (for ``batch-mean``).
    """

    population: ChannelStats
    calls: int
    sum_means: np.ndarray
    sum_vars: np.ndarray

    @classmethod
    def empty(cls, channels: int) -> LayerSums:
        zeros = np.zeros(channels, dtype=np.float64)
        return cls(ChannelStats.empty(channels), 0, zeros, zeros.copy())

    def merge(self, other: LayerSums) -> LayerSums:
        return LayerSums(
            self.population.merge(other.population),
            self.calls + other.calls,
            self.sum_means + other.sum_means,
            self.sum_vars + other.sum_vars,
        )

    def pack(self) -> np.ndarray:
        p = self.population
        head = np.array([p.count, float(self.calls)], dtype=np.float64)
        return np.concatenate([head, p.mean, p.m2, self.sum_means, self.sum_vars])

    @classmethod
    def unpack(cls, flat: np.ndarray, channels: int) -> LayerSums:
        c = channels
        body = flat[2:]
        pop = ChannelStats(float(flat[0]), body[:c].copy(), body[c : 2 * c].copy())
        return cls(pop, round(float(flat[1])), body[2 * c : 3 * c].copy(), body[3 * c : 4 * c].copy())

    @staticmethod
    def packed_size(channels: int) -> int:
        return 2 + 4 * channels


# Above this |mean| / std ratio a float32 mean (relative rounding 6e-8) may miss 1e-6 * std: use float64.
_FLOAT32_MEAN_STD_RATIO = 8.0


_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _moments(x: torch.Tensor, dims: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (biased variance, mean) of ``x`` over ``dims``, accurate to float64 tolerance.

    On CPU a float32 ``var_mean`` (accumulated in double inside ATen) is as cheap as BatchNorm's own
    statistics and exact to float32 rounding of its results, enough unless a channel's mean dwarfs its
    spread; those calls are recomputed in float64. A half / bfloat16 input (under ``amp``) is widened to
    float32 first, which is exact (every such value is a float32 value), so only the forward itself is low
    precision, never the moments. Elsewhere (CUDA: no host sync wanted) the input is widened to float64.
    """
    if x.dtype in _LOW_PRECISION and x.device.type == "cpu":
        x = x.float()
    if x.dtype == torch.float32 and x.device.type == "cpu":
        var, mean = torch.var_mean(x, dim=dims, correction=0)
        if bool((mean.abs() <= _FLOAT32_MEAN_STD_RATIO * var.sqrt()).all()):
            return var, mean
    return torch.var_mean(x.to(torch.float64), dim=dims, correction=0)


def _buffer(module: nn.Module, name: str) -> torch.Tensor:
    buf = getattr(module, name)
    assert isinstance(buf, torch.Tensor)
    return buf


class _Accumulator:
    """Collects one layer's input statistics on the layer's device, without a host sync per call."""

    def __init__(self, name: str, module: nn.Module) -> None:
        self.name = name
        self.module = module
        self.channels = _buffer(module, "running_mean").numel()
        self.count = 0.0
        self.calls = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None
        self.sum_means: torch.Tensor | None = None
        self.sum_vars: torch.Tensor | None = None
        no_batch = getattr(module, "_get_no_batch_dim", None)
        self.no_batch_dim: int | None = no_batch() if callable(no_batch) else None

    def check(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The input with its batch dimension and its count of values per channel; InputError if misshapen."""
        if self.no_batch_dim is not None and x.dim() == self.no_batch_dim:
            x = x.unsqueeze(0)  # an unbatched InstanceNorm input is one sample
        if x.dim() < 2 or x.shape[1] != self.channels:
            raise InputError(
                f"layer '{self.name}' expects {self.channels} channels, got an input of shape {list(x.shape)}"
            )
        return x, x.numel() // self.channels

    def add(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Fold one call's input in; returns that call's (mean, biased variance), None for an empty input."""
        x, n = self.check(x)
        if n == 0:
            return None
        var, mean = _moments(x.detach(), [0, *range(2, x.dim())])
        self._merge(n, mean.to(torch.float64), var.to(torch.float64))
        return mean, var

    def add_kernel_moments(self, x: torch.Tensor, n: int, mean: torch.Tensor, var: torch.Tensor) -> None:
        """Fold in one call's float32 (mean, biased variance) from BatchNorm's own kernel (``x``: that input).

        As in :func:`_moments`, a call whose mean dwarfs its spread is recomputed from ``x`` in float64.
        """
        if not bool((mean.abs() <= _FLOAT32_MEAN_STD_RATIO * var.sqrt()).all()):
            var, mean = torch.var_mean(
                x.detach().to(torch.float64), dim=[0, *range(2, x.dim())], correction=0
            )
        self._merge(n, mean.to(torch.float64), var.to(torch.float64))

    def _merge(self, n: int, mean: torch.Tensor, var: torch.Tensor) -> None:
        m2 = var * n
        self.calls += 1
        unbiased = m2 / (n - 1) if n > 1 else torch.full_like(m2, float("nan"))
        if self.mean is None or self.m2 is None or self.sum_means is None or self.sum_vars is None:
            self.count, self.mean, self.m2 = float(n), mean, m2
            self.sum_means, self.sum_vars = mean.clone(), unbiased
            return
        total = self.count + n
        delta = mean - self.mean
        # Chan et al.: merge (count, mean, M2) of the running total with this call's.
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta * delta * (self.count * n / total)
        self.count = total
        self.sum_means = self.sum_means + mean
        self.sum_vars = self.sum_vars + unbiased

    def sums(self) -> LayerSums:
        if self.mean is None or self.m2 is None or self.sum_means is None or self.sum_vars is None:
            return LayerSums.empty(self.channels)
        as_np = [
            t.cpu().numpy().astype(np.float64) for t in (self.mean, self.m2, self.sum_means, self.sum_vars)
        ]
        return LayerSums(ChannelStats(self.count, as_np[0], as_np[1]), self.calls, as_np[2], as_np[3])


# ------------------------------------------------------------------------------------------------- results


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

    def shift(self) -> np.ndarray:
        """Per channel |after_mean - before_mean| / sqrt(after_var + eps): the mean's move in new stds."""
        with np.errstate(invalid="ignore"):
            return np.abs(self.after_mean - self.before_mean) / np.sqrt(self.after_var + self.eps)

    def std_ratio(self) -> np.ndarray:
        """Per channel max(r, 1/r), r = sqrt((after_var + eps) / (before_var + eps)); 1 means unchanged."""
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.sqrt((self.after_var + self.eps) / (self.before_var + self.eps))
            return np.where(np.isfinite(r), np.maximum(r, 1.0 / r), np.inf)

    def metrics(self) -> dict[str, float | int | None]:
        """Headline numbers for a before/after table: max_kl, worst_channel, max_shift, max_std_ratio."""
        if not self.reached or self.channels == 0:
            return {"max_kl": None, "worst_channel": None, "max_shift": None, "max_std_ratio": None,
                    "calls": self.calls, "samples": self.samples}  # fmt: skip
        kl = self.kl()
        return {
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
    """

    method: str
    layers: tuple[LayerRecalibration, ...]
    batches: int
    samples: int | None
    world_size: int
    written: bool
    seconds: float

    def unreached(self) -> list[LayerRecalibration]:
        """The layers no batch reached (left unchanged)."""
        return [layer for layer in self.layers if not layer.reached]

    def layer(self, name: str) -> LayerRecalibration:
        """The result for the module called ``name``; KeyError when there is none."""
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)


# --------------------------------------------------------------------------------------------- the pass


@dataclass
class _PassState:
    """Forward-order bookkeeping for ``stop_after_last_bn``."""

    enabled: bool
    batch_index: int = 0
    stop_at: tuple[int, int] | None = None  # (layer index, call number within a forward)
    first_sequence: list[int] | None = None
    calls_this_batch: dict[int, int] | None = None

    def start_batch(self, index: int) -> None:
        self.batch_index = index
        self.calls_this_batch = {}
        if index == 0:
            self.first_sequence = []

    def end_batch(self) -> None:
        if self.enabled and self.batch_index == 0 and self.first_sequence and self.calls_this_batch:
            last = self.first_sequence[-1]
            self.stop_at = (last, self.calls_this_batch[last])

    def record(self, layer_index: int) -> bool:
        """Count one call; True when the rest of this forward can be skipped."""
        assert self.calls_this_batch is not None
        seen = self.calls_this_batch.get(layer_index, 0) + 1
        self.calls_this_batch[layer_index] = seen
        if self.first_sequence is not None and self.batch_index == 0:
            self.first_sequence.append(layer_index)
        return self.stop_at is not None and self.stop_at == (layer_index, seen)


def _make_hook(acc: _Accumulator, index: int, state: _PassState) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = args[0] if args else kwargs.get("input")
        if not isinstance(x, torch.Tensor):
            raise InputError(f"layer '{acc.name}' was called without a tensor input")
        acc.add(x)
        if state.record(index):
            raise _StopForward

    return hook


def _kernel_is_exact(x: torch.Tensor, module: Any) -> bool:
    """True where BatchNorm's CPU kernel gives statistics as exact as :func:`_moments`: float32 (parameters
    too) in plain contiguous layout with more than one value per sample and channel. That kernel sums in
    double, two passes (mean, then squared deviations); its channels-last path (also taken for (N, C) and
    N x C x 1 x 1 inputs) sums in float32, which is not exact enough, and is left to ``var_mean``.
    tests/live/test_recalibrate.py holds it to the float64 reference on a million values per channel.
    """
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() < 3 or not x.is_contiguous():
        return False
    if x.dim() in _CHANNELS_LAST and x.is_contiguous(memory_format=_CHANNELS_LAST[x.dim()]):
        return False  # ambiguous strides (C == 1, or H = W = 1): the kernel may take its channels-last path
    if x.numel() // max(1, x.shape[0] * x.shape[1]) <= 1:
        return False
    params = (module.weight, module.bias)
    return all(p is None or p.dtype == torch.float32 for p in params)


def _measuring_forward(
    acc: _Accumulator, index: int, state: _PassState
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A train-mode BatchNorm forward that records the batch statistics and normalises with them.

    Where BatchNorm's own CPU kernel is exact (see :func:`_kernel_is_exact`) it computes the statistics and
    normalises in one call, with momentum 1 into scratch buffers: as cheap as ``update_bn``'s forward (a
    separate ``var_mean`` costs twice the whole BatchNorm there). Elsewhere the statistics come from
    :func:`_moments` and the input is normalised with them by an inference-mode batch_norm. Either way
    SyncBatchNorm does not sync across ranks (nor refuse CPU tensors): every batch is normalised by its own
    statistics, as in a single process.
    """
    module: Any = acc.module  # a BatchNorm: weight/bias/eps are there, typed loosely by nn.Module

    def forward(x: torch.Tensor) -> torch.Tensor:
        if _kernel_is_exact(x, module):
            x, n = acc.check(x)
            if n > 1:  # (train-mode BatchNorm refuses a single value per channel)
                scratch_mean = torch.zeros(acc.channels, dtype=torch.float32)
                scratch_var = torch.zeros(acc.channels, dtype=torch.float32)
                out = nn.functional.batch_norm(
                    x, scratch_mean, scratch_var, module.weight, module.bias, True, 1.0, module.eps
                )
                # With momentum 1 the scratch buffers hold the batch mean and the *unbiased* variance.
                acc.add_kernel_moments(x, n, scratch_mean, scratch_var.double() * ((n - 1) / n))
                if state.record(index):
                    raise _StopForward
                return out
        moments = acc.add(x)
        if state.record(index):
            raise _StopForward
        if moments is None:
            return x.clone()
        mean, var = moments
        # Under autocast x may be half / bfloat16 while the affine parameters stay float32: batch_norm takes
        # that mix (the usual AMP layout); float32 statistics keep the normalisation as exact as it can be.
        if module.weight is not None:
            dtype = module.weight.dtype
        else:
            dtype = torch.float32 if x.dtype in _LOW_PRECISION else x.dtype
        return nn.functional.batch_norm(
            x, mean.to(dtype), var.to(dtype), module.weight, module.bias, False, 0.0, module.eps
        )

    return forward


def to_channels_last(batch: Any) -> Any:
    """Every 4-D (5-D) tensor of a tensor / tuple / list / dict batch in channels_last(_3d) memory format."""
    if isinstance(batch, torch.Tensor):
        fmt = _CHANNELS_LAST.get(batch.dim())
        return batch if fmt is None else batch.contiguous(memory_format=fmt)
    if isinstance(batch, Mapping):
        return {k: to_channels_last(v) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(to_channels_last(v) for v in batch))
    if isinstance(batch, list | tuple):
        return type(batch)(to_channels_last(v) for v in batch)
    return batch


def to_device(batch: Any, device: torch.device | None) -> Any:
    """Move every tensor in a tensor / tuple / list / dict batch to ``device`` (other values unchanged)."""
    if device is None:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(to_device(v, device) for v in batch))
    if isinstance(batch, list | tuple):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def _batch_len(batch: Any, input_index: int, input_key: str | None) -> int | None:
    from bnaudit.live.specs import batch_input

    try:
        x = batch_input(batch, input_index, input_key)
    except BnauditError:
        return None
    return int(x.shape[0]) if isinstance(x, torch.Tensor) and x.dim() > 0 else None


def _model_device(model: nn.Module) -> torch.device | None:
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return None


@dataclass
class _Options:
    forward: ForwardFn | None
    input_index: int
    input_key: str | None
    max_batches: int | None
    max_samples: int | None
    device: torch.device | None
    progress: ProgressCallback | None
    check_peers: Callable[[], None] | None
    # local batch k is global batch offset + k * stride (distributed sharding), for error messages
    batch_offset: int = 0
    batch_stride: int = 1
    # (device type, dtype) for torch.autocast, None: full precision
    autocast: tuple[str, torch.dtype] | None = None
    channels_last: bool = False


def _run_one(model: nn.Module, batch: Any, opts: _Options) -> None:
    from bnaudit.live.specs import batch_input

    amp: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if opts.autocast is not None:
        amp = torch.autocast(opts.autocast[0], dtype=opts.autocast[1])
    with amp:
        if opts.forward is not None:
            opts.forward(model, batch)
        else:
            model(batch_input(batch, opts.input_index, opts.input_key))


def _iterate(batches: Iterable[Any], opts: _Options) -> Iterator[tuple[int, Any]]:
    it = iter(batches)
    index = 0
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except BnauditError:
            raise
        except Exception as exc:
            number = opts.batch_offset + index * opts.batch_stride
            raise InputError(
                f"loading batch {number} raised {type(exc).__name__}: {_one_line(exc)}"
            ) from None
        yield index, batch
        index += 1


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]


def _run_pass(
    model: nn.Module, batches: Iterable[Any], state: _PassState, opts: _Options
) -> tuple[int, int | None]:
    """Feed batches through the model; returns (batches used, samples used or None when unknown)."""
    used, samples = 0, 0
    sizes_known = True
    total = _length(batches, opts.max_batches)
    for index, raw in _iterate(batches, opts):
        if opts.max_batches is not None and used >= opts.max_batches:
            break
        if opts.max_samples is not None and samples >= opts.max_samples:
            break
        if opts.check_peers is not None:
            opts.check_peers()
        batch = to_device(raw, opts.device)
        if opts.channels_last:
            batch = to_channels_last(batch)
        size = _batch_len(batch, opts.input_index, opts.input_key)
        if size is None:
            if opts.max_samples is not None:
                raise UsageError(
                    "--max-samples needs batches whose input bnaudit can read; use --max-batches"
                )
            sizes_known = False
        state.start_batch(index)
        try:
            _run_one(model, batch, opts)
        except _StopForward:
            pass
        except BnauditError:
            raise
        except Exception as exc:
            number = opts.batch_offset + index * opts.batch_stride
            raise InputError(f"batch {number} raised {type(exc).__name__}: {_one_line(exc)}") from None
        state.end_batch()
        used += 1
        samples += size or 0
        if opts.progress is not None:
            opts.progress(used, total)
    return used, samples if sizes_known else None


def _length(batches: Iterable[Any], max_batches: int | None) -> int | None:
    try:
        n = len(batches)  # type: ignore[arg-type]
    except TypeError:
        return max_batches
    return n if max_batches is None else min(n, max_batches)


@dataclass
class _Saved:
    """Everything the pass changes on the model, to put back in ``finally``."""

    training: dict[nn.Module, bool]
    buffers: list[tuple[torch.Tensor, torch.Tensor]]
    hooks: list[Any]
    patched: list[nn.Module]
    # 4-D / 5-D parameters and buffers moved to channels_last: the format (or the very tensor) to put back
    formats: list[tuple[torch.Tensor, torch.memory_format | torch.Tensor]] = field(default_factory=list)

    def restore(self) -> None:
        for handle in self.hooks:
            handle.remove()
        for module in self.patched:
            del module.forward
        for tensor, original in self.formats:
            if isinstance(original, torch.Tensor):
                tensor.data = original
            else:
                tensor.data = tensor.data.contiguous(memory_format=original)
        for module, flag in self.training.items():
            module.training = flag
        with torch.no_grad():
            for live, saved in self.buffers:
                live.copy_(saved)


_PLAIN_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def _to_channels_last(model: nn.Module, saved: _Saved) -> None:
    """Move the model's 4-D / 5-D parameters and buffers to channels_last, noting how to put each back.

    Done tensor by tensor rather than with ``model.to(memory_format=...)``, which refuses 5-D tensors, and so
    that a tensor already in neither standard format is restored as the very same tensor.
    """
    with torch.no_grad():
        for tensor in itertools.chain(model.parameters(), model.buffers()):
            fmt = _CHANNELS_LAST.get(tensor.dim())
            if fmt is None or (tensor.is_contiguous(memory_format=fmt) and not tensor.is_contiguous()):
                continue
            original: torch.memory_format | torch.Tensor = tensor.data
            if tensor.is_contiguous():
                original = torch.contiguous_format
            saved.formats.append((tensor, original))
            tensor.data = tensor.data.contiguous(memory_format=fmt)


def _prepare(model: nn.Module, accs: list[_Accumulator], state: _PassState, channels_last: bool) -> _Saved:
    saved = _Saved({m: m.training for m in model.modules()}, [], [], [])
    if channels_last:
        _to_channels_last(model, saved)
    # The layers' own running updates during the pass are discarded: the buffers (num_batches_tracked too)
    # are put back afterwards, then overwritten with the exact statistics when writing.
    for acc in accs:
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            buf = getattr(acc.module, name, None)
            if isinstance(buf, torch.Tensor):
                saved.buffers.append((buf, buf.detach().clone()))
    model.eval()  # dropout off, every other module in inference behaviour
    for index, acc in enumerate(accs):
        acc.module.train()
        if type(acc.module) in _PLAIN_BATCHNORMS:
            acc.module.forward = _measuring_forward(acc, index, state)
            saved.patched.append(acc.module)
        else:
            # Subclasses with their own forward, InstanceNorm: observe the input and let the layer run.
            hook = _make_hook(acc, index, state)
            saved.hooks.append(acc.module.register_forward_pre_hook(hook, with_kwargs=True))
    return saved


def _signature(accs: list[_Accumulator]) -> str:
    return ";".join(f"{a.name}:{a.channels}" for a in accs)


def _finalise(accs: list[_Accumulator], sums: list[LayerSums], method: str) -> list[LayerRecalibration]:
    out = []
    for acc, s in zip(accs, sums, strict=True):
        module = acc.module
        before_mean = _buffer(module, "running_mean").detach().cpu().double().numpy().copy()
        before_var = _buffer(module, "running_var").detach().cpu().double().numpy().copy()
        reached = s.calls > 0 and s.population.count > 0
        pop_mean = pop_var = bm_mean = bm_var = None
        if reached:
            pop_mean = s.population.mean
            pop_var = (
                s.population.m2 / (s.population.count - 1)
                if s.population.count > 1
                else s.population.m2 * np.nan
            )
            bm_mean, bm_var = s.sum_means / s.calls, s.sum_vars / s.calls
        chosen = (pop_mean, pop_var) if method == "population" else (bm_mean, bm_var)
        after_mean = chosen[0] if chosen[0] is not None else before_mean.copy()
        after_var = chosen[1] if chosen[1] is not None else before_var.copy()
        out.append(
            LayerRecalibration(
                name=acc.name,
                kind=type(module).__name__,
                channels=acc.channels,
                eps=float(module.eps),  # type: ignore[arg-type]
                reached=reached,
                calls=s.calls,
                samples=s.population.count,
                before_mean=before_mean,
                before_var=before_var,
                after_mean=after_mean,
                after_var=after_var,
                population_mean=pop_mean,
                population_var=pop_var,
                batch_mean_mean=bm_mean,
                batch_mean_var=bm_var,
            )
        )
    return out


def _write(accs: list[_Accumulator], layers: list[LayerRecalibration]) -> None:
    with torch.no_grad():
        for acc, layer in zip(accs, layers, strict=True):
            if not layer.reached:
                continue
            for buf, values in (
                (acc.module.running_mean, layer.after_mean),
                (acc.module.running_var, layer.after_var),
            ):
                assert isinstance(buf, torch.Tensor)
                buf.copy_(torch.from_numpy(values).to(device=buf.device, dtype=buf.dtype))


def _reduce(
    ctx: Any, accs: list[_Accumulator], local: list[LayerSums], counts: tuple[int, int]
) -> tuple[list[LayerSums], int, int | None]:
    """Gather every rank's sufficient statistics and merge them in rank order (exact, order-independent)."""
    from bnaudit.live.distributed import all_gather_array

    samples = float(counts[1]) if counts[1] >= 0 else -1.0
    flat = np.concatenate([np.array([float(counts[0]), samples])] + [s.pack() for s in local])
    gathered = all_gather_array(ctx, flat)
    merged = [LayerSums.empty(a.channels) for a in accs]
    total_batches, total_samples, known = 0, 0, True
    for row in gathered:
        total_batches += round(float(row[0]))
        known = known and row[1] >= 0
        total_samples += round(float(row[1]))
        offset = 2
        for i, acc in enumerate(accs):
            size = LayerSums.packed_size(acc.channels)
            merged[i] = merged[i].merge(LayerSums.unpack(row[offset : offset + size], acc.channels))
            offset += size
    return merged, total_batches, total_samples if known else None


def _check_args(method: str, max_batches: int | None, max_samples: int | None) -> None:
    if method not in METHODS:
        raise UsageError(f"--method must be one of {', '.join(METHODS)}, got '{method}'")
    for option, value in (("--max-batches", max_batches), ("--max-samples", max_samples)):
        if value is not None and value <= 0:
            raise UsageError(f"{option} must be a positive integer, got {value}")


def recalibrate(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    method: str = "population",
    forward: ForwardFn | None = None,
    input_index: int = 0,
    input_key: str | None = None,
    max_batches: int | None = None,
    max_samples: int | None = None,
    device: str | torch.device | None = None,
    write: bool = True,
    progress: ProgressCallback | None = None,
    stop_after_last_bn: bool = True,
    distributed: bool | None = None,
    process_group: Any = None,
    sharded: bool = False,
    status_timeout_s: float | None = None,
    channels_last: bool = False,
    amp: bool = False,
    amp_dtype: str | torch.dtype | None = None,
) -> RecalibrationResult:
    """Re-estimate the running statistics of every BatchNorm layer of ``model`` on ``batches``.

    For every module that keeps running statistics (BatchNorm1d/2d/3d, SyncBatchNorm, InstanceNorm with
    ``track_running_stats``), computes the mean and the *unbiased* variance of the layer's input over every
    element it sees (N*H*W per channel and call, so uneven batches and 1d/2d/3d layers are exact), with the
    BatchNorm layers normalising by batch statistics (train mode) and every other module in eval mode
    (dropout off), under ``torch.no_grad()``. Per-call statistics are merged in float64 with Chan's formulas;
    a layer called several times per forward accumulates every call. SyncBatchNorm normalises each batch by
    its own statistics during the pass (no cross-rank sync), as a single process would. InstanceNorm layers
    get
    the population statistics of their input too (their own running update averages per-instance variances).

    A layer no batch reached is reported (``reached=False``) and left unchanged. The layers' own running
    updates during the pass are discarded (``num_batches_tracked`` is left as it was); training flags and
    buffers are restored and hooks removed even when a batch raises.

    Distributed: when ``torch.distributed`` is initialised with several processes (or ``distributed=True``),
    each rank takes global batches rank, rank + N, ... (see ``live.distributed.shard_batches``; pass
    ``sharded=True`` when ``batches`` already holds only this rank's share in that order), the per-layer
    sufficient statistics are gathered and merged in rank order, and every rank writes the same result. A
    failure on any rank makes every rank raise the same error naming that rank, before any collective.

    Args:
        model: the model, already on its device; its buffers are overwritten in place when ``write``.
        batches: any iterable of batches: tensors, tuples/lists (input at ``input_index``), dicts (input at
            ``input_key``), or anything ``forward`` understands.
        method: ``population`` (exact) or ``batch-mean`` (average of per-call means and per-call unbiased
            variances, what ``torch.optim.swa_utils.update_bn`` computes). Both are in the result.
        forward: ``forward(model, batch)`` replacing ``model(input)``.
        input_index, input_key: where the input is in a tuple/list or dict batch.
        max_batches: use at most this many batches (counted over all ranks).
        max_samples: stop once this many samples were used (whole batches; per rank, ceil(max_samples / N)
            in distributed mode, so use ``max_batches`` for results identical to one process).
        device: where batches go; None: the device of the model's first parameter or buffer.
        write: overwrite ``running_mean`` / ``running_var`` of the reached layers (False: measure only).
        progress: called as ``progress(batches_done, total_or_None)`` after each local batch.
        stop_after_last_bn: skip the rest of each forward once the last BatchNorm call of the first batch's
            forward is recorded. Assumes the BatchNorm call sequence does not depend on the data; turn it off
            for models with data-dependent control flow.
        distributed: None: automatic; False: ignore torch.distributed even when initialised.
        process_group: the group to reduce over (None: the default group).
        sharded: ``batches`` already yields only this rank's batches (a loader built with rank/world_size).
        status_timeout_s: how long a finished rank waits for the others (distributed only).
        channels_last: run the pass with the model's 4-D (5-D) parameters and inputs in channels_last
            (channels_last_3d) memory format, often faster for convolutions; the original formats are put
            back afterwards. The statistics are the same to float32 rounding.
        amp: run each forward under ``torch.autocast`` (mixed precision). The layer inputs are then computed
            in low precision, but their moments are still taken in float32 / float64 from the exact widened
            values; only the forward's own rounding changes the statistics (measured in BENCHMARKS.md).
        amp_dtype: ``bfloat16`` / ``float16`` (or a torch dtype) for ``amp``; default bfloat16 on CPU,
            float16 elsewhere.

    Returns:
        A :class:`RecalibrationResult` with per-layer before/after statistics.

    Raises:
        NoBatchNormError: the model has no layer with running statistics.
        InputError: the data yields no batches, a batch raises in forward ("batch 3 raised ValueError: ..."),
            or (distributed) another rank failed.
        UsageError: bad options (an ``amp_dtype`` the device cannot autocast to, ``amp_dtype`` without
            ``amp``), or batches whose input cannot be found.
    """
    _check_args(method, max_batches, max_samples)
    if amp_dtype is not None and not amp:
        raise UsageError("--amp-dtype needs --amp")
    autocast = _autocast_target(_resolve_device(model, device), amp_dtype) if amp else None
    modules = find_bn_modules(model)
    if not modules:
        raise NoBatchNormError(
            "the model has no BatchNorm layer with running statistics; nothing to recalibrate"
        )
    start = time.perf_counter()
    ctx = _context(distributed, process_group)
    accs = [_Accumulator(name, m) for name, m in modules]
    state = _PassState(enabled=stop_after_last_bn)
    channel = _channel(ctx, status_timeout_s)
    local_batches, local_max = _local_batches(ctx, batches, sharded, max_batches)
    opts = _Options(
        forward, input_index, input_key, local_max,
        _local_samples(ctx, max_samples), _resolve_device(model, device), progress,
        channel.check_peers if channel is not None else None,
        ctx.rank if ctx is not None else 0, ctx.world_size if ctx is not None else 1,
    )  # fmt: skip
    opts.autocast, opts.channels_last = autocast, channels_last
    saved = _prepare(model, accs, state, channels_last)
    try:
        try:
            with torch.no_grad():
                used, samples = _run_pass(model, local_batches, state, opts)
            local = [acc.sums() for acc in accs]
        except BaseException as exc:
            if channel is not None:
                raise channel.post_failure(exc) from None
            raise
        if channel is not None:
            channel.finish_ok(_signature(accs))
    finally:
        saved.restore()
    if ctx is not None:
        merged, used, total_samples = _reduce(ctx, accs, local, (used, -1 if samples is None else samples))
    else:
        merged, total_samples = local, samples
    if used == 0:
        raise InputError(
            "the calibration data yielded no batches; check --data (and --max-batches/--max-samples)"
        )
    layers = _finalise(accs, merged, method)
    if write:
        _write(accs, layers)
    for layer in layers:
        if not layer.reached:
            log.warning("layer '%s' was never reached by a batch; left unchanged", layer.name)
    world = ctx.world_size if ctx is not None else 1
    return RecalibrationResult(
        method, tuple(layers), used, total_samples, world, write, time.perf_counter() - start
    )


def _context(distributed: bool | None, process_group: Any) -> Any:
    if distributed is False:
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        if distributed:
            raise UsageError("distributed recalibration asked for but torch.distributed is not initialised")
        return None
    from bnaudit.live.distributed import current_context

    return current_context(process_group)


def _channel(ctx: Any, timeout_s: float | None) -> Any:
    if ctx is None:
        return None
    from bnaudit.live.distributed import DEFAULT_STATUS_TIMEOUT_S, RunChannel

    return RunChannel(ctx, timeout_s if timeout_s is not None else DEFAULT_STATUS_TIMEOUT_S)


def _local_batches(
    ctx: Any, batches: Iterable[Any], sharded: bool, max_batches: int | None
) -> tuple[Iterable[Any], int | None]:
    if ctx is None:
        return batches, max_batches
    from bnaudit.live.distributed import local_max_batches, shard_batches

    if sharded:
        return batches, local_max_batches(max_batches, ctx.rank, ctx.world_size)
    return shard_batches(batches, ctx.rank, ctx.world_size, max_batches), None


def _local_samples(ctx: Any, max_samples: int | None) -> int | None:
    if ctx is None or max_samples is None:
        return max_samples
    return -(-max_samples // ctx.world_size)


def _resolve_device(model: nn.Module, device: str | torch.device | None) -> torch.device | None:
    if device is not None:
        return torch.device(device)
    return _model_device(model)


_AMP_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
               "fp16": torch.float16, "half": torch.float16}  # fmt: skip


def _autocast_target(
    device: torch.device | None, amp_dtype: str | torch.dtype | None
) -> tuple[str, torch.dtype]:
    """The (device type, dtype) for ``torch.autocast``, checked here: autocast itself only warns and disables
    itself for an unsupported combination, which would silently run in full precision."""
    kind = device.type if device is not None else "cpu"
    if isinstance(amp_dtype, str):
        if amp_dtype.lower() not in _AMP_DTYPES:
            raise UsageError(f"--amp-dtype must be bfloat16 or float16, got '{amp_dtype}'")
        dtype = _AMP_DTYPES[amp_dtype.lower()]
    elif amp_dtype is None:
        dtype = torch.bfloat16 if kind == "cpu" else torch.float16
    else:
        dtype = amp_dtype
    if dtype not in _LOW_PRECISION:
        raise UsageError(f"--amp-dtype must be bfloat16 or float16, got {dtype}")
    if not torch.amp.is_autocast_available(kind):
        raise UsageError(f"--amp: torch cannot autocast on device type '{kind}'; drop --amp")
    if kind == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise UsageError("--amp-dtype bfloat16: this GPU does not support bfloat16; use --amp-dtype float16")
    return kind, dtype
