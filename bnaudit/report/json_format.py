"""The versioned JSON report (schema: bnaudit/schemas/report-v1.json)."""

from __future__ import annotations

import functools
import json
import math
from typing import Any

from bnaudit import __version__
from bnaudit.report.model import SCHEMA_VERSION, FailOn, FiniteFloats, Report


def _finite(value: Any) -> Any:
    # JSON has no NaN/Infinity: non-finite numbers become null (the findings say what was wrong).
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, FiniteFloats):
        return value
    if isinstance(value, list | tuple):
        if len(value) >= _MIN_ARRAY_LENGTH and _all_finite_floats(value):
            return FiniteFloats(value)  # per-channel arrays: checked once, written by the fast path
        return [_finite(v) for v in value]
    return value


def _all_finite_floats(values: list[Any] | tuple[Any, ...]) -> bool:
    return all(type(v) is float and math.isfinite(v) for v in values)


# Per-channel arrays (pooled means and variances: thousands of floats per layer) are written with 10
# significant digits: finer than the float32 the statistics are stored in (9 digits tell any two float32
# apart), and about three times faster to produce than the shortest round-trip form json.dumps writes.
CHANNEL_DIGITS = 10
_MIN_ARRAY_LENGTH = 16  # shorter lists are written exactly, as any other value


@functools.lru_cache(maxsize=64)
def _array_format(length: int) -> str:
    # One %-format for the whole array: the per-value cost is the float conversion alone.
    return ", ".join([f"%.{CHANNEL_DIGITS}g"] * length)


def _is_channel_array(value: Any) -> bool:
    return isinstance(value, FiniteFloats) and len(value) >= _MIN_ARRAY_LENGTH


def _dumps_item(item: Any) -> str:
    """One list item on one line; a dict's per-channel float arrays go through the fast float format.

    The other fields between two arrays go through one ``json.dumps`` of a dict of them (its braces
    dropped), which writes exactly what dumping them one by one and joining with ", " would.
    """
    if not isinstance(item, dict):
        return json.dumps(item, allow_nan=False)
    parts: list[str] = []
    plain: dict[str, Any] = {}
    for key, value in item.items():
        if _is_channel_array(value):
            if plain:
                parts.append(json.dumps(plain, allow_nan=False)[1:-1])
                plain = {}
            parts.append(f"{json.dumps(str(key))}: [{_array_format(len(value)) % tuple(value)}]")
        else:
            plain[str(key)] = value
    if plain:
        parts.append(json.dumps(plain, allow_nan=False)[1:-1])
    return "{" + ", ".join(parts) + "}"


def _dumps(doc: dict[str, Any]) -> str:
    """Indented at the top two levels, each list item on one compact line.

    Readable in a terminal and fast: ``json.dumps`` with ``indent`` falls back to its pure-Python encoder,
    which takes seconds on the per-channel arrays of a large model; compact items use the C encoder.
    """
    lines = ["{"]
    for i, (key, value) in enumerate(doc.items()):
        comma = "," if i < len(doc) - 1 else ""
        head = f"  {json.dumps(key)}: "
        if isinstance(value, list) and value:
            items = [f"    {_dumps_item(item)}" for item in value]
            lines.append(head + "[\n" + ",\n".join(items) + "\n  ]" + comma)
        else:
            lines.append(head + json.dumps(value, allow_nan=False) + comma)
    lines.append("}")
    return "\n".join(lines)


def report_to_dict(report: Report, fail_on: FailOn) -> dict[str, Any]:
    """The JSON document as a dict (what ``--format json`` prints)."""
    doc: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": "bnaudit", "version": __version__},
        "command": report.command.value,
        "verdict": report.verdict(fail_on),
        "fail_on": fail_on.value,
        "summary": {
            "layers": len(report.layers),
            **report.counts(),
            "baselined": sum(f.baselined for f in report.findings),
        },
        "headline": report.headline,
        "settings": report.settings,
        "inputs": [i.to_dict() for i in report.inputs],
        "layers": [row.to_dict() for row in report.layers],
        "findings": [f.to_dict() for f in report.findings],
        "next_step": report.next_step if report.verdict(fail_on) == "fail" else None,
    }
    if report.channel_rows:
        doc["channels"] = list(report.channel_rows)
    for section in report.sections():
        doc.update(section.to_json())
    return dict(_finite(doc))


def render(report: Report, fail_on: FailOn) -> str:
    """Render the report as JSON (top levels indented, one line per layer or finding) and a newline."""
    return _dumps(report_to_dict(report, fail_on)) + "\n"
