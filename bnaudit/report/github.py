"""GitHub Actions workflow commands: an annotation per finding, then the table report in a folded group.

The Markdown job summary that goes with it is :mod:`bnaudit.report.markdown`; the command line appends it
to ``$GITHUB_STEP_SUMMARY`` (a renderer only returns text).
"""

from __future__ import annotations

import secrets

from bnaudit.report import table
from bnaudit.report.locations import finding_file, relative_path, repository_root
from bnaudit.report.model import FailOn, Finding, Report, Severity

_COMMANDS = {
    Severity.ERROR: "error",
    Severity.WARN: "warning",
    Severity.INFO: "notice",
    Severity.OK: "notice",
}


def escape_data(text: str) -> str:
    """Escape a command's message: ``%``, CR and LF (as the Actions toolkit does)."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(text: str) -> str:
    """Escape a command's property value: as :func:`escape_data`, plus ``:`` and ``,``."""
    return escape_data(text).replace(":", "%3A").replace(",", "%2C")


def annotation(finding: Finding, file: str | None) -> str:
    """One ``::error file=...,title=...::message`` line (``warning`` / ``notice`` by severity).

    A finding a baseline accepted is a notice: it is shown, but does not read as a failure.
    """
    command = "notice" if finding.baselined else _COMMANDS[finding.severity]
    title = f"bnaudit {finding.kind.value}"
    if finding.location:
        title += f" in {finding.location}"
    if finding.baselined:
        title += " (accepted by the baseline)"
    properties = ([f"file={escape_property(file)}"] if file else []) + [f"title={escape_property(title)}"]
    return f"::{command} {','.join(properties)}::{escape_data(finding.message)}"


def render(report: Report, fail_on: FailOn) -> str:
    """Annotations for every finding, the full table in a folded group, and the verdict line."""
    root = repository_root()
    lines = []
    for f in report.findings:
        path = finding_file(f, report)
        lines.append(annotation(f, relative_path(path, root) if path else None))
    # The table echoes names read from an untrusted checkpoint: commands are switched off around it, so a
    # crafted layer name such as "::add-mask::..." cannot act as a workflow command.
    token = secrets.token_hex(16)
    lines += [
        f"::group::bnaudit {report.command.value} report",
        f"::stop-commands::{token}",
        table.render(report, fail_on).rstrip("\n"),
        f"::{token}::",
        "::endgroup::",
        table.verdict_line(report, fail_on),
    ]
    return "\n".join(lines) + "\n"
