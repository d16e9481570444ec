"""``--mode sequential``: each layer's statistics measured on the inputs eval mode feeds it.

Definition: in forward order, layer k's running statistics are the population mean and unbiased variance of
its input over the calibration data when the model runs in eval mode and every earlier layer normalises
with its own new (sequential) statistics. Population mode instead measures layer k in a train-mode forward,
where every earlier layer normalises with its batch's statistics: the "estimation shift" between the two
grows as calibration batches shrink and layers stack up.

How it is computed, without one pass per layer: pass 1 is the population pass. Each further pass runs the
model in eval mode with every layer's statistics from the pass before and measures every layer's input at
once (one forward, early stop after the last BatchNorm as usual). A layer whose input depends only on
layers that were already exact is exact after that pass, so pass p makes at least the first p layers in
forward order exact: at most L passes for L layers (one more confirms). In practice the estimation shift
of an earlier layer moves a later one's input statistics only a little, and the passes converge in a few:
the refinement stops as soon as no statistic moved by more than ``TOLERANCE`` (relative: a mean in its
layer's standard deviations, a variance relative to itself) between two passes; with float32 buffers the
passes reach a fixed point where nothing moves at all.

That is the fallback. When every rank's batches fit in memory together (at most ``resident_batches``),
:mod:`bnaudit.live.lockstep` computes the same statistics exactly in one forward per batch instead.

Cost of the refinement: ``passes`` forward-pass equivalents (each stopping after the last BatchNorm), the
number reported; ``max_passes`` bounds it (a warning says when it stopped before converging). Memory: that
of one population pass, whatever the data size (no activations are cached). Every rank reduces each pass's
exact sufficient statistics (the same all-gather as population mode), so the passes and their stop are
identical on all ranks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from bnaudit.errors import UsageError
from bnaudit.live.accumulate import LayerAccumulator
from bnaudit.live.batches import PassSettings, run_pass
from bnaudit.live.estimators import ESTIMATORS, LayerSums
from bnaudit.live.measure import PassState, prepare_model, set_pass_mode
from bnaudit.live.methods import RecalibrationMethod
from bnaudit.live.run_channel import RunChannel

log = logging.getLogger(__name__)

# Largest relative move of any statistic between two passes below which the refinement stops.
TOLERANCE = 1e-7


@dataclass
class SequentialRun:
    """What each refinement pass needs from :func:`bnaudit.live.recalibrate.recalibrate`.

    Attributes:
        settings: the loop's settings of the first pass (its peer check is replaced per pass).
        reduce: this rank's (sums, (batches, samples or -1)) -> every rank's merged (sums, batches, samples).
        agree: this rank's yes -> True when every rank said yes.
        new_channel: the failure-sharing channel of a new pass (None in one process).
        max_passes: at most this many passes in all, the population pass included (None: layers + 1).
        resident_batches: lockstep when every rank has at least one and at most this many batches.
        stop_after_last_bn, channels_last: as in the options.
    """

    settings: PassSettings
    reduce: Callable[[list[LayerSums], tuple[int, int]], tuple[list[LayerSums], int, int | None]]
    agree: Callable[[bool], bool]
    new_channel: Callable[[], RunChannel | None]
    max_passes: int | None
    resident_batches: int
    stop_after_last_bn: bool
    channels_last: bool


def check_reiterable(batches: Iterable[Any]) -> None:
    """Refuse a one-shot iterator: the refinement passes read the batches again.

    Raises:
        UsageError: ``batches`` is its own iterator (a generator, say).
    """
    if iter(batches) is batches:
        raise UsageError(
            "reads the batches several times, but they are a one-shot iterator",
            where="--mode sequential",
            fix="pass a DataLoader or a list (a --data callable returning either)",
        )


def _estimate(acc: LayerAccumulator, sums: LayerSums) -> tuple[np.ndarray, np.ndarray]:
    # InstanceNorm's running statistics are, by torch's definition, averages over instances.
    method = RecalibrationMethod.BATCH_MEAN if acc.per_instance else RecalibrationMethod.POPULATION
    return ESTIMATORS[method].estimate(sums)


def set_statistics(acc: LayerAccumulator, sums: LayerSums) -> None:
    """The layer normalises with the statistics of ``sums`` from now on (in its buffers' dtype)."""
    if not sums.reached:
        return
    with torch.no_grad():
        for name, values in zip(("running_mean", "running_var"), _estimate(acc, sums), strict=True):
            buf = getattr(acc.module, name)
            buf.copy_(torch.from_numpy(values).to(device=buf.device, dtype=buf.dtype))


def _set_buffers(accs: list[LayerAccumulator], sums: list[LayerSums]) -> None:
    """Each reached layer normalises with its statistics of the last pass."""
    for acc, s in zip(accs, sums, strict=True):
        set_statistics(acc, s)


def largest_move(accs: list[LayerAccumulator], old: list[LayerSums], new: list[LayerSums]) -> float:
    """The largest relative move of a statistic between two passes (inf when a layer's reach changed)."""
    worst = 0.0
    for acc, a, b in zip(accs, old, new, strict=True):
        if a.reached != b.reached:
            return float("inf")
        if not a.reached:
            continue
        (mean_a, var_a), (mean_b, var_b) = _estimate(acc, a), _estimate(acc, b)
        eps = float(getattr(acc.module, "eps", 0.0))
        with np.errstate(divide="ignore", invalid="ignore"):
            moves = np.concatenate(
                [np.abs(mean_b - mean_a) / np.sqrt(var_b + eps), np.abs(var_b - var_a) / (var_b + eps)]
            )
        moves = np.where(np.isnan(moves), 0.0, moves)  # both NaN (a single value): no move to measure
        worst = max(worst, float(np.max(moves, initial=0.0)))
    return worst


def guarded_pass(
    model: nn.Module, batches: Iterable[Any], accs: list[LayerAccumulator], state: PassState,
    settings: PassSettings, channel: RunChannel | None,
) -> tuple[list[LayerSums], int, int | None]:  # fmt: skip
    """One pass under inference mode: (this rank's sums, batches, samples); a failure is shared with the
    other ranks through ``channel``, and success waits for theirs."""
    try:
        with torch.inference_mode():
            used, samples = run_pass(model, batches, state, settings)
        local = [acc.sums() for acc in accs]
    except BaseException as exc:
        if channel is not None:
            raise channel.post_failure(exc) from None
        raise
    if channel is not None:
        channel.finish_ok(";".join(f"{a.name}:{a.channels}" for a in accs))
    return local, used, samples


def _one_pass(
    model: nn.Module,
    batches: Iterable[Any],
    accs: list[LayerAccumulator],
    state: PassState,
    run: SequentialRun,
) -> list[LayerSums]:
    for acc in accs:
        acc.reset()
    channel = run.new_channel()
    settings = replace(run.settings, check_peers=channel.check_peers if channel else None, progress=None)
    local = guarded_pass(model, batches, accs, state, settings, channel)[0]
    return run.reduce(local, (0, 0))[0]


def refine(
    model: nn.Module, batches: Iterable[Any], accs: list[LayerAccumulator], first: list[LayerSums],
    run: SequentialRun,
) -> tuple[list[LayerSums], int, float]:  # fmt: skip
    """Eval-mode passes from the population pass's sums ``first`` until nothing moves.

    Returns:
        (the last pass's merged sums, passes run in all with the population pass, the last pass's largest
        move: inf when only the population pass ran).
    """
    limit = run.max_passes if run.max_passes is not None else len(accs) + 1
    state = PassState(enabled=run.stop_after_last_bn)
    saved = prepare_model(model, accs, state, run.channels_last)
    merged, passes, move = first, 1, float("inf")
    try:
        set_pass_mode(model, accs, state, eval_mode=True)
        while passes < limit and move > TOLERANCE:
            _set_buffers(accs, merged)
            new = _one_pass(model, batches, accs, state, run)
            move, merged, passes = largest_move(accs, merged, new), new, passes + 1
    finally:
        saved.restore()
    if passes > 1 and move > TOLERANCE:
        log.warning(
            "--mode sequential stopped after %d passes (--max-passes) with statistics still moving by %.2g "
            "(relative) between the last two",
            passes,
            move,
        )
    return merged, passes, move
