"""The SARIF 2.1.0 report, for code-scanning services: a rule per finding kind, a result per finding."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from bnaudit import __version__
from bnaudit.report.locations import as_uri_reference, finding_file, relative_path, repository_root
from bnaudit.report.model import FailOn, Finding, FindingKind, Report, Severity

SARIF_VERSION = "2.1.0"
SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
INFORMATION_URI = "https://pypi.org/project/bnaudit/"
SRCROOT = "%SRCROOT%"
FINGERPRINT_KEY = "bnauditFinding/v1"

_LEVELS = {Severity.ERROR: "error", Severity.WARN: "warning", Severity.INFO: "note", Severity.OK: "none"}

# kind -> (short description, full description, default level). Every FindingKind needs an entry: the
# rules are the closed list of kinds, in enum order, so that rule indices are stable across runs.
RULES: dict[FindingKind, tuple[str, str, str]] = {
    FindingKind.DIVERGENCE: (
        "BatchNorm statistics diverge across DDP ranks",
        "A layer's running statistics on one rank are far from the statistics pooled over all ranks "
        "(KL(N(pooled) || N(rank)) at or above --warn-kl / --error-kl): the checkpoint normalises with "
        "statistics of one rank's data only. Average or recalibrate the statistics before deploying.",
        "error",
    ),
    FindingKind.WEIGHTS_DIFFER: (
        "A parameter differs across ranks",
        "DDP keeps parameters identical on every rank; a difference means the files are not the ranks of "
        "one step of one run.",
        "error",
    ),
    FindingKind.COUNTER_MISMATCH: (
        "num_batches_tracked differs across ranks",
        "Ranks of one DDP step take the same number of steps; the files may come from different steps.",
        "warning",
    ),
    FindingKind.NONFINITE: (
        "NaN or Inf BatchNorm statistics",
        "running_mean or running_var holds NaN or Inf: eval-mode outputs of the layer are garbage.",
        "error",
    ),
    FindingKind.NEGATIVE_VARIANCE: (
        "Negative running variance",
        "running_var holds a negative value: the layer divides by the square root of a negative number.",
        "error",
    ),
    FindingKind.TINY_VARIANCE: (
        "Tiny running variance",
        "running_var is below 1e-3 x eps: eval outputs are amplified up to 1/sqrt(eps) (harmless for dead "
        "channels).",
        "warning",
    ),
    FindingKind.NEVER_UPDATED: (
        "BatchNorm layer never updated",
        "The statistics are still at their reset values (mean 0, var 1) or the counter is 0: the layer "
        "never ran in train mode.",
        "warning",
    ),
    FindingKind.MALFORMED_LAYER: (
        "Malformed BatchNorm layer",
        "The layer's tensors have mismatched shapes or non-floating statistics; it cannot normalise.",
        "error",
    ),
    FindingKind.UNSAFE_PICKLE: (
        "The checkpoint's pickle would run code",
        "The pickle references a dangerous callable that torch.load(weights_only=False) would call. bnaudit "
        "read the file without executing it; do not torch.load it.",
        "error",
    ),
    FindingKind.SUSPICIOUS_PICKLE: (
        "The checkpoint's pickle references a non-tensor global",
        "torch.load(weights_only=True) refuses such files and weights_only=False would import the module.",
        "warning",
    ),
    FindingKind.NO_BATCHNORM: (
        "No BatchNorm layers",
        "No keys ending in running_mean and running_var: nothing to audit. Check the file or --key.",
        "warning",
    ),
    FindingKind.DRIFT: (
        "Stored statistics differ from the data's",
        "The checkpoint's running statistics differ from statistics measured on the data given to "
        "bnaudit drift; recalibrate before deploying.",
        "error",
    ),
    FindingKind.UNREACHED_LAYER: (
        "Recalibration never reached a layer",
        "No batch passed through the layer during recalibration, so its statistics were not re-estimated.",
        "warning",
    ),
    FindingKind.NO_CHECKSUM: (
        "The checkpoint stores no checksums",
        "The torch zip was written without CRC-32s (compute_crc32 = False): bnaudit read its bytes "
        "unverified.",
        "note",
    ),
    FindingKind.SKIPPED_CALLS: (
        "Batch-mean recalibration skipped single-value calls",
        "Some calls reached the layer with one value per channel (no unbiased variance); the batch-mean "
        "estimate averages the other calls only.",
        "note",
    ),
    FindingKind.PRECISION_OVERFLOW: (
        "BatchNorm statistics overflow the deploy dtype",
        "A running statistic or the scale/shift folded from it becomes infinite when the model is cast to "
        "the deploy dtype (fp16: above 65504).",
        "error",
    ),
    FindingKind.PRECISION_UNDERFLOW: (
        "BatchNorm statistics underflow the deploy dtype",
        "A running statistic or the scale/shift folded from it falls below the deploy dtype's normal range "
        "and loses more than the documented bound (or becomes zero).",
        "warning",
    ),
    FindingKind.COUNTER_ANOMALY: (
        "BatchNorm update counters disagree with the training",
        "num_batches_tracked differs between layers or from the step counts the checkpoint stores "
        "(double forward, gradient accumulation, layers frozen or left in train mode).",
        "warning",
    ),
    FindingKind.STALE_COPY: (
        "An EMA/SWA copy's BatchNorm statistics do not belong to its weights",
        "A second copy of the model holds statistics copied from the live model, still at their initial "
        "values, or not recomputed after averaging.",
        "warning",
    ),
    FindingKind.FROZEN_CHANGED: (
        "A frozen BatchNorm layer changed",
        "diff --frozen: the statistics, counter or affine parameters of a layer meant to be frozen differ "
        "between the two checkpoints.",
        "error",
    ),
    FindingKind.AMBIGUOUS_ARCHIVE: (
        "The archive reads differently in torch.load and in Python's zipfile",
        "torch.load's zip reader and Python's zipfile (used by scanners) would locate different members: "
        "a scanner may pass one pickle while torch.load runs another. bnaudit scanned every pickle either "
        "could read; do not trust or torch.load the file.",
        "error",
    ),
}

_SECURITY_SEVERITY = {
    FindingKind.UNSAFE_PICKLE: "9.0",
    FindingKind.AMBIGUOUS_ARCHIVE: "8.0",
    FindingKind.SUSPICIOUS_PICKLE: "5.0",
}


def _rule_name(kind: FindingKind) -> str:
    return "".join(part.capitalize() for part in re.split(r"[-_]", kind.value))


def _rule(kind: FindingKind) -> dict[str, Any]:
    short, full, level = RULES[kind]
    properties: dict[str, Any] = {"tags": ["batchnorm", "checkpoint"]}
    if kind in _SECURITY_SEVERITY:
        properties = {"tags": ["security", "checkpoint"], "security-severity": _SECURITY_SEVERITY[kind]}
    return {
        "id": kind.value,
        "name": _rule_name(kind),
        "shortDescription": {"text": short},
        "fullDescription": {"text": full},
        "help": {"text": f"{full} See the bnaudit README, 'Finding kinds'."},
        "defaultConfiguration": {"level": level},
        "properties": properties,
    }


def fingerprint(finding: Finding) -> str:
    """A stable identity of a finding: kind, state dict, layer or tensor, rank — never the file path."""
    where = finding.layer if finding.layer is not None else finding.tensor
    parts = (finding.kind.value, finding.state_dict or "", where or "", finding.rank)
    key = "|".join(str(part) for part in parts)
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _result(
    finding: Finding, report: Report, rule_index: int, baseline_used: bool, root: Path | None
) -> dict[str, Any]:
    result: dict[str, Any] = {
        "ruleId": finding.kind.value,
        "ruleIndex": rule_index,
        "level": _LEVELS[finding.severity],
        "message": {"text": finding.message},
        "partialFingerprints": {FINGERPRINT_KEY: fingerprint(finding)},
        "properties": {
            "stateDict": finding.state_dict,
            "layer": finding.layer,
            "tensor": finding.tensor,
            "rank": finding.rank,
            "channel": finding.channel,
        },
    }
    path = finding_file(finding, report)
    if path is not None:
        # Checkpoints are binary: the whole file is the location (line 1 keeps code-scanning services,
        # which expect a region, from rejecting the result).
        result["locations"] = [
            {
                "physicalLocation": {
                    "artifactLocation": {
                        "uri": as_uri_reference(relative_path(path, root)),
                        "uriBaseId": SRCROOT,
                    },
                    "region": {"startLine": 1},
                },
                "logicalLocations": [{"fullyQualifiedName": finding.location, "kind": "member"}]
                if finding.location
                else [],
            }
        ]
    if baseline_used:
        result["baselineState"] = "unchanged" if finding.baselined else "new"
    if finding.baselined:
        result["suppressions"] = [{"kind": "external", "justification": "accepted by the bnaudit baseline"}]
    return result


def report_to_sarif(report: Report, fail_on: FailOn) -> dict[str, Any]:
    """The SARIF log as a dict (what ``--format sarif`` prints)."""
    root = repository_root()  # looked up once, not once per finding
    kinds = list(FindingKind)
    baseline_used = report.baseline is not None
    results = [_result(f, report, kinds.index(f.kind), baseline_used, root) for f in report.findings]
    run: dict[str, Any] = {
        "tool": {
            "driver": {
                "name": "bnaudit",
                "version": __version__,
                "semanticVersion": __version__,
                "informationUri": INFORMATION_URI,
                "rules": [_rule(kind) for kind in kinds],
            }
        },
        "automationDetails": {"id": f"bnaudit/{report.command.value}/"},
        "invocations": [{"executionSuccessful": True}],
        "results": results,
        "properties": {
            "command": report.command.value,
            "verdict": report.verdict(fail_on),
            "failOn": fail_on.value,
        },
    }
    return {"$schema": SARIF_SCHEMA, "version": SARIF_VERSION, "runs": [run]}


def render(report: Report, fail_on: FailOn) -> str:
    """Render the report as an indented SARIF 2.1.0 log."""
    return json.dumps(report_to_sarif(report, fail_on), indent=2) + "\n"
