"""Report pieces shared by ``drift`` and ``recalibrate``: a measured layer's row, the unreached warning."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from bnaudit.errors import NonFiniteStatisticsError
from bnaudit.report.model import Finding, FindingKind, LayerRow, Severity
from bnaudit.report.sections import CalibrationData, Column

if TYPE_CHECKING:
    from bnaudit.live.passes import StateDictPass
    from bnaudit.live.results import LayerRecalibration


# The layer table's columns after name and status. recalibrate shows how far each layer moved, old -> new,
# in the same units as drift.
def _measured_columns(kl: str, shift: str, std_ratio: str) -> tuple[Column, ...]:
    return (
        Column(kl, "max_kl"),
        Column(shift, "max_shift"),
        Column(std_ratio, "max_std_ratio"),
        Column("channel", attribute="worst_channel"),
        Column("values/channel", "samples"),
    )


DRIFT_COLUMNS = (
    Column("excess KL", "excess_kl"),
    Column("x noise", "noise_ratio"),
    Column("mean KL", "mean_kl"),
    Column("max KL", "max_kl"),
    Column("channel", attribute="worst_channel"),
    Column("values/channel", "samples"),
)
RECALIBRATE_COLUMNS = _measured_columns("KL old->new", "mean move (std)", "std change (x)")


def calibration_data(passes: Sequence[StateDictPass]) -> CalibrationData:
    """The report section naming the data the passes used and the checkpoint keys the model ignored."""
    return CalibrationData(
        samples=passes[0].result.samples if passes else None,
        batches=passes[0].result.batches if passes else None,
        unused_keys={p.state_dict.name: p.unused_keys for p in passes if p.unused_keys},
    )


def unreached_finding(display: str, sd_name: str, name: str, *, changed: bool) -> Finding:
    """The warning for a layer no calibration batch reached (``changed``: recalibrate, else drift)."""
    tail = "left unchanged" if changed else "its stored statistics were not checked"
    return Finding(
        Severity.WARN,
        FindingKind.UNREACHED_LAYER,
        f"layer '{name}': no calibration batch reached it, so it was {tail}; check --forward / the "
        "model's control flow, or --ignore it",
        file=display,
        state_dict=sd_name,
        layer=name,
    )


def skipped_calls_finding(display: str, sd_name: str, layer: LayerRecalibration) -> Finding:
    """The note for a batch-mean layer some of whose calls had one value per channel (left out)."""
    return Finding(
        Severity.INFO,
        FindingKind.SKIPPED_CALLS,
        f"layer '{layer.name}': {layer.single_calls} of {layer.calls} call(s) had one value per channel "
        "(no unbiased variance) and were left out of the batch-mean statistics",
        file=display,
        state_dict=sd_name,
        layer=layer.name,
    )


def nonfinite_finding(display: str, exc: NonFiniteStatisticsError) -> Finding:
    """The error for new statistics a repair refused to write (NaN / Inf)."""
    return Finding(
        Severity.ERROR,
        FindingKind.NONFINITE,
        f"layer '{exc.layer}': {exc.fields.problem} ({exc.fields.found}); {exc.fields.fix}",
        file=display,
        state_dict=exc.state_dict,
        layer=exc.layer,
        channel=exc.channel,
    )


def pass_layer_row(
    sd_name: str, layer: LayerRecalibration, severity: Severity, metrics: dict[str, Any] | None = None
) -> LayerRow:
    """The report row of one measured layer (a ``LayerRecalibration``): how far data and stored differ
    (``metrics``: the layer's own, or ones the command extended)."""
    metrics = dict(metrics) if metrics is not None else layer.metrics()
    worst = metrics.pop("worst_channel")
    metrics["samples"] = int(metrics["samples"] or 0)  # values per channel: a count
    return LayerRow(
        layer.name, sd_name, severity, layer.channels, metrics, None, None if worst is None else int(worst)
    )
