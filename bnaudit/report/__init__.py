"""Renderers: each output format is one module with ``render(report, fail_on) -> str``."""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum

from bnaudit.findings import FailOn, Report
from bnaudit.report import github, json_format, junit, markdown, sarif, table

Renderer = Callable[[Report, FailOn], str]


class OutputFormat(str, Enum):
    """The report formats ``--format`` accepts."""

    TABLE = "table"
    JSON = "json"
    MARKDOWN = "markdown"
    JUNIT = "junit"
    SARIF = "sarif"
    GITHUB = "github"


RENDERERS: dict[OutputFormat, Renderer] = {
    OutputFormat.TABLE: table.render,
    OutputFormat.JSON: json_format.render,
    OutputFormat.MARKDOWN: markdown.render,
    OutputFormat.JUNIT: junit.render,
    OutputFormat.SARIF: sarif.render,
    OutputFormat.GITHUB: github.render,
}

# File name suffixes that say which format a -o file is meant to hold; used to catch a -o paired with the
# wrong --format. A suffix not listed anywhere (.txt, .log, none) fits every format.
SUFFIXES: dict[OutputFormat, frozenset[str]] = {
    OutputFormat.TABLE: frozenset({".txt", ".log"}),
    OutputFormat.JSON: frozenset({".json"}),
    OutputFormat.MARKDOWN: frozenset({".md", ".markdown"}),
    OutputFormat.JUNIT: frozenset({".xml"}),
    OutputFormat.SARIF: frozenset({".sarif", ".json"}),
    OutputFormat.GITHUB: frozenset({".txt", ".log"}),
}


def render(report: Report, fmt: OutputFormat, fail_on: FailOn) -> str:
    """Render ``report`` in ``fmt``; the verdict comes from ``fail_on``, never from the renderer."""
    return RENDERERS[fmt](report, fail_on)
