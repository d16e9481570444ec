"""``drift``: do a checkpoint's stored BatchNorm statistics describe the data? (measured, nothing written)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bnaudit.audit.causes import drift_cause
from bnaudit.audit.measured import DRIFT_COLUMNS, calibration_data, pass_layer_row, unreached_finding
from bnaudit.audit.options import DriftThresholds
from bnaudit.audit.stored_config import stored_training
from bnaudit.bn.archive_policy import checkpoint_findings
from bnaudit.bn.layers import is_ignored
from bnaudit.checkpoint.types import Checkpoint
from bnaudit.live.options import CalibrationSpec, ProgressCallback
from bnaudit.live.passes import StateDictPass, run_passes
from bnaudit.report.model import (
    Finding,
    FindingKind,
    InputInfo,
    Report,
    Severity,
    sort_by_layer_metric,
    sort_findings,
)
from bnaudit.report.sections import Command

if TYPE_CHECKING:
    from bnaudit.live.results import LayerRecalibration
    from bnaudit.report.model import LayerRow


@dataclass(frozen=True)
class DriftResult:
    """What :func:`drift_checkpoint` measured.

    Attributes:
        report: the Report (command ``drift``): one row per layer, a finding per drifting layer.
        passes: one measuring pass per state dict that fits the model (statistics in ``result.layers``).
    """

    report: Report
    passes: tuple[StateDictPass, ...]


def drift_checkpoint(
    path: str | Path,
    spec: CalibrationSpec,
    thresholds: DriftThresholds | None = None,
    *,
    progress: ProgressCallback | None = None,
) -> DriftResult:
    """Measure the population statistics of every BatchNorm layer on ``spec.data`` and compare them with the
    statistics stored in the checkpoint, without changing anything.

    The metric is the one ``compare`` uses, with the data's statistics in place of the pooled ones:
    KL(N(data mean, data var + eps) || N(stored mean, stored var + eps)) per channel, max per layer. Under
    torch.distributed every rank runs it on its share of the batches and gets the same result.

    Args:
        path: the checkpoint (read with the inert reader).
        spec: model, data and pass options (``spec.options.method`` is reported but the population
            statistics are always the ones compared).
        thresholds: the warn / error levels and ignored layers (default: :class:`DriftThresholds`).
        progress: called after each local batch.

    Returns:
        A :class:`DriftResult`.

    Raises:
        ModelMismatchError: no state dict fits the model.
        InputError / UsageError: bad specs, data or batches.
    """
    thresholds = thresholds or DriftThresholds()
    ckpt, passes = run_passes(path, spec, write=False, progress=progress)
    settings = {"method": spec.method, "data": spec.data, "model": spec.model}
    return DriftResult(_drift_report(str(path), ckpt, passes, thresholds, settings), tuple(passes))


def _severity(metrics: dict[str, Any], thresholds: DriftThresholds) -> Severity:
    """Error when the layer's KL is real (``noise_ratio`` times its noise or more) and ``error_kl`` above
    the noise; a warning when real and ``warn_kl`` above; a non-finite KL is a warning of its own."""
    excess, ratio = metrics.get("excess_kl"), metrics.get("noise_ratio")
    if excess is None or not math.isfinite(excess):
        return Severity.WARN
    if ratio is not None and ratio < thresholds.noise_ratio:
        return Severity.OK
    if excess >= thresholds.error_kl:
        return Severity.ERROR
    return Severity.WARN if excess >= thresholds.warn_kl else Severity.OK


def _drift_report(
    display: str,
    ckpt: Checkpoint,
    passes: Sequence[StateDictPass],
    thresholds: DriftThresholds,
    settings: dict[str, Any],
) -> Report:
    warn_kl, error_kl, ignore = thresholds.warn_kl, thresholds.error_kl, thresholds.ignore
    rows: list[LayerRow] = []
    findings: list[Finding] = checkpoint_findings(ckpt, display)
    for p in passes:
        for layer in p.result.layers:
            if is_ignored(layer.name, ignore):
                continue
            if not layer.reached:
                findings.append(unreached_finding(display, p.state_dict.name, layer.name, changed=False))
                rows.append(pass_layer_row(p.state_dict.name, layer, Severity.WARN))
                continue
            metrics = drift_metrics(layer)
            severity = _severity(metrics, thresholds)
            rows.append(pass_layer_row(p.state_dict.name, layer, severity, metrics))
            if severity is not Severity.OK:
                limit = error_kl if severity is Severity.ERROR else warn_kl
                findings.append(_drift_finding(display, p, layer, metrics, (severity, limit)))
    rows.sort(key=lambda r: (-r.severity.rank, -float(r.metrics.get("excess_kl") or 0.0)))
    sort_by_layer_metric(findings, rows, FindingKind.DRIFT, "excess_kl")
    return Report(
        command=Command.DRIFT,
        inputs=(InputInfo(display, ckpt.format, None, tuple(p.state_dict.name for p in passes)),),
        settings={
            "warn_kl": warn_kl,
            "error_kl": error_kl,
            "noise_ratio": thresholds.noise_ratio,
            "ignore": list(ignore),
            **(settings or {}),
        },
        layers=tuple(rows),
        findings=sort_findings([*findings, *_one_batch_note(display, passes)]),
        headline="excess_kl",
        next_step=(
            f"bnaudit recalibrate {display} --model {(settings or {}).get('model', 'SPEC')} --data "
            f"CALIBRATION_DATA -o {_recalibrated_name(display)}"
        ),
        columns=DRIFT_COLUMNS,
        calibration=calibration_data(passes),
        cause=drift_cause(rows, _first_layer(passes), stored_training(ckpt.root)),
    )


def _first_layer(passes: Sequence[StateDictPass]) -> str | None:
    layers = passes[0].result.layers if passes else ()
    return layers[0].name if layers else None


def drift_metrics(layer: LayerRecalibration) -> dict[str, Any]:
    """The layer's measured metrics plus ``noise_ratio``: its mean KL in units of the noise KL (None when
    the noise is unknown: one batch)."""
    metrics: dict[str, Any] = layer.metrics()
    mean, noise = metrics.get("mean_kl"), metrics.get("noise_kl")
    metrics["noise_ratio"] = mean / noise if mean is not None and noise else None
    return metrics


def _one_batch_note(display: str, passes: Sequence[StateDictPass]) -> list[Finding]:
    if not passes or passes[0].result.batches >= 2:
        return []
    return [
        Finding(
            Severity.INFO,
            FindingKind.DRIFT,
            "the data came in one batch, so its own noise could not be measured and every KL counts as "
            "real; give the data in several batches (--batch-size)",
            file=display,
        )
    ]


def _recalibrated_name(display: str) -> str:
    path = Path(display)
    return str(path.with_name(f"{path.stem}.recalibrated{path.suffix}"))


def _drift_finding(
    display: str,
    p: StateDictPass,
    layer: LayerRecalibration,
    metrics: dict[str, Any],
    level: tuple[Severity, float],
) -> Finding:
    severity, limit = level
    samples = int(metrics["samples"] or 0)
    ratio = metrics.get("noise_ratio")
    real = f"{ratio:.1f}x what the data sample's own noise gives" if ratio is not None else "noise unknown"
    message = (
        f"layer '{layer.name}': the stored running statistics do not describe the data (mean KL "
        f"{metrics['mean_kl']:.3g} over {layer.channels} channels, {real}: {metrics['excess_kl']:.3g} above "
        f"the noise >= {limit:g}; worst channel {metrics['worst_channel']}: KL {metrics['max_kl']:.3g}, mean "
        f"off by up to {metrics['max_shift']:.2f} std, std off by up to x{metrics['max_std_ratio']:.2f}; "
        f"{samples} values per channel). Running statistics are an average over the last training batches of "
        "one rank, taken while the weights still moved; recalibrate them on data"
    )
    return Finding(
        severity,
        FindingKind.DRIFT,
        message,
        file=display,
        state_dict=p.state_dict.name,
        layer=layer.name,
        channel=metrics["worst_channel"],
    )
