"""The measuring forward: BatchNorm layers patched or hooked to record their inputs, state put back after."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnaudit.errors import InputError
from bnaudit.live.accumulate import LOW_PRECISION, LayerAccumulator, buffer_of
from bnaudit.live.kernel_rows import CHANNELS_LAST
from bnaudit.live.tap import BatchNormTap, MeasuredCall, fallback_forward

PLAIN_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
# torch's own function, whatever stands in for nn.functional.batch_norm during a pass (tap.BatchNormTap)
TORCH_BATCH_NORM = nn.functional.batch_norm


class StopForward(BaseException):
    """Raised from a hook once the last BatchNorm call of a forward is recorded: the rest is not needed.

    A BaseException so that a model's own ``except Exception`` cannot swallow it.
    """


@dataclass
class PassState:
    """Forward-order bookkeeping for ``stop_after_last_bn``."""

    enabled: bool
    batch_index: int = 0
    stop_at: tuple[int, int] | None = None  # (layer index, call number within a forward)
    first_sequence: list[int] | None = None
    calls_this_batch: dict[int, int] = field(default_factory=dict)
    # an eval-mode pass (``--mode sequential``): layers normalise with their running statistics
    eval_mode: bool = False
    # lockstep (``--mode sequential``): called with the layer index once its input is recorded; returns once
    # the layer's statistics are set (raises StopForward once the forward's work is done)
    arrive: Callable[[int], None] | None = None

    def reached(self, layer_index: int) -> None:
        """A layer's input is recorded: wait for the others (lockstep) or count the call (StopForward)."""
        if self.arrive is not None:
            self.arrive(layer_index)
        elif self.record(layer_index):
            raise StopForward

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
        seen = self.calls_this_batch.get(layer_index, 0) + 1
        self.calls_this_batch[layer_index] = seen
        if self.first_sequence is not None and self.batch_index == 0:
            self.first_sequence.append(layer_index)
        return self.stop_at is not None and self.stop_at == (layer_index, seen)


def _make_hook(acc: LayerAccumulator, index: int, state: PassState) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = args[0] if args else kwargs.get("input")
        if not isinstance(x, torch.Tensor):
            raise InputError("was called without a tensor input", where=f"layer '{acc.name}'")
        acc.add(x)
        state.reached(index)  # a pre-hook: the layer then runs with the statistics set by then

    return hook


def _affine_dtype(x: torch.Tensor, weight: Any) -> torch.dtype:
    # Under autocast x may be half / bfloat16 while the affine parameters stay float32: batch_norm takes
    # that mix (the usual AMP layout); float32 statistics keep the normalisation as exact as it can be.
    if weight is not None:
        return torch.float32 if weight.dtype in LOW_PRECISION else weight.dtype
    return torch.float32 if x.dtype in LOW_PRECISION else x.dtype


def _train_call(acc: LayerAccumulator, index: int, state: PassState) -> MeasuredCall:
    """A train-mode BatchNorm call that records the batch statistics and normalises with them.

    Where BatchNorm's own CPU kernel is exact (:func:`bnaudit.live.kernel_rows.kernel_is_exact`) it computes
    the statistics and normalises in one call, writing them into the layer's table (``kernel_rows``): as
    cheap as ``update_bn``'s forward (a separate ``var_mean`` costs twice the whole BatchNorm there).
    Elsewhere the statistics come from ``moments`` and the input is normalised with them by an
    inference-mode batch_norm. Either way SyncBatchNorm does not sync across ranks (nor refuse CPU tensors):
    every batch is
    normalised by its own statistics, as in a single process.
    """

    def call(x: torch.Tensor, weight: Any, bias: Any, eps: float) -> torch.Tensor:
        n = acc.kernel_values(x, weight, bias)
        if n:
            out = acc.kernel_forward(x, n, weight, bias, eps)
            if out is not None:
                if state.record(index):
                    raise StopForward
                return out
        found = acc.add(x)
        if state.record(index):
            raise StopForward
        if found is None:
            return x.clone()
        mean, var = found
        dtype = _affine_dtype(x, weight)
        return TORCH_BATCH_NORM(x, mean.to(dtype), var.to(dtype), weight, bias, False, 0.0, eps)

    return call


def _eval_call(acc: LayerAccumulator, index: int, state: PassState) -> MeasuredCall:
    """An eval-mode BatchNorm call that records its input's moments and normalises with the layer's running
    statistics (``--mode sequential``: the earlier layers' statistics of the previous pass)."""
    module: Any = acc.module

    def call(x: torch.Tensor, weight: Any, bias: Any, eps: float) -> torch.Tensor:
        acc.add(x)
        state.reached(index)
        mean, var = module.running_mean, module.running_var
        dtype = _affine_dtype(x, weight)
        return TORCH_BATCH_NORM(x, mean.to(dtype), var.to(dtype), weight, bias, False, 0.0, eps)

    return call


