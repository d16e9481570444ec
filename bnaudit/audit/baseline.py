"""Baselines: accept the findings of a previous JSON report, so that only new or worse findings fail.

A finding is identified by (kind, state dict, layer or tensor, rank) — never by a file path, so that a
baseline written on one machine applies to checkpoints saved anywhere else. A known finding is *worse*
when its severity is higher than recorded or, for the kinds measured by the headline metric (divergence,
drift), when that metric grew by more than :data:`METRIC_TOLERANCE` (relative).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bnaudit.errors import InputError
from bnaudit.report.model import Finding, FindingKind, Report, Severity
from bnaudit.report.sections import BaselineUse

log = logging.getLogger(__name__)

METRIC_TOLERANCE = 0.05
# The kinds whose size is the layer's headline metric (compare: gate_kl, drift: excess_kl): more of it is
# worse, not just "still there".
MEASURED_KINDS = frozenset({FindingKind.DIVERGENCE, FindingKind.DRIFT})
# Headline metric of reports written before the JSON report named it.
_DEFAULT_HEADLINES = {"compare": "max_kl"}
_PASS_A_REPORT = "pass a JSON report of bnaudit"

FindingKey = tuple[str, str, str, int | None]


def finding_key(
    kind: str, state_dict: str | None, layer: str | None, tensor: str | None, rank: int | None
) -> FindingKey:
    """The identity a baseline matches on."""
    return (kind, state_dict or "", layer if layer is not None else tensor or "", rank)


def key_of(finding: Finding) -> FindingKey:
    """:func:`finding_key` of a finding."""
    return finding_key(finding.kind.value, finding.state_dict, finding.layer, finding.tensor, finding.rank)


@dataclass(frozen=True)
class Accepted:
    """A finding recorded in a baseline: its severity and, for measured kinds, its metric."""

    severity: Severity
    metric: float | None


@dataclass(frozen=True)
class Baseline:
    """The findings a baseline accepts, by :func:`finding_key`, and the metric their sizes were recorded in
    (a baseline written before a command's headline changed is compared in its own metric)."""

    path: Path
    command: str
    accepted: dict[FindingKey, Accepted]
    headline: str = ""


def _layer_metrics(doc: dict[str, Any], headline: str) -> dict[tuple[str, str], float]:
    out: dict[tuple[str, str], float] = {}
    for row in doc.get("layers") or []:
        if not isinstance(row, dict):
            continue
        value = (row.get("metrics") or {}).get(headline)
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[(str(row.get("state_dict") or ""), str(row.get("name")))] = float(value)
    return out


def _parse_finding(entry: Any, index: int, path: Path) -> tuple[FindingKey, Severity]:
    where = f"findings[{index}]"
    if not isinstance(entry, dict):
        raise InputError("is not an object", path=path, where=where, fix=_PASS_A_REPORT)
    try:
        kind = FindingKind(entry["kind"]).value
        severity = Severity(entry["severity"])
    except (KeyError, ValueError) as exc:
        raise InputError(
            f"has no valid kind and severity ({exc})", path=path, where=where, fix=_PASS_A_REPORT
        ) from exc
    rank = entry.get("rank")
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool)):
        raise InputError(
            "has the wrong type",
            path=path,
            where=f"{where}.rank",
            expected="an integer or null",
            found=repr(rank),
        )
    return finding_key(kind, entry.get("state_dict"), entry.get("layer"), entry.get("tensor"), rank), severity


