"""The human-readable report: a table of layers (worst first), the findings, and a one-line verdict."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from tabulate import tabulate

from bnaudit.findings import FailOn, LayerRow, Report, Severity

MAX_FINDINGS_SHOWN = 20

# Per command: (column title, how to get the value from a row).
Column = tuple[str, Callable[[LayerRow], Any]]


def metric(name: str) -> Callable[[LayerRow], Any]:
    return lambda row: row.metrics.get(name)


_INSPECT_COLUMNS: list[Column] = [
    ("channels", lambda r: r.channels),
    ("max |mean|", metric("mean_abs_max")),
    ("min var", metric("var_min")),
    ("max var", metric("var_max")),
    ("batches", metric("num_batches_tracked")),
]
_COMPARE_COLUMNS: list[Column] = [
    ("max KL", metric("max_kl")),
    ("max shift (std)", metric("max_shift")),
    ("max var ratio", metric("max_var_ratio")),
    ("worst rank", lambda r: r.worst_rank),
    ("channel", lambda r: r.worst_channel),
]
COLUMNS: dict[str, list[Column]] = {"inspect": _INSPECT_COLUMNS, "compare": _COMPARE_COLUMNS}


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
    columns = COLUMNS.get(report.command, [])
    multi_sd = len({r.state_dict for r in report.layers}) > 1
    headers = ["layer", *(["state dict"] if multi_sd else []), "status", *(c[0] for c in columns)]
    rows = []
    for r in report.layers:
        rows.append(
            [
                r.name or "<root>",
                *([r.state_dict or "<root>"] if multi_sd else []),
                r.severity.value,
                *(format_value(get(r)) for _, get in columns),
            ]
        )
    return tabulate(rows, headers=headers, tablefmt="simple", disable_numparse=True)


def _channel_table(rows: Sequence[dict[str, Any]]) -> str:
    headers = list(rows[0])
    return tabulate(
        [[format_value(row[h]) for h in headers] for row in rows],
        headers=headers,
        tablefmt="simple",
        disable_numparse=True,
    )


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
    if report.command == "compare":
        ranks = report.settings.get("ranks", len(report.inputs))
        reference = report.inputs[0].path
        return f"bnaudit compare: {ranks} ranks, {n_layers} BatchNorm layer(s), reference {reference}"
    sources = ", ".join(i.path for i in report.inputs)
    return f"bnaudit {report.command}: {sources} ({n_layers} BatchNorm layer(s))"


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


def render(report: Report, fail_on: FailOn) -> str:
    """Render the report for a terminal."""
    parts = [_title(report), ""]
    if report.layers:
        parts += [_layer_table(report), ""]
    if report.channel_rows:
        parts += [_channel_table(report.channel_rows), ""]
    if report.extra.get("globals"):
        parts += ["Globals referenced by the pickle(s):", _channel_table(report.extra["globals"]), ""]
    if report.findings:
        parts += ["Findings:", *_findings_block(report), ""]
    parts.append(verdict_line(report, fail_on))
    return "\n".join(parts) + "\n"
