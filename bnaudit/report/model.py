"""The Report that every audit command produces and every renderer consumes: findings, layer rows, verdict."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, TypeAlias

from bnaudit.report.sections import (
    AverageOutcome,
    BaselineUse,
    CalibrationData,
    Cause,
    Column,
    Command,
    GlobalEntry,
    GlobalListing,
    ReaderWarnings,
    RecalibrationOutcome,
    Section,
)

SCHEMA_VERSION = 1


class Severity(str, Enum):
    """How bad a finding or a layer is; ordered ok < info < warn < error."""

    OK = "ok"
    INFO = "info"
    WARN = "warn"
    ERROR = "error"

    @property
    def rank(self) -> int:
        return _SEVERITY_ORDER[self]


_SEVERITY_ORDER = {Severity.OK: 0, Severity.INFO: 1, Severity.WARN: 2, Severity.ERROR: 3}


class FailOn(str, Enum):
    """The lowest finding severity that fails the gate (``never``: report only)."""

    WARN = "warn"
    ERROR = "error"
    NEVER = "never"


class FindingKind(str, Enum):
    """The closed list of finding kinds; documented in the README and the JSON schema."""

    DIVERGENCE = "divergence"
    WEIGHTS_DIFFER = "weights-differ"
    COUNTER_MISMATCH = "counter-mismatch"
    NONFINITE = "nonfinite"
    NEGATIVE_VARIANCE = "negative-variance"
    TINY_VARIANCE = "tiny-variance"
    NEVER_UPDATED = "never-updated"
    MALFORMED_LAYER = "malformed-layer"
    UNSAFE_PICKLE = "unsafe-pickle"
    SUSPICIOUS_PICKLE = "suspicious-pickle"
    NO_BATCHNORM = "no-batchnorm"
    DRIFT = "drift"
    UNREACHED_LAYER = "unreached-layer"
    NO_CHECKSUM = "no-checksum"
    SKIPPED_CALLS = "skipped-calls"
    PRECISION_OVERFLOW = "precision-overflow"
    PRECISION_UNDERFLOW = "precision-underflow"
    COUNTER_ANOMALY = "counter-anomaly"
    STALE_COPY = "stale-copy"
    FROZEN_CHANGED = "frozen-changed"
    AMBIGUOUS_ARCHIVE = "ambiguous-archive"


# The parts of a finding's location: a name (file, state dict, layer, tensor) or a number (rank, channel);
# None where the finding is not about one.
Place: TypeAlias = str | None
Index: TypeAlias = int | None


@dataclass(frozen=True)
class Finding:
    """One problem (or note) found by an audit.

    Attributes:
        severity: info, warn or error.
        kind: what kind of problem (a closed list).
        message: one human sentence, naming the layer/tensor and what to do.
        file: the checkpoint the finding is about (as given on the command line), when one is.
        state_dict: the state dict's name (``model``, ``state_dict_ema``, ``""`` for the top level).
        layer: the normalised BatchNorm layer name, when the finding is about a layer.
        tensor: the normalised tensor key, when the finding is about one tensor.
        rank: the rank concerned (compare), when one is.
        channel: the worst channel, when one is.
        baselined: accepted by a ``--baseline`` report: still reported, but never fails the gate.
    """

    severity: Severity
    kind: FindingKind
    message: str
    file: Place = None
    state_dict: Place = None
    layer: Place = None
    tensor: Place = None
    rank: Index = None
    channel: Index = None
    baselined: bool = False

    @property
    def location(self) -> str:
        """The layer or tensor name, prefixed by the state dict when it has a name."""
        where = self.layer if self.layer is not None else self.tensor
        if where is None:
            return self.state_dict or ""
        where = where or "<root>"
        return f"{self.state_dict}:{where}" if self.state_dict else where

    def to_dict(self) -> dict[str, Any]:
        return {
            "severity": self.severity.value,
            "kind": self.kind.value,
            "message": self.message,
            "file": self.file,
            "state_dict": self.state_dict,
            "layer": self.layer,
            "tensor": self.tensor,
            "rank": self.rank,
            "channel": self.channel,
            "baselined": self.baselined,
        }


class FiniteFloats(list[float]):
    """Per-channel values already known to be finite floats (checked with NumPy where they were made).

    The JSON report writes such lists through its fast path without checking every value again.
    """


@dataclass(frozen=True)
class LayerRow:
    """One BatchNorm layer's line in a report.

    ``metrics`` holds the command's numbers (for compare: ``mean_kl``, ``max_kl``, ``max_shift``,
    ``max_var_ratio``...); ``worst_rank`` / ``worst_channel`` locate the maximum of the headline metric;
    ``input`` is what the layer normalises (``spatial`` / ``flat`` / ``unknown``) where the audit uses it.
    """

    name: str
    state_dict: str
    severity: Severity
    channels: int
    metrics: dict[str, float | int | None]
    worst_rank: int | None = None
    worst_channel: int | None = None
    arrays: dict[str, list[float]] = field(default_factory=dict)
    input: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "state_dict": self.state_dict,
            "severity": self.severity.value,
            "channels": self.channels,
            "metrics": self.metrics,
            "worst_rank": self.worst_rank,
            "worst_channel": self.worst_channel,
        }
        if self.input is not None:
            out["input"] = self.input
        out.update(self.arrays)
        return out


@dataclass(frozen=True)
class InputInfo:
    """A checkpoint the report was made from."""

    path: str
    format: str
    rank: int | None = None
    state_dicts: tuple[str, ...] = ()
    transfer: tuple[int, int] | None = None  # (bytes read, requests) of a remote input; None when local

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "path": self.path,
            "format": self.format,
            "rank": self.rank,
            "state_dicts": list(self.state_dicts),
        }
        if self.transfer is not None:
            out["transfer"] = {"bytes_read": self.transfer[0], "requests": self.transfer[1]}
        return out


@dataclass(frozen=True)
class Report:
    """What an audit found. Renderers turn it into text; :meth:`verdict` decides the exit code.

    Attributes:
        command: the command that made it.
        inputs: the checkpoints read.
        settings: thresholds and options that shaped the result (eps, warn_kl, error_kl, ignore, ...).
        layers: per-layer rows, worst first.
        findings: every finding, worst first.
        headline: the metric that orders layers (``max_kl`` for compare), for renderers.
        next_step: a command line suggestion printed with a failing verdict.
        channel_rows: per-channel detail for ``--layer`` (list of dicts), empty otherwise.
        columns: the layer table's columns after the name (and status), declared by the audit.
        globals: ``inspect --security``: every global the pickles reference, classified.
        warnings: what the readers noticed in the inputs (compare, average).
        average: what ``average`` wrote.
        calibration: the data ``drift`` / ``recalibrate`` used.
        recalibration: what ``recalibrate`` wrote (or that it refused).
        baseline: the baseline applied, if any.
        cause: the verdict's likely cause and its evidence (compare, drift).
    """

    command: Command
    inputs: tuple[InputInfo, ...]
    settings: dict[str, Any]
    layers: tuple[LayerRow, ...]
    findings: tuple[Finding, ...]
    headline: str = ""
    next_step: str | None = None
    channel_rows: tuple[dict[str, Any], ...] = ()
    columns: tuple[Column, ...] = ()
    globals: tuple[GlobalEntry, ...] | None = None
    warnings: tuple[str, ...] | None = None
    average: AverageOutcome | None = None
    calibration: CalibrationData | None = None
    recalibration: RecalibrationOutcome | None = None
    baseline: BaselineUse | None = None
    cause: Cause | None = None

    def sections(self) -> list[Section]:
        """The optional sections this report carries, in the order the JSON report writes them."""
        listing: list[Section] = []
        if self.globals is not None:
            listing.append(GlobalListing(self.globals))
        if self.warnings is not None:
            listing.append(ReaderWarnings(self.warnings))
        listing += [
            s
            for s in (self.average, self.recalibration, self.calibration, self.baseline, self.cause)
            if s is not None
        ]
        return listing

    def failing(self, fail_on: FailOn) -> list[Finding]:
        """The findings at or above ``fail_on``, less those a baseline accepted."""
        if fail_on is FailOn.NEVER:
            return []
        threshold = Severity(fail_on.value).rank
        return [f for f in self.findings if f.severity.rank >= threshold and not f.baselined]

    def verdict(self, fail_on: FailOn) -> str:
        """``pass`` or ``fail``: fail when any finding is at or above ``fail_on``."""
        return "fail" if self.failing(fail_on) else "pass"

    def counts(self) -> dict[str, int]:
        """Number of findings per severity."""
        out = {s.value: 0 for s in (Severity.ERROR, Severity.WARN, Severity.INFO)}
        for f in self.findings:
            out[f.severity.value] += 1
        return out


def sort_findings(findings: list[Finding]) -> tuple[Finding, ...]:
    """Worst first; stable within a severity so the audit's own order (worst layer first) is kept."""
    return tuple(sorted(findings, key=lambda f: -f.severity.rank))


def sort_by_layer_metric(
    findings: list[Finding], rows: Sequence[LayerRow], kind: FindingKind, metric: str = "max_kl"
) -> None:
    """Sort ``findings`` in place so that those of ``kind`` come by their layer's ``metric``, largest first.

    Other findings keep their place relative to each other (the sort is stable); they count as 0.
    """
    values = {(r.state_dict, r.name): float(r.metrics.get(metric) or 0.0) for r in rows}

    def key(finding: Finding) -> float:
        if finding.kind is not kind:
            return 0.0
        return -values.get((finding.state_dict or "", finding.layer or ""), 0.0)

    findings.sort(key=key)
