"""Exact population statistics of each BatchNorm layer's input on calibration data (one or many processes)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from bnaudit.errors import InputError, NoBatchNormError, UsageError
from bnaudit.live.accumulate import LayerAccumulator
from bnaudit.live.batches import PassSettings, autocast_target, resolve_device
from bnaudit.live.distributed import (
    DistContext,
    all_gather_array,
    current_context,
    local_max_batches,
    shard_batches,
)
from bnaudit.live.estimators import ESTIMATORS, LayerSums
from bnaudit.live.finite import check_finite
from bnaudit.live.lockstep import measure_lockstep
from bnaudit.live.measure import PassState, prepare_model
from bnaudit.live.methods import RecalibrationMode
from bnaudit.live.options import ProgressCallback, RecalibrationOptions
from bnaudit.live.results import LayerRecalibration, RecalibrationResult, finalise
from bnaudit.live.run_channel import DEFAULT_STATUS_TIMEOUT_S, RunChannel
from bnaudit.live.sequential import SequentialRun, check_reiterable, guarded_pass, refine

log = logging.getLogger(__name__)


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


def recalibrate(
    model: nn.Module,
    batches: Iterable[Any],
    options: RecalibrationOptions | None = None,
    *,
    progress: ProgressCallback | None = None,
    process_group: Any = None,
) -> RecalibrationResult:
    """Re-estimate the running statistics of every BatchNorm layer of ``model`` on ``batches``.

    Each layer that keeps running statistics (BatchNorm1d/2d/3d, SyncBatchNorm, tracking InstanceNorm) has
    its input measured over every element of every call, with BatchNorm normalising by batch statistics and
    every other module in eval mode, under ``torch.no_grad()``; the chosen method's estimate is written
    (:mod:`bnaudit.live.estimators`). A layer no batch reached is reported and left unchanged. The model's
    flags, buffers and memory formats are put back even when a batch raises. Under ``torch.distributed``
    rank r takes global batches r, r + N, ... (see :class:`RecalibrationOptions`), the statistics are merged
    in rank order, every rank gets the same result, and a failure on one rank is raised on all of them.

    Args:
        model: the model, already on its device; its buffers are overwritten in place when ``options.write``.
        batches: tensors, tuples/lists, dicts, or anything ``options.forward`` understands.
        options: how to run the pass (default: population statistics of every batch).
        progress: called as ``progress(batches_done, total_or_None)`` after each local batch.
        process_group: the group to reduce over (None: the default group).

    Returns:
        A :class:`RecalibrationResult` with per-layer before/after statistics.

    Raises:
        NoBatchNormError: the model has no layer with running statistics.
        InputError: no batches, a batch raised ("batch 3 raised ValueError: ..."), or another rank failed.
        UsageError: an ``amp_dtype`` the device cannot autocast to, or batches whose input cannot be found.
        NonFiniteStatisticsError: ``options.write`` and a layer's new statistics are NaN / Inf (e.g. data
            with NaN); no buffer was written.
    """
    options = options or RecalibrationOptions()
    device = resolve_device(model, options.device)
    autocast = autocast_target(device, options.amp_dtype) if options.amp else None
    modules = find_bn_modules(model)
    if not modules:
        raise NoBatchNormError(
            "the model has no BatchNorm layer with running statistics", fix="nothing to recalibrate"
        )
    start = time.perf_counter()
    ctx = _context(options.distributed, process_group)
    accs = [LayerAccumulator(name, m) for name, m in modules]
    local_batches, settings, channel = _local_plan(ctx, batches, options, progress, (device, autocast))
    if options.chosen_mode is RecalibrationMode.SEQUENTIAL:
        check_reiterable(batches)
    run = _sequential_run(ctx, accs, settings, options)
    merged, used, samples, passes, move = _statistics(model, local_batches, accs, run, (options, channel))
    layers = finalise(accs, merged, ESTIMATORS[options.chosen_method])
    _apply(accs, layers, options.write)
    world, method = ctx.world_size if ctx is not None else 1, options.chosen_method.value
    seconds = time.perf_counter() - start
    return RecalibrationResult(
        method, tuple(layers), used, samples, world, options.write, seconds,
        mode=options.chosen_mode.value, passes=passes, last_move=move,
    )  # fmt: skip


def _statistics(
    model: nn.Module,
    batches: Iterable[Any],
    accs: list[LayerAccumulator],
    run: SequentialRun,
    first: tuple[RecalibrationOptions, RunChannel | None],
) -> tuple[list[LayerSums], int, int | None, int, float | None]:
    """Every rank's merged sums, batches, samples, passes and the last pass's move (sequential only)."""
    sequential = first[0].chosen_mode is RecalibrationMode.SEQUENTIAL
    in_one = measure_lockstep(model, batches, accs, run) if sequential else None
    if in_one is not None:
        merged, used, samples = in_one
    else:
        merged, used, samples = _measure(model, batches, accs, run.settings, first)
        merged, used, samples = run.reduce(merged, (used, -1 if samples is None else samples))
    if used == 0:
        raise InputError(
            "the calibration data yielded no batches", fix="check --data (and --max-batches/--max-samples)"
        )
    if not sequential or in_one is not None:
        return merged, used, samples, 1, (0.0 if in_one is not None else None)
    merged, passes, move = refine(model, batches, accs, merged, run)
    return merged, used, samples, passes, move


def _sequential_run(
    ctx: DistContext | None,
    accs: list[LayerAccumulator],
    settings: PassSettings,
    options: RecalibrationOptions,
) -> SequentialRun:
    """The refinement passes' settings: each pass reduced over the ranks, with its own failure channel."""
    timeout = DEFAULT_STATUS_TIMEOUT_S if options.status_timeout_s is None else options.status_timeout_s

    def reduce(local: list[LayerSums], counts: tuple[int, int]) -> tuple[list[LayerSums], int, int | None]:
        if ctx is None:
            return local, counts[0], None if counts[1] < 0 else counts[1]
        return _reduce(ctx, accs, local, counts)

    def agree(yes: bool) -> bool:
        if ctx is None:
            return yes
        return all(bool(row[0]) for row in all_gather_array(ctx, np.array([1.0 if yes else 0.0])))

    def new_channel() -> RunChannel | None:
        return None if ctx is None else RunChannel(ctx, timeout)

    return SequentialRun(
        settings, reduce, agree, new_channel, options.max_passes, options.resident_batches,
        options.stop_after_last_bn, options.channels_last,
    )  # fmt: skip


