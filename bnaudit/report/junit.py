"""The JUnit XML report: a testsuite per state dict, a testcase per layer, failures at or above --fail-on."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections import defaultdict
from dataclasses import dataclass, field

from bnaudit.report.model import FailOn, Finding, LayerRow, Report
from bnaudit.report.table import format_value

# XML 1.0 forbids most control characters even as entities; checkpoint-derived text may hold any.
_INVALID_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _clean(text: str) -> str:
    return _INVALID_XML.sub("?", text)


@dataclass
class _Case:
    """One testcase: a layer (with its findings) or a finding tied to no layer."""

    name: str
    findings: list[Finding] = field(default_factory=list)
    details: str = ""


def _suite_name(state_dict: str | None) -> str:
    return state_dict or "<root>"


def _layer_details(row: LayerRow) -> str:
    metrics = ", ".join(f"{k}={format_value(v)}" for k, v in row.metrics.items())
    where = ""
    if row.worst_rank is not None:
        where = f"; worst rank {row.worst_rank}, channel {row.worst_channel}"
    return f"{row.channels} channel(s), status {row.severity.value}; {metrics}{where}"


def _cases(report: Report) -> dict[str, list[_Case]]:
    suites: dict[str, list[_Case]] = defaultdict(list)
    by_layer: dict[tuple[str, str], _Case] = {}
    for row in report.layers:
        case = _Case(row.name or "<root>", details=_layer_details(row))
        suites[_suite_name(row.state_dict)].append(case)
        by_layer.setdefault((row.state_dict, row.name), case)
    for f in report.findings:
        found = by_layer.get((f.state_dict or "", f.layer)) if f.layer is not None else None
        if found is not None:
            found.findings.append(f)
            continue
        # Findings about a file, a tensor or a layer that has no row stand on their own, so none is lost.
        name = f"{f.kind.value}: {f.tensor or f.layer or f.file or report.command.value}"
        if f.rank is not None:
            name += f" (rank {f.rank})"
        suites[_suite_name(f.state_dict)].append(_Case(name, findings=[f]))
    return suites


def _note(f: Finding) -> str:
    accepted = " (accepted by the baseline)" if f.baselined else ""
    return f"{f.severity.value}: {f.kind.value}: {f.message}{accepted}"


def _testcase(parent: ET.Element, suite: str, case: _Case, report: Report, failing: set[int]) -> int:
    element = ET.SubElement(
        parent,
        "testcase",
        name=_clean(case.name),
        classname=_clean(f"bnaudit.{report.command.value}.{suite}"),
        time="0",
    )
    failures = [f for f in case.findings if id(f) in failing]
    if failures:
        worst = failures[0]
        failure = ET.SubElement(element, "failure", message=_clean(worst.message), type=worst.kind.value)
        failure.text = _clean("\n".join(_note(f) for f in failures))
    notes = [_note(f) for f in case.findings if id(f) not in failing]
    if case.details or notes:
        ET.SubElement(element, "system-out").text = _clean("\n".join([case.details, *notes]).strip())
    return 1 if failures else 0


def render(report: Report, fail_on: FailOn) -> str:
    """Render the report as JUnit XML (``testsuites`` root, as GitLab, Jenkins and most CI read it)."""
    failing = {id(f) for f in report.failing(fail_on)}
    root = ET.Element("testsuites", name=f"bnaudit {report.command.value}")
    total_tests = total_failures = 0
    for suite_name, cases in _cases(report).items():
        suite = ET.SubElement(root, "testsuite", name=_clean(suite_name))
        properties = ET.SubElement(suite, "properties")
        ET.SubElement(properties, "property", name="fail_on", value=fail_on.value)
        ET.SubElement(properties, "property", name="verdict", value=report.verdict(fail_on))
        failures = sum(_testcase(suite, suite_name, case, report, failing) for case in cases)
        suite.set("tests", str(len(cases)))
        suite.set("failures", str(failures))
        suite.set("errors", "0")
        suite.set("skipped", "0")
        total_tests += len(cases)
        total_failures += failures
    root.set("tests", str(total_tests))
    root.set("failures", str(total_failures))
    root.set("errors", "0")
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
