"""Whether a layer's statistics, and the scale and shift folded from them, survive a cast to a deploy dtype.

A deployed BatchNorm computes ``y = x * scale + shift`` with ``scale = weight / sqrt(running_var + eps)``
and ``shift = bias - running_mean * scale`` (what TensorRT, Core ML and conv folding store), or divides by
``sqrt(running_var + eps)`` in the deploy dtype. Each of these five quantities is computed here in float64
and cast the way ``model.half()`` / ``.to(torch.bfloat16)`` casts a float32 buffer.

The rules (README "Deploy precision"):

- **overflow**: a value finite in float64 becomes infinite (fp16: ``|x| > 65504``).
- **underflow**: a value below the dtype's smallest normal loses more than :data:`RELATIVE_BOUND` (1%) of
  itself (``running_var``, ``var + eps``, ``scale``: multiplicative, so relative to their own value; a
  value flushed to zero loses all of it) or, for the additive ``running_mean`` and ``shift``, more than
  that bound of the layer's own scale (``sqrt(var + eps)``, resp. ``|weight|``): a mean of 1e-5 is
  subnormal in fp16, but its rounding error is nothing next to the spread it is subtracted from.
  Values in the normal range always round within the dtype's unit roundoff and are never reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bnaudit.bn.deploy_dtype import DeployDtype
from bnaudit.bn.layerstats import LayerStats
from bnaudit.bn.stats import segment_sums


@dataclass(frozen=True)
class DtypeLimits:
    """The range of a floating dtype: largest finite, smallest normal, unit roundoff."""

    name: str
    max_finite: float
    min_normal: float
    unit_roundoff: float


LIMITS = {
    DeployDtype.FP16: DtypeLimits("float16", 65504.0, 2.0**-14, 2.0**-11),
    DeployDtype.BF16: DtypeLimits("bfloat16", 3.3895313892515355e38, 2.0**-126, 2.0**-8),
    DeployDtype.FP32: DtypeLimits("float32", 3.4028234663852886e38, 2.0**-126, 2.0**-24),
}
# The most a deployed value may lose: 1%. It is above the unit roundoff of every deploy dtype (bf16's is
# 0.4%), so a value in the normal range never exceeds it; a subnormal does once it is ~100 times the
# dtype's smallest subnormal or less (fp16: below ~3e-6). A variance 1% off moves the output by 0.5%.
RELATIVE_BOUND = 1e-2


def cast(values: np.ndarray, dtype: DeployDtype) -> np.ndarray:
    """``values`` (float64) after float64 -> float32 -> ``dtype`` with round-to-nearest-even, as float64."""
    with np.errstate(over="ignore", invalid="ignore"):
        f32 = np.asarray(values, dtype=np.float64).astype(np.float32)
        if dtype is DeployDtype.FP16:
            return f32.astype(np.float16).astype(np.float64)
        if dtype is DeployDtype.FP32:
            return f32.astype(np.float64)
        # bfloat16 is the top half of a float32, rounded to nearest even on the dropped 16 bits.
        bits = f32.view(np.uint32).astype(np.uint64)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        out = rounded.astype(np.uint32).view(np.float32).astype(np.float64)
    out[~np.isfinite(f32)] = f32[~np.isfinite(f32)]
    return out


@dataclass(frozen=True)
class CastProblem:
    """The worst channel of one quantity that does not survive the cast."""

    quantity: str
    overflow: bool
    count: int
    channel: int
    value: float
    cast_value: float


def _affine(stats: LayerStats) -> tuple[np.ndarray, np.ndarray]:
    """The layer's weight and bias, as a layer without them computes (1 and 0)."""
    weight = stats.weight if stats.weight is not None else np.ones_like(stats.mean)
    bias = stats.bias if stats.bias is not None else np.zeros_like(stats.mean)
    return weight, bias