def _measure(
    model: nn.Module,
    batches: Iterable[Any],
    accs: list[LayerAccumulator],
    settings: PassSettings,
    run: tuple[RecalibrationOptions, RunChannel | None],
) -> tuple[list[LayerSums], int, int | None]:
    """This rank's pass: (sums per layer, batches used, samples used); the model is put back in any case."""
    options, channel = run
    state = PassState(enabled=options.stop_after_last_bn)
    saved = prepare_model(model, accs, state, options.channels_last)
    try:
        return guarded_pass(model, batches, accs, state, settings, channel)
    finally:
        saved.restore()


def _local_plan(
    ctx: DistContext | None,
    batches: Iterable[Any],
    options: RecalibrationOptions,
    progress: ProgressCallback | None,
    target: tuple[torch.device | None, tuple[str, torch.dtype] | None],
) -> tuple[Iterable[Any], PassSettings, RunChannel | None]:
    """This rank's batches, the loop's settings (limits per rank, batch numbering) and its status channel."""
    local_batches, max_batches = batches, options.max_batches
    max_samples = options.max_samples
    channel = None
    if ctx is not None:
        if options.sharded:
            max_batches = local_max_batches(options.max_batches, ctx.rank, ctx.world_size)
        else:
            local_batches = shard_batches(batches, ctx.rank, ctx.world_size, options.max_batches)
            max_batches = None
        if max_samples is not None:
            max_samples = -(-max_samples // ctx.world_size)
        timeout = options.status_timeout_s
        channel = RunChannel(ctx, DEFAULT_STATUS_TIMEOUT_S if timeout is None else timeout)
    settings = PassSettings(
        options.forward, options.input_index, options.input_key, max_batches, max_samples, target[0],
        progress, channel.check_peers if channel is not None else None,
        ctx.rank if ctx is not None else 0, ctx.world_size if ctx is not None else 1,
        autocast=target[1], channels_last=options.channels_last,
    )  # fmt: skip
    return local_batches, settings, channel


def _apply(accs: list[LayerAccumulator], layers: list[LayerRecalibration], write: bool) -> None:
    """Write the reached layers' new statistics (``write``); warn about the layers no batch reached."""
    if write:
        _write(accs, layers)
    for layer in layers:
        if not layer.reached:
            log.warning("layer '%s' was never reached by a batch; left unchanged", layer.name)


def _write(accs: list[LayerAccumulator], layers: list[LayerRecalibration]) -> None:
    """Overwrite the reached layers' buffers once every new value is known to be finite (else none)."""
    staged = []
    for acc, layer in zip(accs, layers, strict=True):
        if not layer.reached:
            continue
        for name, values in (("running_mean", layer.after_mean), ("running_var", layer.after_var)):
            buf = getattr(acc.module, name)
            dtype_max = float(torch.finfo(buf.dtype).max) if buf.dtype.is_floating_point else None
            check_finite(layer.name, name, values, dtype_max)
            staged.append((buf, values))
    with torch.no_grad():
        for buf, values in staged:
            buf.copy_(torch.from_numpy(values).to(device=buf.device, dtype=buf.dtype))


def _reduce(
    ctx: DistContext, accs: list[LayerAccumulator], local: list[LayerSums], counts: tuple[int, int]
) -> tuple[list[LayerSums], int, int | None]:
    """Gather every rank's sufficient statistics and merge them in rank order (exact, order-independent)."""
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


def _context(distributed: bool | None, process_group: Any) -> DistContext | None:
    if distributed is False:
        return None
    if not (dist.is_available() and dist.is_initialized()):
        if distributed:
            raise UsageError(
                "distributed recalibration asked for but torch.distributed is not initialised",
                fix="call torch.distributed.init_process_group first",
            )
        return None
    return current_context(process_group)
