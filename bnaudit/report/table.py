"""The human-readable report: a table of layers (worst first), the findings, and a one-line verdict."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from bnaudit.report.model import Command, FailOn, Report, Severity

MAX_FINDINGS_SHOWN = 20


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


def _layer_table(report: Report) -> str:
    columns = report.columns
    multi_sd = len({r.state_dict for r in report.layers}) > 1
    headers = ["layer", *(["state dict"] if multi_sd else []), "status", *(c.title for c in columns)]
    rows = []
    for r in report.layers:
        rows.append(
            [
                r.name or "<root>",
                *([r.state_dict or "<root>"] if multi_sd else []),
                r.severity.value,
                *(format_value(column.value(r)) for column in columns),
            ]
        )
    return simple_table(rows, headers)


def simple_table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    """Rows under a header line, columns aligned; cells are shown as given (no number re-parsing)."""
    # Imported on use: tabulate costs ~50 ms to import, which the machine-readable formats never need.
    from tabulate import tabulate

    return tabulate(rows, headers=headers, tablefmt="simple", disable_numparse=True)


def _channel_table(rows: Sequence[dict[str, Any]]) -> str:
    headers = list(rows[0])
    return simple_table([[format_value(row[h]) for h in headers] for row in rows], headers)


def _findings_block(report: Report) -> list[str]:
    shown = [f for f in report.findings if f.severity is not Severity.INFO] or list(report.findings)
    lines = []
    for f in shown[:MAX_FINDINGS_SHOWN]:
        where = f"[{f.state_dict}] " if f.state_dict else ""
        accepted = " (accepted by the baseline)" if f.baselined else ""
        lines.append(f"  {f.severity.value.upper():5} {f.kind.value:18} {where}{f.message}{accepted}")
    if len(shown) > MAX_FINDINGS_SHOWN:
        lines.append(f"  ... and {len(shown) - MAX_FINDINGS_SHOWN} more (use --format json for all)")
    return lines


def _title(report: Report) -> str:
    n_layers = len(report.layers)
    if report.command is Command.COMPARE:
        ranks = report.settings.get("ranks", len(report.inputs))
        reference = report.inputs[0].path
        return f"bnaudit compare: {ranks} ranks, {n_layers} BatchNorm layer(s), reference {reference}"
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
    """recalibrate / drift: the data used, the --eval metrics before and after, and what was written."""
    if report.command not in (Command.RECALIBRATE, Command.DRIFT):
        return []
    data, outcome = report.calibration, report.recalibration
    batches, samples = (data.batches, data.samples) if data else (None, None)
    lines = [f"Data: {batches} batch(es), {samples} sample(s)"]
    for name, keys in (data.unused_keys if data else {}).items():
        where = f"[{name}] " if name else ""
        shown = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
        lines.append(f"Note: {where}{len(keys)} checkpoint key(s) the model does not use: {shown}")
    for name, metrics in ((outcome.evals if outcome else None) or {}).items():
        before, after = metrics.get("before") or {}, metrics.get("after") or {}
        where = f"[{name}] " if name else ""
        moved = ", ".join(f"{k} {format_value(v)} -> {format_value(after.get(k))}" for k, v in before.items())
        lines.append(f"Eval {where}before -> after: {moved}")
    if report.command is Command.RECALIBRATE:
        output = outcome.output if outcome else None
        lines.append(
            f"Wrote {output} (provenance: {output}.bnaudit.json)" if output else "Nothing was written"
        )
    return [*lines, ""]


def render(report: Report, fail_on: FailOn) -> str:
    """Render the report for a terminal."""
    parts = [_title(report), ""]
    if report.layers:
        parts += [_layer_table(report), ""]
    if report.channel_rows:
        parts += [_channel_table(report.channel_rows), ""]
    if report.globals:
        listing = [entry.to_json() for entry in report.globals]
        parts += ["Globals referenced by the pickle(s):", _channel_table(listing), ""]
    if report.findings:
        parts += ["Findings:", *_findings_block(report), ""]
    parts += _calibration_lines(report)
    parts.append(verdict_line(report, fail_on))
    return "\n".join(parts) + "\n"
