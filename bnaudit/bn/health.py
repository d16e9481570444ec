"""Health checks of BatchNorm statistics: what makes eval-mode normalisation wrong or unsafe."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from bnaudit.bn.layerstats import LayerStats
from bnaudit.bn.stats import segment_sums
from bnaudit.report.model import Finding, FindingKind, Severity

# A variance this far below eps means normalisation divides by ~sqrt(eps) alone: any deviation of the input
# at eval time is amplified by up to 1/sqrt(eps) (316x for eps=1e-5).
TINY_VARIANCE_FACTOR = 1e-3


@dataclass(frozen=True)
class _Place:
    """Where findings about one layer point: file, state dict, layer and (compare) rank."""

    file: str
    state_dict: str
    layer: str
    rank: int | None

    @property
    def label(self) -> str:
        rank = f" of rank {self.rank}" if self.rank is not None else ""
        return f"layer '{self.layer or '<root>'}'{rank}"

    def finding(
        self, severity: Severity, kind: FindingKind, message: str, channel: int | None = None
    ) -> Finding:
        return Finding(
            severity,
            kind,
            f"{self.label}: {message}",
            file=self.file,
            state_dict=self.state_dict,
            layer=self.layer,
            rank=self.rank,
            channel=channel,
        )


def health_findings(
    stats: LayerStats,
    eps: float,
    *,
    file: str,
    state_dict: str,
    layer: str,
    rank: int | None = None,
) -> list[Finding]:
    """Problems of one layer's statistics that make eval-mode normalisation wrong or unsafe.

    Returns:
        Findings of kinds ``nonfinite``, ``negative-variance`` (errors), ``tiny-variance``,
        ``never-updated`` (warnings) and, for a zero ``num_batches_tracked`` beside trained statistics,
        ``never-updated`` (info).
    """
    place = _Place(file, state_dict, layer, rank)
    limit = eps * TINY_VARIANCE_FACTOR
    finite_var = np.isfinite(stats.var)
    checks = (
        (~np.isfinite(stats.mean) | ~finite_var, Severity.ERROR, FindingKind.NONFINITE,
         "{count} channel(s) hold NaN or Inf statistics (first: channel {ch}); recalibrate the layer with "
         "`bnaudit recalibrate`"),
        (finite_var & (stats.var < 0), Severity.ERROR, FindingKind.NEGATIVE_VARIANCE,
         "{count} channel(s) have a negative running_var (first: channel {ch}, {value:.3g}); recalibrate "
         "the layer"),
        (finite_var & (stats.var >= 0) & (stats.var < limit), Severity.WARN, FindingKind.TINY_VARIANCE,
         f"{{count}} channel(s) have running_var below {limit:.0e} (first: channel {{ch}}); eval output "
         "there is amplified up to 1/sqrt(eps) — harmless for dead channels, wrong for live ones"),
    )  # fmt: skip
    out: list[Finding] = []
    for flags, severity, kind, template in checks:
        if flags.any():
            ch = int(np.argmax(flags))
            message = template.format(count=int(flags.sum()), ch=ch, value=stats.var[ch])
            out.append(place.finding(severity, kind, message, ch))
    out.extend(_never_updated(stats, place))
    return out


def differing_affine(reference: LayerStats, stats: LayerStats) -> Iterator[tuple[str, float]]:
    """(``weight`` or ``bias``, max |difference|) for each affine parameter that differs from the reference.

    DDP keeps parameters identical across ranks, so any difference means the files are not ranks of one step.
    """
    for attr in ("weight", "bias"):
        ref_value, value = getattr(reference, attr), getattr(stats, attr)
        if ref_value is None or value is None or np.array_equal(ref_value, value, equal_nan=True):
            continue
        yield attr, float(np.nanmax(np.abs(ref_value - value)))


def layers_to_check(stats: Sequence[LayerStats], eps: float) -> list[int]:
    """The layers for which :func:`health_findings` may find something; for the others it returns [].

    One vectorised pass over every layer's channels at once: a model's layers are nearly always healthy,
    and checking them one by one costs a dozen NumPy calls per layer.
    """
    if not stats:
        return []
    means = np.concatenate([s.mean for s in stats])
    variances = np.concatenate([s.var for s in stats])
    with np.errstate(invalid="ignore"):
        # Non-finite, negative and tiny variances all sit below the tiny-variance limit or are not finite.
        odd = ~np.isfinite(means) | ~np.isfinite(variances) | (variances < eps * TINY_VARIANCE_FACTOR)
    moved = (means != 0) | (variances != 1)  # a channel away from the initial statistics
    sizes = [s.channels for s in stats]
    odd_counts, moved_counts = segment_sums(odd, sizes), segment_sums(moved, sizes)
    return [
        i
        for i, s in enumerate(stats)
        if odd_counts[i] or (s.channels and not moved_counts[i]) or s.num_batches_tracked == 0
    ]


def _never_updated(stats: LayerStats, place: _Place) -> list[Finding]:
    at_reset = stats.channels > 0 and bool(np.all(stats.mean == 0) and np.all(stats.var == 1))
    if at_reset:
        return [
            place.finding(
                Severity.WARN,
                FindingKind.NEVER_UPDATED,
                "statistics are still at their initial values (mean 0, var 1): the layer never ran "
                "in train mode; recalibrate it on data with `bnaudit recalibrate`",
            )
        ]
    if stats.num_batches_tracked == 0:
        return [
            place.finding(
                Severity.INFO,
                FindingKind.NEVER_UPDATED,
                "num_batches_tracked is 0 but the statistics are set (typical of converted "
                "pretrained weights); nothing to do unless training should have updated them",
            )
        ]
    return []