def measured_call(acc: LayerAccumulator, index: int, state: PassState) -> MeasuredCall:
    """The layer's measuring call for the pass under way: train mode, or eval mode (``state.eval_mode``)."""
    train, evaluate = _train_call(acc, index, state), _eval_call(acc, index, state)

    def call(x: torch.Tensor, weight: Any, bias: Any, eps: float) -> torch.Tensor:
        return (evaluate if state.eval_mode else train)(x, weight, bias, eps)

    return call


def _module_forward(module: Any, call: MeasuredCall) -> Callable[[torch.Tensor], torch.Tensor]:
    """A plain BatchNorm's forward replaced by ``call`` with the module's own affine parameters."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        return call(x, module.weight, module.bias, module.eps)

    return forward


@dataclass
class SavedState:
    """Everything the pass changes on the model, to put back in ``finally``."""

    training: dict[nn.Module, bool]
    buffers: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    hooks: list[Any] = field(default_factory=list)
    # modules whose forward was replaced, with the instance's own forward attribute if it had one
    patched: list[tuple[nn.Module, Any]] = field(default_factory=list)
    # 4-D / 5-D parameters and buffers moved to channels_last: the format (or the very tensor) to put back
    formats: list[tuple[torch.Tensor, torch.memory_format | torch.Tensor]] = field(default_factory=list)
    tap: BatchNormTap = field(default_factory=BatchNormTap)

    def patch_forward(self, module: nn.Module, forward: Callable[..., Any]) -> None:
        self.patched.append((module, module.__dict__.get("forward")))
        module.forward = forward

    def restore(self) -> None:
        self.tap.remove()
        for handle in self.hooks:
            handle.remove()
        for module, own in reversed(self.patched):
            if own is None:
                del module.forward
            else:
                module.forward = own
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


def _to_channels_last(model: nn.Module, saved: SavedState) -> None:
    """Move the model's 4-D / 5-D parameters and buffers to channels_last, noting how to put each back.

    Done tensor by tensor rather than with ``model.to(memory_format=...)``, which refuses 5-D tensors, and so
    that a tensor already in neither standard format is restored as the very same tensor.
    """
    with torch.no_grad():
        for tensor in itertools.chain(model.parameters(), model.buffers()):
            fmt = CHANNELS_LAST.get(tensor.dim())
            if fmt is None or (tensor.is_contiguous(memory_format=fmt) and not tensor.is_contiguous()):
                continue
            original: torch.memory_format | torch.Tensor = tensor.data
            if tensor.is_contiguous():
                original = torch.contiguous_format
            saved.formats.append((tensor, original))
            tensor.data = tensor.data.contiguous(memory_format=fmt)


def set_pass_mode(model: nn.Module, accs: list[LayerAccumulator], state: PassState, eval_mode: bool) -> None:
    """Every module in eval mode (dropout off); the measured layers in train mode unless ``eval_mode``."""
    state.eval_mode = eval_mode
    model.eval()
    for acc in accs:
        acc.module.train(not eval_mode)


def _measure_input(acc: LayerAccumulator, index: int, state: PassState) -> Callable[[torch.Tensor], None]:
    def measure(x: torch.Tensor) -> None:
        acc.add(x)
        if state.record(index):
            raise StopForward

    return measure


def prepare_model(
    model: nn.Module, accs: list[LayerAccumulator], state: PassState, channels_last: bool
) -> SavedState:
    """Put the model in measuring mode: BatchNorm layers in train mode and recording, the rest in eval.

    Plain BatchNorm layers get a measuring forward; other ``_BatchNorm`` subclasses are measured at their
    ``batch_norm`` call (:mod:`bnaudit.live.tap`); InstanceNorm layers are observed by a pre-hook and run.

    Returns:
        What to put back (call ``restore()`` in ``finally``).
    """
    saved = SavedState({m: m.training for m in model.modules()})
    if channels_last:
        _to_channels_last(model, saved)
    # The layers' own running updates during the pass are discarded: the buffers (num_batches_tracked too)
    # are put back afterwards, then overwritten with the exact statistics when writing.
    for acc in accs:
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            buf = getattr(acc.module, name, None)
            if isinstance(buf, torch.Tensor):
                saved.buffers.append((buf, buf.detach().clone()))
    set_pass_mode(model, accs, state, eval_mode=False)
    for index, acc in enumerate(accs):
        if type(acc.module) in PLAIN_BATCHNORMS:
            saved.patch_forward(acc.module, _module_forward(acc.module, measured_call(acc, index, state)))
        elif isinstance(acc.module, _BatchNorm):
            saved.tap.add(buffer_of(acc.module, "running_mean"), measured_call(acc, index, state))
            measure = _measure_input(acc, index, state)
            saved.patch_forward(acc.module, fallback_forward(acc.module, saved.tap, measure))
        else:  # InstanceNorm: observe the input and let the layer run
            hook = _make_hook(acc, index, state)
            saved.hooks.append(acc.module.register_forward_pre_hook(hook, with_kwargs=True))
    saved.tap.install()
    return saved
