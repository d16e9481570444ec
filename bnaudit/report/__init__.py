"""Renderers: each output format is one module with ``render(report, fail_on) -> str``."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from enum import Enum

from bnaudit.report.model import FailOn, Report

Renderer = Callable[[Report, FailOn], str]


class OutputFormat(str, Enum):
    """The report formats ``--format`` accepts."""

    TABLE = "table"
    JSON = "json"
    MARKDOWN = "markdown"
    JUNIT = "junit"
    SARIF = "sarif"
    GITHUB = "github"


# Each format's module, imported when that format is rendered (keeps start-up light).
RENDERER_MODULES: dict[OutputFormat, str] = {
    OutputFormat.TABLE: "bnaudit.report.table",
    OutputFormat.JSON: "bnaudit.report.json_format",
    OutputFormat.MARKDOWN: "bnaudit.report.markdown",
    OutputFormat.JUNIT: "bnaudit.report.junit",
    OutputFormat.SARIF: "bnaudit.report.sarif",
    OutputFormat.GITHUB: "bnaudit.report.github",
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
    renderer: Renderer = importlib.import_module(RENDERER_MODULES[fmt]).render
    return renderer(report, fail_on)