def _read_report(path: Path) -> dict[str, Any]:
    """The JSON report at ``path``, checked to be one bnaudit can read as a baseline."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise InputError(
            "no such baseline file", path=path, fix=f"write one with --write-baseline {path}"
        ) from exc
    except OSError as exc:
        raise InputError(f"cannot read the baseline ({exc.strerror})", path=path) from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"the baseline is not JSON ({exc})", path=path, fix=_PASS_A_REPORT) from exc
    if not isinstance(doc, dict) or (doc.get("tool") or {}).get("name") != "bnaudit":
        raise InputError(
            "not a bnaudit JSON report (no tool.name 'bnaudit')",
            path=path,
            fix="write one with --write-baseline",
        )
    if doc.get("schema_version") != 1 or not isinstance(doc.get("findings"), list):
        raise InputError(
            "unsupported baseline",
            path=path,
            where="schema_version",
            expected="1 with a findings list",
            found=repr(doc.get("schema_version")),
            fix="write a new one with --write-baseline",
        )
    return doc


def load_baseline(path: Path) -> Baseline:
    """Read a baseline: a JSON report written by ``--format json`` or ``--write-baseline``.

    Args:
        path: the report file.

    Returns:
        The findings it accepts, each at its worst recorded severity.

    Raises:
        InputError: the file is missing, not JSON, or not a bnaudit report.
    """
    doc = _read_report(path)
    command = str(doc.get("command", ""))
    headline = str(doc.get("headline") or _DEFAULT_HEADLINES.get(command, ""))
    metrics = _layer_metrics(doc, headline)
    accepted: dict[FindingKey, Accepted] = {}
    for index, entry in enumerate(doc["findings"]):
        key, severity = _parse_finding(entry, index, path)
        metric = metrics.get((key[1], key[2])) if FindingKind(key[0]) in MEASURED_KINDS else None
        previous = accepted.get(key)
        if previous is None or severity.rank > previous.severity.rank:
            accepted[key] = Accepted(severity, metric)
    return Baseline(path, command, accepted, headline)


def _is_worse(finding: Finding, known: Accepted, metric: float | None) -> bool:
    if finding.severity.rank > known.severity.rank:
        return True
    if finding.kind in MEASURED_KINDS and metric is not None and known.metric is not None:
        return metric > known.metric * (1.0 + METRIC_TOLERANCE) + 1e-12
    return False


def apply_baseline(report: Report, baseline: Baseline) -> Report:
    """Mark the findings ``baseline`` accepts (``Finding.baselined``): reported, but not failing the gate.

    Returns:
        A copy of ``report`` whose accepted findings are marked, with ``baseline`` saying which
        file was applied and how many findings it accepted.
    """
    if baseline.command and baseline.command != report.command.value:
        log.warning(
            "%s is a baseline of 'bnaudit %s', applied to 'bnaudit %s': findings match only if they have the "
            "same kind and location",
            baseline.path,
            baseline.command,
            report.command.value,
        )
    headline = baseline.headline or report.headline
    metrics = {(row.state_dict, row.name): row.metrics.get(headline) for row in report.layers if headline}
    marked = []
    for f in report.findings:
        known = baseline.accepted.get(key_of(f))
        value = metrics.get((f.state_dict or "", f.layer or "")) if f.layer is not None else None
        metric = float(value) if isinstance(value, int | float) else None
        accept = known is not None and not _is_worse(f, known, metric)
        marked.append(replace(f, baselined=accept) if accept != f.baselined else f)
    accepted = sum(f.baselined for f in marked)
    return replace(report, findings=tuple(marked), baseline=BaselineUse(str(baseline.path), accepted))


def baseline_document(doc: dict[str, Any]) -> dict[str, Any]:
    """What ``--write-baseline`` writes: the JSON report ``doc``, less its per-channel arrays.

    The result is still a valid JSON report (so either can serve as a baseline), but small and stable
    enough to commit: it keeps what matching needs — findings, and the layers' metrics.
    """
    slim = dict(doc)
    slim["layers"] = [
        {k: v for k, v in row.items() if not isinstance(v, list)} for row in doc.get("layers", [])
    ]
    slim.pop("channels", None)
    slim.pop("baseline", None)
    slim["findings"] = [{**f, "baselined": False} for f in doc.get("findings", [])]
    return slim
