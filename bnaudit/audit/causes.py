"""The likely cause of a ``compare`` or ``drift`` verdict, in one line, from evidence in the files.

Two kinds of evidence: the training settings the checkpoint stores (:mod:`bnaudit.audit.stored_config`) and
the pattern of the statistics across ranks and layers: bit-identical ranks (SyncBatchNorm, or buffers
all-reduced just before saving), ranks within the warning level (the one-step spread DDP's buffer broadcast
leaves, or independent averages over iid shards), counters that differ (files of different steps, or ranks
that took different numbers of steps), divergence largest at the first layer (the ranks' inputs differ),
growing with depth (label-skewed shards), or one outlier rank (one node saw different data). Each pattern
was checked on the calibration study's runs (tests/audit/test_causes.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from bnaudit.audit.compare_rows import GateLevels
from bnaudit.audit.rank_reader import ScanLayer
from bnaudit.audit.stored_config import StoredTraining
from bnaudit.bn.stats import Divergence
from bnaudit.report.model import Finding, LayerRow, Severity
from bnaudit.report.sections import Cause

# A divergence between the warning and the error level: no shape to read into it.
_MILD: tuple[str, tuple[str, ...]] = (
    "the spread is below the error level, of the order independent running averages over similar shards "
    "leave",
    (),
)
# One rank this many times further from the pool than any other (three or more ranks) is an outlier.
OUTLIER_RATIO = 4.0


@dataclass(frozen=True)
class RankEvidence:
    """What ``compare`` measured, as the cause needs it.

    Attributes:
        layers, divergences: the plan's layers and their divergences, in plan (file) order.
        ranks: the rank of each position in the stream.
        levels: the gate's levels.
        counter_finding: the finding that ``num_batches_tracked`` differs across ranks, if any.
        stored: the training settings stored in the reference rank's file, if any.
    """

    layers: Sequence[ScanLayer]
    divergences: Sequence[Divergence]
    ranks: Sequence[int]
    levels: GateLevels
    counter_finding: Finding | None
    stored: StoredTraining | None

    def gate_values(self) -> list[float]:
        """Each layer's mean KL divided by its level scale (what the warn and error levels apply to)."""
        return [
            d.mean_kl / self.levels.scale(lp.kind)
            for lp, d in zip(self.layers, self.divergences, strict=True)
        ]


def compare_cause(evidence: RankEvidence) -> Cause | None:
    """The cause of the verdict, or None when there is nothing to explain (no layers)."""
    if not evidence.layers:
        return None
    stored = evidence.stored
    settings = list(stored.evidence) if stored else []
    said = f"; the stored settings say {stored.meaning}" if stored and stored.synchronised is not None else ""
    if all(d.identical for d in evidence.divergences):
        return Cause(
            "ranks-identical",
            "every rank holds bit-identical statistics: SyncBatchNorm, or the buffers were all-reduced or "
            f"broadcast just before saving{said}",
            (*settings, f"{len(evidence.ranks)} ranks, every layer equal bit for bit"),
        )
    if evidence.counter_finding is not None:
        return Cause(
            "counters-differ",
            "num_batches_tracked differs across ranks: the files come from different steps, or the ranks "
            "took "
            f"different numbers of steps (uneven shards under Join){said}",
            (*settings, evidence.counter_finding.message),
        )
    values = evidence.gate_values()
    worst = max(range(len(values)), key=values.__getitem__)
    worst_text = (
        f"worst layer '{evidence.layers[worst].name}': mean KL {evidence.divergences[worst].mean_kl:.3g}"
    )
    if values[worst] < evidence.levels.warn_kl:
        return Cause("ranks-nearly-equal", _nearly_equal(stored), (*settings, worst_text))
    pattern, detail = _pattern(evidence, values) if values[worst] >= evidence.levels.error_kl else _MILD
    summary = "the ranks kept their own running statistics"
    if stored and stored.synchronised is False:
        summary += f" ({stored.meaning})"
    return Cause("buffers-unsynchronised", f"{summary}; {pattern}", (*settings, worst_text, *detail))


def _nearly_equal(stored: StoredTraining | None) -> str:
    """Ranks within the warning level: what the stored settings (if any) say produced them."""
    head = "the ranks differ by less than the warning level"
    broadcast = (
        "the spread DDP's buffer broadcast leaves (each rank's copy is one step's update away from rank "
        "0's); every copy follows rank 0's batches only, so whether the statistics fit all the data only "
        "`bnaudit drift` with a data sample can tell"
    )
    if stored is not None and stored.synchronised is False:
        return f"{head}: independent running averages over similar shards ({stored.meaning})"
    if stored is not None and stored.synchronised:
        return f"{head}: {broadcast} ({stored.meaning})"
    return f"{head}: {broadcast}, or independent running averages over similar (iid) shards"


