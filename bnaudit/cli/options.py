"""The output step every command ends with: render, write the report and side outputs, pick the exit code.

It is also where commands import their shared options from (they are declared in
:mod:`bnaudit.cli.shared_options`, paired and checked in :mod:`bnaudit.cli.output_plan`).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import click

from bnaudit.atomic_output import write_bytes_atomically, write_text_atomically
from bnaudit.cli.output_plan import current_plan
from bnaudit.cli.shared_options import (
    eps_option,
    factor_option,
    ignore_option,
    key_option,
    layer_option,
    level_option,
    plot_option,
    repair_report_options,
    report_options,
)
from bnaudit.errors import OutputError
from bnaudit.report import OutputFormat, render
from bnaudit.report.json_format import report_to_dict
from bnaudit.report.model import FailOn, Report

__all__ = [
    "emit_report",
    "eps_option",
    "factor_option",
    "ignore_option",
    "key_option",
    "layer_option",
    "level_option",
    "plot_option",
    "repair_report_options",
    "report_options",
    "write_report_text",
]


def _append_job_summary(report: Report, gate: FailOn) -> None:
    # GitHub collects the step's summary from this file; append, as other steps may have written to it.
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if not summary:
        return
    try:
        with open(summary, "a", encoding="utf-8") as handle:
            handle.write(render(report, OutputFormat.MARKDOWN, gate) + "\n")
    except OSError as exc:
        raise OutputError(
            f"cannot append the job summary ({exc.strerror})",
            path=summary,
            where="$GITHUB_STEP_SUMMARY",
            fix="check that the file is writable, or unset GITHUB_STEP_SUMMARY",
        ) from exc


def _write_baseline(report: Report, gate: FailOn, path: Path) -> None:
    from bnaudit.audit.baseline import baseline_document  # on use: most runs write no baseline

    document = baseline_document(report_to_dict(report, gate))
    write_text_atomically(path, json.dumps(document, indent=2) + "\n")
    click.echo(f"bnaudit: baseline of {len(report.findings)} finding(s) written to {path}", err=True)


def _write_plot(report: Report, path: Path) -> None:
    from bnaudit.report.plot import plot_image  # on use: matplotlib is optional

    write_bytes_atomically(path, plot_image(report, path))
    click.echo(f"bnaudit: plot written to {path}", err=True)


def emit_report(
    report: Report,
    output_format: str | Sequence[str],
    output: Path | Sequence[Path] | None,
    fail_on: str,
) -> int:
    """Render ``report`` in every requested format, write the side outputs, and return the exit code.

    Applies ``--baseline`` first (accepted findings do not count for the verdict), then writes each
    format to its ``-o`` file or stdout, appends the job summary for ``--format github`` when
    ``$GITHUB_STEP_SUMMARY`` is set, and writes ``--write-baseline`` and ``--plot``.

    Args:
        report: what the command's audit found.
        output_format: the ``--format`` value(s).
        output: the ``-o`` file(s); ``None`` or empty: stdout.
        fail_on: the ``--fail-on`` value.

    Returns:
        0 when the gate passes, 1 when it fails — whatever the formats.

    Raises:
        UsageError: the formats and files do not pair (when called without ``report_options``).
        OutputError: a file cannot be written.
    """
    gate = FailOn(fail_on)
    plan = current_plan(output_format, output)
    if plan.baseline is not None:
        from bnaudit.audit.baseline import apply_baseline  # on use: most runs have no baseline

        report = apply_baseline(report, plan.baseline)
    verdict = report.verdict(gate)
    for fmt, path in plan.targets:
        text = render(report, fmt, gate)
        if path is None:
            write_report_text(text, None)
        else:
            write_text_atomically(path, text)
            click.echo(f"bnaudit: {fmt.value} report written to {path} (verdict: {verdict})", err=True)
    if any(fmt is OutputFormat.GITHUB for fmt, _ in plan.targets):
        _append_job_summary(report, gate)
    if plan.write_baseline is not None:
        _write_baseline(report, gate, plan.write_baseline)
    if plan.plot is not None:
        _write_plot(report, plan.plot)
    return 1 if verdict == "fail" else 0


def write_report_text(text: str, report_file: Path | None) -> None:
    """Send a rendered report to ``report_file`` (atomically) or to stdout.

    Raises:
        OutputError: ``report_file`` cannot be written.
    """
    if report_file is None:
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        write_text_atomically(report_file, text)
