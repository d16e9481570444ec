"""The human-readable report: a table of layers (worst first), the findings, and a one-line verdict.

What the table shows follows what the report declares: its columns, and its sections. A report of a
repair (one with an ``average`` section) is about what the write changes, not about a gate per layer: its
table has no status column, and its findings list leaves out notes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bnaudit.report.model import FailOn, Finding, Report, Severity
from bnaudit.report.sections import Command

MAX_FINDINGS_SHOWN = 20


@dataclass(frozen=True)
class _Layout:
    """How much of the audit view a report's table shows.

    Attributes:
        status: a status column after the layer name.
        detail: findings name their state dict, say when a baseline accepted them, and count the rest.
        notes_when_alone: notes (info findings) are listed when there are no warnings or errors.
    """

    status: bool = True
    detail: bool = True
    notes_when_alone: bool = True


_AUDIT = _Layout()
_REPAIR = _Layout(status=False, detail=False, notes_when_alone=False)


def _layout(report: Report) -> _Layout:
    return _REPAIR if report.average is not None else _AUDIT


def format_value(value: Any) -> str:
    """A metric as a short string: 4 decimals, scientific notation for very small or large values."""
    if value is None:
        return "-"
    if isinstance(value, list | tuple):
        return ", ".join(format_value(v) for v in value)
    if isinstance(value, float):
        if math.isinf(value):
            return "inf"
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.2e}"
        return f"{value:.4f}"
    return str(value)


def _layer_table(report: Report, layout: _Layout) -> str:
    multi_sd = len({r.state_dict for r in report.layers}) > 1
    headers = [
        "layer",
        *(["state dict"] if multi_sd else []),
        *(["status"] if layout.status else []),
        *(c.title for c in report.columns),
    ]
    rows = [
        [
            r.name or "<root>",
            *([r.state_dict or "<root>"] if multi_sd else []),
            *([r.severity.value] if layout.status else []),
            *(format_value(column.value(r)) for column in report.columns),
        ]
        for r in report.layers
    ]
    return simple_table(rows, headers)


def simple_table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    """Rows under a header line, columns aligned; cells are shown as given (no number re-parsing)."""
    # Imported on use: tabulate costs ~50 ms to import, which the machine-readable formats never need.
    from tabulate import tabulate

    return tabulate(rows, headers=headers, tablefmt="simple", disable_numparse=True)


def _channel_table(rows: Sequence[dict[str, Any]]) -> str:
    headers = list(rows[0])
    return simple_table([[format_value(row[h]) for h in headers] for row in rows], headers)


def _finding_line(finding: Finding, layout: _Layout) -> str:
    head = f"  {finding.severity.value.upper():5} {finding.kind.value:18} "
    if not layout.detail:
        return head + finding.message
    where = f"[{finding.state_dict}] " if finding.state_dict else ""
    accepted = " (accepted by the baseline)" if finding.baselined else ""
    return f"{head}{where}{finding.message}{accepted}"


def _findings_block(report: Report, layout: _Layout) -> list[str]:
    shown = [f for f in report.findings if f.severity is not Severity.INFO]
    if not shown and layout.notes_when_alone:
        shown = list(report.findings)
    if not shown:
        return []
    lines = ["Findings:", *(_finding_line(f, layout) for f in shown[:MAX_FINDINGS_SHOWN])]
    if layout.detail and len(shown) > MAX_FINDINGS_SHOWN:
        lines.append(f"  ... and {len(shown) - MAX_FINDINGS_SHOWN} more (use --format json for all)")
    return [*lines, ""]


def _title(report: Report) -> str:
    n_layers = len(report.layers)
    settings = report.settings
    if report.command is Command.COMPARE:
        ranks, reference = settings.get("ranks", len(report.inputs)), report.inputs[0].path
        return f"bnaudit compare: {ranks} ranks, {n_layers} BatchNorm layer(s), reference {reference}"
    if report.command is Command.AVERAGE:
        return (
            f"bnaudit average: {settings['ranks']} ranks, {n_layers} BatchNorm layer(s), method "
            f"{settings['method']}, reference {settings['reference']}"
        )
    sources = ", ".join(i.path for i in report.inputs)
    return f"bnaudit {report.command.value}: {sources} ({n_layers} BatchNorm layer(s))"


def counts_text(report: Report) -> str:
    """``2 error(s), 1 warning(s), 0 note(s)``, and how many of them a baseline accepted."""
    counts = report.counts()
    text = f"{counts['error']} error(s), {counts['warn']} warning(s), {counts['info']} note(s)"
    baselined = sum(f.baselined for f in report.findings)
    return f"{text}, {baselined} accepted by the baseline" if baselined else text


def verdict_line(report: Report, fail_on: FailOn) -> str:
    """``PASS``/``FAIL`` with the counts and, on failure, the next step to take."""
    summary = counts_text(report)
    if report.verdict(fail_on) == "pass":
        return f"PASS: {summary} (fail-on: {fail_on.value})"
    line = f"FAIL: {summary} (fail-on: {fail_on.value})"
    return f"{line}\nNext: {report.next_step}" if report.next_step else line


def _calibration_lines(report: Report) -> list[str]:
    """A model-running report: the data used, the --eval metrics before and after, and what was written."""
    data, outcome = report.calibration, report.recalibration
    if data is None and outcome is None:
        return []
    # A run refused before or during its passes has no data to describe.
    lines = [f"Data: {data.batches} batch(es), {data.samples} sample(s)"] if data else []
    for name, keys in (data.unused_keys if data else {}).items():
        where = f"[{name}] " if name else ""
        shown = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
        lines.append(f"Note: {where}{len(keys)} checkpoint key(s) the model does not use: {shown}")
    for name, metrics in ((outcome.evals if outcome else None) or {}).items():
        before, after = metrics.get("before") or {}, metrics.get("after") or {}
        where = f"[{name}] " if name else ""
        moved = ", ".join(f"{k} {format_value(v)} -> {format_value(after.get(k))}" for k, v in before.items())
        lines.append(f"Eval {where}before -> after: {moved}")
    if outcome is not None:
        output = outcome.output
        lines.append(
            f"Wrote {output} (provenance: {output}.bnaudit.json)" if output else "Nothing was written"
        )
    return [*lines, ""]


def _average_lines(report: Report) -> list[str]:
    """A repair report: what was written, refused, or (a dry run) would have been."""
    outcome = report.average
    if outcome is None:
        return []
    if outcome.output:
        return [f"Wrote {outcome.output} (provenance: {outcome.sidecar})"]
    return ["Refused: nothing was written" if outcome.refused else "Dry run: nothing was written"]


def render(report: Report, fail_on: FailOn) -> str:
    """Render the report for a terminal."""
    layout = _layout(report)
    parts = [_title(report), ""]
    if report.layers:
        parts += [_layer_table(report, layout), ""]
    if report.channel_rows:
        parts += [_channel_table(report.channel_rows), ""]
    if report.globals:
        listing = [entry.to_json() for entry in report.globals]
        parts += ["Globals referenced by the pickle(s):", _channel_table(listing), ""]
    parts += _findings_block(report, layout)
    if report.cause is not None:
        parts += [f"Cause: {report.cause.summary}", *(f"  evidence: {e}" for e in report.cause.evidence), ""]
    parts += _calibration_lines(report)
    parts += _average_lines(report)
    parts.append(verdict_line(report, fail_on))
    return "\n".join(parts) + "\n"
