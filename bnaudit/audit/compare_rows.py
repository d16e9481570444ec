"""``compare``'s layer rows: each layer's divergence from the pooled statistics, its finding and channels."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bnaudit.audit.layer_rows import no_layer_named
from bnaudit.audit.rank_reader import ScanLayer
from bnaudit.bn.stats import Divergence
from bnaudit.checkpoint.rank_files import RankFile
from bnaudit.report.model import (
    Finding,
    FindingKind,
    FiniteFloats,
    LayerRow,
    Severity,
    sort_by_layer_metric,
)
from bnaudit.report.sections import Column

# The layer table's columns after name and status.
COMPARE_COLUMNS = tuple(
    Column(title, metric, attribute=attribute)
    for title, metric, attribute in (
        ("max KL", "max_kl", None),
        ("max shift (std)", "max_shift", None),
        ("max var ratio", "max_var_ratio", None),
        ("worst rank", None, "worst_rank"),
        ("channel", None, "worst_channel"),
    )
)


@dataclass(frozen=True)
class DivergenceRows:
    """The layer rows (worst first), the divergence findings (worst layer first), ``--layer``'s channels."""

    rows: tuple[LayerRow, ...]
    findings: tuple[Finding, ...]
    channel_rows: tuple[dict[str, Any], ...]


@dataclass(frozen=True)
class _Thresholds:
    warn_kl: float
    error_kl: float

    def severity(self, value: float) -> Severity:
        if value >= self.error_kl:
            return Severity.ERROR
        if value >= self.warn_kl:
            return Severity.WARN
        return Severity.OK


def divergence_rows(
    layers: Sequence[ScanLayer],
    divergences: Sequence[Divergence],
    pooled: tuple[np.ndarray, np.ndarray],
    files: Sequence[RankFile],
    thresholds: tuple[float, float],
    layer: str | None,
) -> DivergenceRows:
    """One row per layer from the second pass, a finding per layer at or above ``warn_kl``.

    Args:
        layers, divergences: the plan's layers and the second pass's result, in plan order.
        pooled: the equal-weight pooled (mean, var), every layer's channels concatenated.
        files: the ranks (a divergence's rank index is a position in it).
        thresholds: (warn_kl, error_kl).
        layer: the layer whose channels go to ``channel_rows``, or None.

    Raises:
        InputError: ``layer`` names no layer.
    """
    limits = _Thresholds(*thresholds)
    rows: list[LayerRow] = []
    findings: list[Finding] = []
    channel_rows: list[dict[str, Any]] = []
    for depth, (lp, div) in enumerate(zip(layers, divergences, strict=True)):
        mean, var = pooled[0][lp.part], pooled[1][lp.part]
        row = _row(lp, div, depth, mean, var, files, limits)
        rows.append(row)
        if row.severity is not Severity.OK:
            findings.append(_divergence_finding(lp, row, len(files), files[0].display, limits))
        if layer is not None and lp.name == layer and not channel_rows:
            channel_rows = _channels(lp, div, mean, var, files)
    if layer is not None and not channel_rows:
        raise no_layer_named(layer, files[0].display, rows)
    rows.sort(key=lambda r: (-r.severity.rank, -(r.metrics.get("max_kl") or 0.0)))
    sort_by_layer_metric(findings, rows, FindingKind.DIVERGENCE)
    return DivergenceRows(tuple(rows), tuple(findings), tuple(channel_rows))


def _row(
    lp: ScanLayer,
    div: Divergence,
    depth: int,
    mean: np.ndarray,
    var: np.ndarray,
    files: Sequence[RankFile],
    limits: _Thresholds,
) -> LayerRow:
    channel = int(np.argmax(div.kl)) if lp.channels else 0
    max_kl = float(div.kl[channel]) if lp.channels else 0.0
    metrics: dict[str, float | int | None] = {
        "max_kl": max_kl,
        "max_shift": float(div.shift.max()) if lp.channels else 0.0,
        "max_var_ratio": float(div.var_ratio.max()) if lp.channels else 1.0,
        "channels_over_warn": int((div.kl >= limits.warn_kl).sum()),
        "layer_index": depth,
    }
    return LayerRow(
        lp.name,
        lp.state_dict,
        limits.severity(max_kl),
        lp.channels,
        metrics,
        files[int(div.kl_rank[channel])].rank if lp.channels else None,
        channel,
        # per_rank_*: one value per input, in the order of Report.inputs (for --plot).
        arrays={
            "pooled_mean": _channel_values(mean),
            "pooled_var": _channel_values(var),
            "per_rank_max_kl": list(div.per_rank_max_kl),
            "per_rank_max_shift": list(div.per_rank_max_shift),
        },
    )


def _channel_values(values: np.ndarray) -> list[float]:
    # One NumPy check here saves the JSON writer a Python-level check of every value.
    return FiniteFloats(values.tolist()) if np.isfinite(values).all() else values.tolist()


def _divergence_finding(lp: ScanLayer, row: LayerRow, ranks: int, file: str, limits: _Thresholds) -> Finding:
    limit = limits.error_kl if row.severity is Severity.ERROR else limits.warn_kl
    metrics = row.metrics
    message = (
        f"layer '{lp.name or '<root>'}': rank {row.worst_rank} channel {row.worst_channel} diverges from the "
        f"pooled statistics of {ranks} ranks (KL {metrics['max_kl']:.3g} >= {limit:g}; mean shift up to "
        f"{metrics['max_shift']:.2f} std, variance ratio up to {metrics['max_var_ratio']:.2f})"
    )
    return Finding(
        row.severity,
        FindingKind.DIVERGENCE,
        message,
        file=file,
        state_dict=lp.state_dict,
        layer=lp.name,
        rank=row.worst_rank,
        channel=row.worst_channel,
    )


def _channels(
    lp: ScanLayer, div: Divergence, mean: np.ndarray, var: np.ndarray, files: Sequence[RankFile]
) -> list[dict[str, Any]]:
    return [
        {
            "channel": c,
            "pooled_mean": float(mean[c]),
            "pooled_var": float(var[c]),
            "max_kl": float(div.kl[c]),
            "worst_rank": files[int(div.kl_rank[c])].rank,
            "max_shift": float(div.shift[c]),
            "max_var_ratio": float(div.var_ratio[c]),
        }
        for c in range(lp.channels)
    ]
