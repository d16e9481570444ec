"""Report pieces shared by ``drift`` and ``recalibrate``: a measured layer's row, the unreached warning."""

from __future__ import annotations

from typing import TYPE_CHECKING

from bnaudit.report.model import Finding, FindingKind, LayerRow, Severity

if TYPE_CHECKING:
    from bnaudit.live.results import LayerRecalibration


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


def pass_layer_row(sd_name: str, layer: LayerRecalibration, severity: Severity) -> LayerRow:
    """The report row of one measured layer (a ``LayerRecalibration``): how far data and stored differ."""
    metrics = layer.metrics()
    worst = metrics.pop("worst_channel")
    metrics["samples"] = int(metrics["samples"] or 0)  # values per channel: a count
    return LayerRow(
        layer.name, sd_name, severity, layer.channels, metrics, None, None if worst is None else int(worst)
    )
