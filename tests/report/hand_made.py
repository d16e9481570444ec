"""A small Report built by hand for the renderer tests: two layers, an error, a warning a baseline accepted,
a note, reader warnings and the baseline section."""

from __future__ import annotations

from bnaudit.report.model import Finding, FindingKind, InputInfo, LayerRow, Report, Severity
from bnaudit.report.sections import BaselineUse, Column, Command


def hand_made_report() -> Report:
    """A compare of two ranks: ``fc_bn`` diverges (error), ``stem.bn`` a little (warning, baselined)."""
    layers = (
        LayerRow("fc_bn", "model", Severity.ERROR, 4, {"max_kl": 0.25, "max_shift": 1.5}, 1, 3),
        LayerRow("stem.bn", "model", Severity.WARN, 8, {"max_kl": 0.03, "max_shift": 0.0002}, 0, 5),
    )
    findings = (
        Finding(
            Severity.ERROR,
            FindingKind.DIVERGENCE,
            "layer 'fc_bn': KL 0.25 on rank 1",
            state_dict="model",
            layer="fc_bn",
            rank=1,
            channel=3,
        ),
        Finding(
            Severity.WARN,
            FindingKind.DIVERGENCE,
            "layer 'stem.bn': KL 0.03 on rank 0",
            file="r1.pt",
            state_dict="model",
            layer="stem.bn",
            rank=0,
            channel=5,
            baselined=True,
        ),
        Finding(Severity.INFO, FindingKind.COUNTER_MISMATCH, "num_batches_tracked differs", tensor="n"),
    )
    return Report(
        command=Command.COMPARE,
        inputs=(
            InputInfo("r0.pt", "torch-zip", 0, ("model",)),
            InputInfo("r1.pt", "torch-zip", 1, ("model",)),
        ),
        settings={"ranks": 2, "warn_kl": 0.02},
        layers=layers,
        findings=findings,
        headline="max_kl",
        next_step="bnaudit average r0.pt r1.pt -o fixed.pt",
        columns=(
            Column("max KL", "max_kl"),
            Column("max shift", "max_shift"),
            Column("rank", attribute="worst_rank"),
        ),
        warnings=("r1.pt: saved in bfloat16",),
        baseline=BaselineUse("b.json", 1),
    )
