"""``compare``'s layer rows: each layer's divergence from the pooled statistics, its finding and channels."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bnaudit.audit.layer_rows import no_layer_named
from bnaudit.audit.rank_reader import ScanLayer
from bnaudit.bn.layer_kind import InputKind
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
        ("mean KL", "mean_kl", None),
        ("input", None, "input"),
        ("worst rank", None, "worst_rank"),
        ("max KL", "max_kl", None),
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
class GateLevels:
    """``compare``'s gate: levels on a layer's mean KL, multiplied by ``flat_factor`` for flat layers."""

    warn_kl: float
    error_kl: float
    flat_factor: float

    def scale(self, kind: InputKind) -> float:
        """What the levels are multiplied by for a layer of this input kind (README "Thresholds")."""
        return self.flat_factor if kind is InputKind.FLAT else 1.0

    def severity(self, value: float, kind: InputKind) -> Severity:
        scale = self.scale(kind)
        if value >= self.error_kl * scale:
            return Severity.ERROR
        if value >= self.warn_kl * scale:
            return Severity.WARN
        return Severity.OK


def divergence_rows(
    layers: Sequence[ScanLayer],
    divergences: Sequence[Divergence],
    pooled: tuple[np.ndarray, np.ndarray],
    files: Sequence[RankFile],
    limits: GateLevels,
    layer: str | None,
) -> DivergenceRows:
    """One row per layer from the second pass, a finding per layer at or above ``warn_kl``.

    Args:
        layers, divergences: the plan's layers and the second pass's result, in plan order.
        pooled: the equal-weight pooled (mean, var), every layer's channels concatenated.
        files: the ranks (a divergence's rank index is a position in it).
        limits: the gate's levels.
        layer: the layer whose channels go to ``channel_rows``, or None.

    Raises:
        InputError: ``layer`` names no layer.
    """
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
    rows.sort(key=lambda r: (-r.severity.rank, -(r.metrics.get("gate_kl") or 0.0)))
    sort_by_layer_metric(findings, rows, FindingKind.DIVERGENCE, "gate_kl")
    return DivergenceRows(tuple(rows), tuple(findings), tuple(channel_rows))


def _row(
    lp: ScanLayer,
    div: Divergence,
    depth: int,
    mean: np.ndarray,
    var: np.ndarray,
    files: Sequence[RankFile],
    limits: GateLevels,
) -> LayerRow:
    channel = int(np.argmax(div.kl)) if lp.channels else 0
    mean_kl = div.mean_kl if lp.channels else 0.0
    metrics: dict[str, float | int | None] = {
        "mean_kl": mean_kl,
        "threshold_scale": limits.scale(lp.kind),
        "gate_kl": mean_kl / limits.scale(lp.kind),
        "max_kl": float(div.kl[channel]) if lp.channels else 0.0,
        "max_shift": float(div.shift.max()) if lp.channels else 0.0,
        "max_var_ratio": float(div.var_ratio.max()) if lp.channels else 1.0,
        "layer_index": depth,
    }
    return LayerRow(
        lp.name,
        lp.state_dict,
        limits.severity(mean_kl, lp.kind),
        lp.channels,
        metrics,
        files[div.mean_kl_rank].rank if lp.channels else None,
        channel,
        # per_rank_*: one value per input, in the order of Report.inputs (for --plot).
        arrays={
            "pooled_mean": _channel_values(mean),
            "pooled_var": _channel_values(var),
            "per_rank_max_kl": list(div.per_rank_max_kl),
            "per_rank_max_shift": list(div.per_rank_max_shift),
            "per_rank_mean_kl": list(div.per_rank_mean_kl),
        },
        input=lp.kind.value,
    )


def _channel_values(values: np.ndarray) -> list[float]:
    # One NumPy check here saves the JSON writer a Python-level check of every value.
    return FiniteFloats(values.tolist()) if np.isfinite(values).all() else values.tolist()


def _divergence_finding(lp: ScanLayer, row: LayerRow, ranks: int, file: str, limits: GateLevels) -> Finding:
    scale = limits.scale(lp.kind)
    limit = (limits.error_kl if row.severity is Severity.ERROR else limits.warn_kl) * scale
    level = f"{limit:.3g}" + (f", {scale:g}x the level of spatial layers: a flat input" if scale != 1 else "")
    metrics = row.metrics
    message = (
        f"layer '{lp.name or '<root>'}': rank {row.worst_rank} diverges from the pooled statistics of "
        f"{ranks} "
        f"ranks (mean KL {metrics['mean_kl']:.3g} over {lp.channels} channels >= {level}; worst channel "
        f"{row.worst_channel}: KL {metrics['max_kl']:.3g}, mean shift up to {metrics['max_shift']:.2f} std, "
        f"variance ratio up to {metrics['max_var_ratio']:.2f})"
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
