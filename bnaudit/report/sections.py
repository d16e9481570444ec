"""The typed parts of a Report that only some commands fill: the command, its columns, and named sections.

Each section is a frozen dataclass with ``to_json()``, the fields it adds to the JSON report, in the order
the schema lists them; renderers read the attributes, never string keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from bnaudit.report.model import LayerRow


class Section(Protocol):
    """A named part of a report: what it adds to the JSON document."""

    def to_json(self) -> dict[str, Any]: ...


class Command(str, Enum):
    """The command that made a report (its value is what reports print)."""

    INSPECT = "inspect"
    COMPARE = "compare"
    DRIFT = "drift"
    AVERAGE = "average"
    RECALIBRATE = "recalibrate"
    DIFF = "diff"


@dataclass(frozen=True)
class Column:
    """One column of a report's layer table, declared by the audit that builds the report.

    Attributes:
        title: the header.
        metric: the ``LayerRow.metrics`` key shown, or
        attribute: a ``LayerRow`` attribute shown instead (``channels``, ``worst_rank``, ``worst_channel``).
    """

    title: str
    metric: str | None = None
    attribute: str | None = None

    def value(self, row: LayerRow) -> Any:
        """The cell of ``row`` in this column (None when the row has no such value)."""
        if self.attribute is not None:
            return getattr(row, self.attribute)
        return row.metrics.get(self.metric or "")


@dataclass(frozen=True)
class GlobalEntry:
    """A global the checkpoint's pickles reference (``inspect --security``), classified."""

    name: str
    safety: str
    sources: tuple[str, ...]
    file: str | None = None

    def to_json(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"global": self.name, "safety": self.safety, "sources": list(self.sources)}
        if self.file is not None:
            entry["file"] = self.file
        return entry


@dataclass(frozen=True)
class GlobalListing:
    """The ``globals`` section: :class:`GlobalEntry` items."""

    entries: tuple[GlobalEntry, ...]

    def to_json(self) -> dict[str, Any]:
        return {"globals": [entry.to_json() for entry in self.entries]}


@dataclass(frozen=True)
class ReaderWarnings:
    """The ``warnings`` section: what the readers noticed in the inputs, one line each."""

    lines: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"warnings": list(self.lines)}


@dataclass(frozen=True)
class AverageOutcome:
    """What ``average`` wrote (or why not), and the digests that prove it."""

    output: str | None
    sidecar: str | None
    refused: str | None
    reference_sha256: str | None
    output_sha256: str | None
    stats_sha256: tuple[str, ...]
    upload: str | None = None  # a URL output: the path taken (server-side copy, or download + upload)

    def to_json(self) -> dict[str, Any]:
        written = {
            "output": self.output,
            "sidecar": self.sidecar,
            "refused": self.refused,
            "reference_sha256": self.reference_sha256,
            "output_sha256": self.output_sha256,
            "stats_sha256": list(self.stats_sha256),
        }
        return {"average": written if self.upload is None else {**written, "upload": self.upload}}


@dataclass(frozen=True)
class CalibrationData:
    """The data a model-running command (``drift``, ``recalibrate``) used, and the keys the model ignored."""

    samples: int | None
    batches: int | None
    unused_keys: dict[str, list[str]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"samples": self.samples, "batches": self.batches, "unused_keys": self.unused_keys}


@dataclass(frozen=True)
class RecalibrationOutcome:
    """What ``recalibrate`` wrote, its ``--eval`` metrics before and after, or that it refused the input."""

    output: str | None
    evals: dict[str, dict[str, Any]] | None = None
    refused: bool = False
    upload: str | None = None  # a URL output: the path taken (server-side copy, or download + upload)

    def to_json(self) -> dict[str, Any]:
        if self.refused:
            return {"output": self.output, "refused": True}
        written = {"output": self.output, "eval": self.evals}
        return written if self.upload is None else {**written, "upload": self.upload}


@dataclass(frozen=True)
class Cause:
    """The likely cause of a verdict in one line, and the evidence in the files it rests on.

    Attributes:
        kind: a stable name (``ranks-identical``, ``buffers-unsynchronised``, ...; README "Causes").
        summary: the line a reader sees.
        evidence: what in the files supports it (stored settings, the pattern of the statistics).
    """

    kind: str
    summary: str
    evidence: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"cause": {"kind": self.kind, "summary": self.summary, "evidence": list(self.evidence)}}


@dataclass(frozen=True)
class BaselineUse:
    """The baseline applied to a report and how many findings it accepted."""

    path: str
    accepted: int

    def to_json(self) -> dict[str, Any]:
        return {"baseline": {"path": self.path, "accepted": self.accepted}}
