"""Renderers: each output format is one module with ``render(report, fail_on) -> str``."""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum

from bnaudit.findings import FailOn, Report
from bnaudit.report import json_format, table

Renderer = Callable[[Report, FailOn], str]


class OutputFormat(str, Enum):
    """The report formats ``--format`` accepts."""

    TABLE = "table"
    JSON = "json"


RENDERERS: dict[OutputFormat, Renderer] = {
    OutputFormat.TABLE: table.render,
    OutputFormat.JSON: json_format.render,
}


def render(report: Report, fmt: OutputFormat, fail_on: FailOn) -> str:
    """Render ``report`` in ``fmt``; the verdict comes from ``fail_on``, never from the renderer."""
    return RENDERERS[fmt](report, fail_on)
