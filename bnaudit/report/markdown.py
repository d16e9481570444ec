"""The Markdown report: a pull-request comment or a GitHub job summary (verdict, worst layers, findings)."""

from __future__ import annotations

import re

from bnaudit.report.model import FailOn, Finding, Report
from bnaudit.report.table import counts_text, format_value

MAX_LAYERS_SHOWN = 30
MAX_FINDINGS_SHOWN = 50

# Layer names and messages come from untrusted checkpoints: escape everything Markdown or HTML would act on,
# so that a crafted layer name cannot add links, images or markup to a PR comment.
_SPECIAL = re.compile(r"([\\`*_\[\]<>|~])")


def escape(text: str) -> str:
    """``text`` as literal Markdown on one line (table cells included)."""
    return _SPECIAL.sub(r"\\\1", text.replace("\r", " ").replace("\n", " "))


def _cell_code(text: str) -> str:
    # A code span shows a name verbatim; backticks inside would end it, and pipes would end the table cell.
    return "`" + text.replace("`", "'").replace("|", "\\|").replace("\n", " ") + "`" if text else "`<root>`"


def _heading(report: Report, fail_on: FailOn) -> str:
    verdict = report.verdict(fail_on)
    mark = "✅" if verdict == "pass" else "❌"
    return f"## {mark} bnaudit {report.command.value}: {verdict.upper()}"


def _summary(report: Report, fail_on: FailOn) -> str:
    inputs = len(report.inputs)
    return (
        f"**{counts_text(report)}** · fail-on: `{fail_on.value}` · {len(report.layers)} BatchNorm layer(s) "
        f"· {inputs} checkpoint(s)"
    )


def _layer_table(report: Report) -> list[str]:
    columns = report.columns
    header = ["layer", "state dict", "status", *(column.title for column in columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 3 + "---:|" * len(columns)]
    for row in report.layers[:MAX_LAYERS_SHOWN]:
        cells = [
            _cell_code(row.name),
            _cell_code(row.state_dict),
            row.severity.value,
            *(escape(format_value(column.value(row))) for column in columns),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if len(report.layers) > MAX_LAYERS_SHOWN:
        lines.append(f"\n… and {len(report.layers) - MAX_LAYERS_SHOWN} more layer(s) in the JSON report")
    return lines


def _finding_line(f: Finding) -> str:
    where = _cell_code(f.location) if f.location else ""
    accepted = " (accepted by the baseline)" if f.baselined else ""
    return f"| {f.severity.value} | `{f.kind.value}` | {where} | {escape(f.message)}{accepted} |"


def _findings_table(report: Report) -> list[str]:
    lines = ["| severity | kind | where | message |", "|---|---|---|---|"]
    lines += [_finding_line(f) for f in report.findings[:MAX_FINDINGS_SHOWN]]
    if len(report.findings) > MAX_FINDINGS_SHOWN:
        lines.append(f"\n… and {len(report.findings) - MAX_FINDINGS_SHOWN} more in the JSON report")
    return lines


def render(report: Report, fail_on: FailOn) -> str:
    """Render the report as GitHub-flavoured Markdown."""
    parts = [_heading(report, fail_on), "", _summary(report, fail_on), ""]
    if report.layers:
        parts += [*_layer_table(report), ""]
    if report.findings:
        parts += ["### Findings", "", *_findings_table(report), ""]
    if report.cause is not None:
        # Evidence quotes the checkpoint's own strings: escaped like every other cell.
        parts += [f"**Cause:** {escape(report.cause.summary)}", ""]
        parts += [*(f"- {escape(e)}" for e in report.cause.evidence), ""] if report.cause.evidence else []
    if report.next_step and report.verdict(fail_on) == "fail":
        step = report.next_step.replace("`", "'")
        parts += [f"**Next:** `{step}`", ""]
    return "\n".join(parts)
