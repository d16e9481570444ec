"""The check every writer of new statistics makes first: all finite, and within the buffer's dtype."""

from __future__ import annotations

import numpy as np

from bnaudit.errors import NonFiniteStatisticsError

NONFINITE_FIX = (
    "nothing was written; look for NaN / Inf in the calibration data or the model's weights (batch-mean: "
    "give each layer calls with more than one value per channel, or use --method population)"
)


def check_finite(
    layer: str, statistic: str, values: np.ndarray, dtype_max: float | None = None, fix: str = NONFINITE_FIX
) -> None:
    """Raise unless every value of ``layer``'s new ``statistic`` is finite (and at most ``dtype_max``).

    Raises:
        NonFiniteStatisticsError: naming the layer, the first bad channel and how many there are.
    """
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    bad = ~np.isfinite(values)
    what = "NaN or Inf"
    if not bad.any() and dtype_max is not None:
        bad = np.abs(values) > dtype_max
        what = f"too large for the buffer's dtype (max {dtype_max:.4g})"
    if not bad.any():
        return
    channel = int(np.argmax(bad))
    raise NonFiniteStatisticsError(
        f"the new {statistic} is {what} in {int(bad.sum())} channel(s), first channel {channel}",
        layer=layer,
        channel=channel,
        found=f"{statistic}[{channel}] = {values[channel]:.6g}",
        fix=fix,
    )
