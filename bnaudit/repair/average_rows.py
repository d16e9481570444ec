"""``average``'s layer rows: how far the ranks were apart, how far the merge moves the reference."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from bnaudit.audit.layer_rows import finite_max
from bnaudit.audit.scan import MeasureResult, PoolResult
from bnaudit.bn.layerstats import LayerStats, read_layers
from bnaudit.bn.stats import Divergence, MergeMethod, kl_normal
from bnaudit.checkpoint.rank_files import RankFile
from bnaudit.checkpoint.writer import TensorPatch
from bnaudit.repair.average_plan import AveragePlan, TargetLayer
from bnaudit.report.model import Finding, FindingKind, LayerRow, Severity
from bnaudit.report.sections import Column

# The layer table's columns: compare's numbers for the ranks, then what the write changes.
AVERAGE_COLUMNS = (
    Column("worst rank", attribute="worst_rank"),
    Column("KL before", "max_kl_before"),
    Column("shift before (std)", "max_shift_before"),
    Column("reference KL", "reference_kl"),
    Column("mean move (std)", "mean_move_std"),
    Column("var change (x)", "var_change_ratio"),
)


def merged_layers(
    plan: AveragePlan, pooled: PoolResult, method: MergeMethod
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each planned layer's merged (mean, var) with the rank weights, in plan order."""
    mean, var = pooled.weighted.mean, pooled.weighted.var(method)
    return [(mean[layer.part], var[layer.part]) for layer in plan.scan.layers]


def layer_rows(
    plan: AveragePlan,
    merged: Sequence[tuple[np.ndarray, np.ndarray]],
    measured: MeasureResult,
    old: Sequence[LayerStats] | None,
) -> tuple[list[LayerRow], list[Finding]]:
    """One row per layer (plan order) and an error for each layer whose merged statistics are unusable.

    Args:
        old: the reference's statistics of the planned layers when already read (the reference is the
            first rank), else None: they are read here.
    """
    reference_display = plan.reference_display
    if old is None:
        old = read_layers([(t.state_dict, t.layer) for t in plan.targets], reference_display)
    rows, findings = [], []
    files, eps = plan.scan.files, plan.scan.eps
    for target, (mean, var), before, div in zip(plan.targets, merged, old, measured.layers, strict=True):
        severity = Severity.OK
        bad = ~np.isfinite(mean) | ~np.isfinite(var) | (var < 0)
        if bad.any():
            severity = Severity.ERROR
            findings.append(_unusable(target, mean, var, int(np.argmax(bad)), reference_display))
        rows.append(_row(target, severity, _metrics(mean, var, before, div, eps), div, files))
    return rows, findings


def _metrics(
    mean: np.ndarray, var: np.ndarray, old: LayerStats, div: Divergence, eps: float
) -> dict[str, float | int | None]:
    with np.errstate(divide="ignore", invalid="ignore"):
        move = np.abs(mean - old.mean) / np.sqrt(old.var + eps)
        ratio = np.maximum((var + eps) / (old.var + eps), (old.var + eps) / (var + eps))
        ref_kl = kl_normal(mean, var + eps, old.mean, old.var + eps)
    channels = len(mean)
    channel = int(np.argmax(div.kl)) if channels else 0
    return {
        "max_kl_before": float(div.kl[channel]) if channels else 0.0,
        "max_shift_before": float(div.shift.max()) if channels else 0.0,
        "max_var_ratio_before": float(div.var_ratio.max()) if channels else 1.0,
        "reference_kl": finite_max(ref_kl),
        "mean_move_std": finite_max(move),
        "var_change_ratio": finite_max(ratio),
    }


def _row(
    target: TargetLayer,
    severity: Severity,
    metrics: dict[str, float | int | None],
    div: Divergence,
    files: Sequence[RankFile],
) -> LayerRow:
    channels = len(div.kl)
    channel = int(np.argmax(div.kl)) if channels else 0
    worst = files[int(div.kl_rank[channel])].rank if channels else None
    return LayerRow(target.layer.name, target.state_dict.name, severity, channels, metrics, worst, channel)


def _unusable(target: TargetLayer, mean: np.ndarray, var: np.ndarray, ch: int, reference: str) -> Finding:
    return Finding(
        Severity.ERROR,
        FindingKind.NONFINITE,
        f"layer '{target.layer.display_name}': the merged statistics of channel {ch} are not usable "
        f"(mean {mean[ch]:.3g}, var {var[ch]:.3g}); nothing is written — fix the inputs or recalibrate "
        "with `bnaudit recalibrate`",
        file=reference,
        state_dict=target.state_dict.name,
        layer=target.layer.name,
        channel=ch,
    )


def patches(plan: AveragePlan, merged: Sequence[tuple[np.ndarray, np.ndarray]]) -> list[TensorPatch]:
    """The new running_mean and running_var of every planned layer, in the reference's shapes."""
    out = []
    for target, (mean, var) in zip(plan.targets, merged, strict=True):
        sd, layer = target.state_dict, target.layer
        for key, values in ((layer.running_mean, mean), (layer.running_var, var)):
            ref = sd.tensors[key]
            out.append(TensorPatch(sd.name, key, ref, values.reshape(ref.shape)))
    return out


def layer_record(row: LayerRow, target: TargetLayer) -> dict[str, Any]:
    """A layer's entry in the provenance sidecar."""
    return {
        "state_dict": row.state_dict,
        "layer": row.name,
        "keys": [target.layer.running_mean, target.layer.running_var],
        "channels": row.channels,
        "worst_rank_before": row.worst_rank,
        **row.metrics,
    }


def refusal(findings: Sequence[Finding], allow_unsafe_input: bool) -> str | None:
    """Why nothing may be written: the first error finding (unsafe pickles only without the override)."""
    for f in findings:
        if f.severity is not Severity.ERROR:
            continue
        if f.kind is FindingKind.UNSAFE_PICKLE:
            if allow_unsafe_input:
                continue
            return (
                f"{f.file}: its pickle references '{f.tensor}', which the output would carry too; nothing "
                "was written (pass --allow-unsafe-input to repair it anyway)"
            )
        return f"{f.file}: {f.kind.value}: {f.message}; nothing was written"
    return None