def _quantities(
    mean: np.ndarray, var: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float
) -> list[tuple[str, np.ndarray, np.ndarray | None]]:
    """(name, values, reference scale or None for relative) of the five quantities a deployment stores."""
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        std = np.sqrt(var + eps)
        scale = weight / std
        shift = bias - mean * scale
    return [
        ("running_mean", mean, std),
        ("running_var", var, None),
        ("running_var + eps", var + eps, None),
        ("folded scale weight/sqrt(var+eps)", scale, None),
        ("folded shift bias - mean*scale", shift, np.abs(weight)),
    ]


def _out_of_range(values: np.ndarray, reference: np.ndarray | None, limits: DtypeLimits) -> np.ndarray:
    """Values outside the dtype's normal range that may lose more than the bound: a superset of those
    :func:`_problem` reports. A subnormal is off by at most half its spacing, ``min_normal * unit_roundoff``,
    so an additive value whose reference scale is above that / bound cannot lose too much."""
    with np.errstate(invalid="ignore"):
        magnitude = np.abs(values)
        low = (magnitude < limits.min_normal) & (values != 0)
        if reference is not None:
            low &= reference * RELATIVE_BOUND < limits.min_normal * limits.unit_roundoff
        flags: np.ndarray = (magnitude > limits.max_finite) | low
    return flags


def layers_to_check(stats: Sequence[LayerStats], eps: float, dtype: DeployDtype) -> list[int]:
    """The layers for which :func:`cast_problems` may find something; for the others it returns [].

    One vectorised pass over every layer's channels: nearly every layer has all its values in the normal
    range, and checking them one by one costs a few dozen NumPy calls per layer.
    """
    if not stats:
        return []
    affine = [_affine(s) for s in stats]
    mean, var = np.concatenate([s.mean for s in stats]), np.concatenate([s.var for s in stats])
    weight, bias = np.concatenate([w for w, _ in affine]), np.concatenate([b for _, b in affine])
    flags = np.zeros(mean.shape, dtype=bool)
    for _, values, reference in _quantities(mean, var, weight, bias, eps):
        flags |= _out_of_range(values, reference, LIMITS[dtype])
    counts = segment_sums(flags, [s.channels for s in stats])
    return [i for i in range(len(stats)) if counts[i]]


def _problem(
    name: str, values: np.ndarray, reference: np.ndarray | None, dtype: DeployDtype
) -> CastProblem | None:
    limits, bound = LIMITS[dtype], RELATIVE_BOUND
    if not _out_of_range(values, reference, limits).any():
        return None
    casted = cast(values, dtype)
    finite = np.isfinite(values)
    over = finite & ~np.isfinite(casted)
    with np.errstate(invalid="ignore", divide="ignore"):
        error = np.abs(casted - values)
        base = np.abs(values) if reference is None else reference
        lost = finite & ~over & (np.abs(values) < limits.min_normal) & (values != 0) & (error > bound * base)
    flags = over if over.any() else lost
    if not flags.any():
        return None
    # The worst channel: the largest value for an overflow, the smallest for an underflow.
    magnitude = np.where(flags, np.abs(values), np.nan)
    channel = int(np.nanargmax(magnitude) if over.any() else np.nanargmin(magnitude))
    return CastProblem(
        name, bool(over.any()), int(flags.sum()), channel, float(values[channel]), float(casted[channel])
    )


def cast_problems(stats: LayerStats, eps: float, dtype: DeployDtype) -> list[CastProblem]:
    """Each of the layer's five deployed quantities that overflows or underflows in ``dtype``.

    Non-finite and negative statistics are left to the health checks (they are wrong in any dtype).
    ``var + eps`` is not reported again when ``running_var`` itself has the same problem.
    """
    out: list[CastProblem] = []
    for name, values, reference in _quantities(stats.mean, stats.var, *_affine(stats), eps):
        problem = _problem(name, values, reference, dtype)
        repeated = any(
            p.overflow == getattr(problem, "overflow", None) for p in out if p.quantity == "running_var"
        )
        if problem is not None and not (name == "running_var + eps" and repeated):
            out.append(problem)
    return out