def _pattern(evidence: RankEvidence, values: list[float]) -> tuple[str, tuple[str, ...]]:
    """The shape of the divergence: an outlier rank, largest at the input, growing with depth, or spread."""
    outlier = _outlier(evidence)
    if outlier is not None:
        return outlier
    first, worst = values[0], max(values)
    names = [lp.name for lp in evidence.layers]
    depth = max(range(len(values)), key=values.__getitem__)
    if depth == 0 and len(values) > 1:
        second = max(values[1:])
        return (
            "the divergence is largest at the first BatchNorm layer, where the inputs enter: the ranks' raw "
            "data differs (per-node sources, sensors or preprocessing, or class mixes that differ in the "
            "inputs)",
            (f"first layer '{names[0]}' {first:.3g}, the rest at most {second:.3g} (level-scaled mean KL)",),
        )
    if depth >= len(values) // 2 and worst >= 2 * max(first, 1e-300):
        return (
            "the divergence grows with depth, as with label-skewed shards: each rank's deep features "
            "describe "
            "its own classes",
            (f"'{names[0]}' {first:.3g} -> '{names[depth]}' {worst:.3g} (level-scaled mean KL)",),
        )
    return "the divergence is spread over the layers", ()


def _outlier(evidence: RankEvidence) -> tuple[str, tuple[str, ...]] | None:
    """One rank far further from the pool than the others (needs three ranks: two are always symmetric)."""
    if len(evidence.ranks) < 3:
        return None
    per_rank = [0.0] * len(evidence.ranks)
    for lp, d in zip(evidence.layers, evidence.divergences, strict=True):
        scale = evidence.levels.scale(lp.kind)
        for i, value in enumerate(d.per_rank_mean_kl):
            per_rank[i] = max(per_rank[i], value / scale)
    order = sorted(range(len(per_rank)), key=per_rank.__getitem__, reverse=True)
    top, second = per_rank[order[0]], per_rank[order[1]]
    if top < OUTLIER_RATIO * second:
        return None
    rank = evidence.ranks[order[0]]
    return (
        f"rank {rank} diverges {top / max(second, 1e-300):.0f}x more than any other rank: one node saw "
        "different data",
        (f"rank {rank} {top:.3g}, next rank {evidence.ranks[order[1]]} {second:.3g} (level-scaled mean KL)",),
    )


def drift_cause(
    rows: Sequence[LayerRow], first_layer: str | None, stored: StoredTraining | None
) -> Cause | None:
    """The cause of a ``drift`` verdict: current statistics, or drifted ones and where the drift is largest.

    Args:
        rows: the measured layers' rows (metrics ``excess_kl`` and ``noise_ratio``).
        first_layer: the name of the first BatchNorm layer the data reaches, in model order.
        stored: the training settings stored in the checkpoint, if any.
    """
    measured = [r for r in rows if r.metrics.get("excess_kl") is not None]
    if not measured:
        return None
    settings = list(stored.evidence) if stored else []
    worst = max(measured, key=lambda r: float(r.metrics["excess_kl"] or 0.0))
    ratio = worst.metrics.get("noise_ratio")
    times = f", {ratio:.1f}x its noise" if isinstance(ratio, int | float) else ""
    worst_text = (
        f"worst layer '{worst.name}': {float(worst.metrics['excess_kl'] or 0.0):.3g} above the noise{times}"
    )
    drifted = [r for r in measured if r.severity is not Severity.OK]
    if not drifted:
        return Cause(
            "statistics-current",
            "the stored statistics describe this data within its own sampling noise",
            (*settings, worst_text),
        )
    if worst.name == first_layer:
        pattern = (
            "the drift is largest at the first BatchNorm layer: this data differs from the training data "
            "at the "
            "input (another source, sensor or preprocessing)"
        )
    else:
        pattern = (
            "the running averages of the last training batches (under DDP, of one rank's batches) do not fit "
            "the final weights on this data"
        )
    said = f"; the stored settings say {stored.meaning}" if stored and stored.synchronised is not None else ""
    return Cause(
        "statistics-drifted",
        f"{len(drifted)} of {len(measured)} layer(s) drifted: {pattern}{said}",
        (*settings, worst_text),
    )
