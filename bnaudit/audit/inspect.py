"""``inspect``: the health of checkpoints' BatchNorm statistics and what their pickles reference."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from bnaudit.audit.layer_rows import finite_max, finite_min, no_layer_named
from bnaudit.audit.model_checks import model_findings
from bnaudit.audit.options import InspectOptions
from bnaudit.audit.precision import checkpoint_precision_findings
from bnaudit.audit.rank_reader import load_logged
from bnaudit.audit.read_state import ReadStateDict
from bnaudit.bn.archive_policy import checkpoint_findings
from bnaudit.bn.health import health_findings
from bnaudit.bn.layers import BnLayer, find_bn_layers, is_ignored
from bnaudit.bn.layerstats import LayerStats, layer_problem, read_layer
from bnaudit.bn.pickle_policy import global_uses
from bnaudit.checkpoint.discover import select_state_dicts
from bnaudit.checkpoint.rank_files import expand_arguments
from bnaudit.checkpoint.types import Checkpoint, StateDictRef
from bnaudit.report.model import Finding, FindingKind, InputInfo, LayerRow, Report, Severity, sort_findings
from bnaudit.report.sections import Column, Command, GlobalEntry

# The layer table's columns after name and status.
INSPECT_COLUMNS = (
    Column("channels", attribute="channels"),
    *(
        Column(title, metric)
        for title, metric in (
            ("max |mean|", "mean_abs_max"),
            ("min var", "var_min"),
            ("max var", "var_max"),
            ("batches", "num_batches_tracked"),
        )
    ),
)
_RECALIBRATE = {FindingKind.NONFINITE, FindingKind.NEGATIVE_VARIANCE, FindingKind.NEVER_UPDATED,
                FindingKind.TINY_VARIANCE}  # fmt: skip


def inspect_checkpoint(path: str | Path, options: InspectOptions = InspectOptions()) -> Report:
    """Audit the health of one checkpoint's BatchNorm statistics and what its pickle references.

    Args:
        path: the checkpoint file.
        options: see :class:`InspectOptions`.

    Returns:
        A Report with one row per layer and findings of kinds nonfinite, negative-variance, tiny-variance,
        never-updated, malformed-layer, no-batchnorm, unsafe-pickle, suspicious-pickle, no-checksum,
        precision-overflow, precision-underflow, counter-anomaly and stale-copy.

    Raises:
        UnsafePickleError: the pickle is corrupt after referencing a dangerous callable (exit 1).
        InputError: the file cannot be read, ``key`` or ``layer`` is not found.
    """
    display = str(path)
    ckpt = load_logged(path, display)
    sds = select_state_dicts(ckpt.state_dicts, options.key, source=str(ckpt.path))
    rows: list[LayerRow] = []
    findings: list[Finding] = checkpoint_findings(ckpt, display)
    if ckpt.crc32_absent:
        findings.append(_no_checksum_finding(display))
    channel_rows: list[dict[str, Any]] = []
    read: list[ReadStateDict] = []
    for sd in sds:
        layers: list[tuple[BnLayer, LayerStats]] = []
        for bn in (x for x in find_bn_layers(sd.tensors) if not is_ignored(x.name, options.ignore)):
            row, layer_findings, stats = _inspect_layer(sd, bn, options.eps, display)
            rows.append(row)
            findings.extend(layer_findings)
            if stats is not None:
                layers.append((bn, stats))
            if options.layer is not None and bn.name == options.layer and not channel_rows:
                channel_rows = _inspect_channels(read_layer(sd, bn, display))
        read.append(ReadStateDict(sd, tuple(layers)))
    findings += checkpoint_precision_findings(read, options.eps, options.deploy_dtype, display)
    findings += model_findings(ckpt, read, display)
    rows = _with_model_findings(rows, findings)
    if not rows:
        findings.append(_no_batchnorm_finding(display, sds))
    if options.layer is not None and not channel_rows:
        raise no_layer_named(options.layer, display, rows)
    rows.sort(key=lambda r: -r.severity.rank)
    return Report(
        command=Command.INSPECT,
        inputs=(InputInfo(display, ckpt.format, None, tuple(s.name for s in sds)),),
        settings=_settings(options),
        layers=tuple(rows),
        findings=sort_findings(findings),
        headline="var_min",
        next_step=_inspect_next_step(findings, display),
        channel_rows=tuple(channel_rows),
        columns=INSPECT_COLUMNS,
        globals=_globals_listing(ckpt) if options.security else None,
    )


def _settings(options: InspectOptions) -> dict[str, Any]:
    settings: dict[str, Any] = {"eps": options.eps, "key": options.key}
    settings.update(ignore=list(options.ignore), layer=options.layer)
    if options.deploy_dtype is not None:  # only when chosen: reports of a default run keep their settings
        settings["deploy_dtype"] = options.deploy_dtype.value
    return settings


def inspect_checkpoints(
    paths: str | Path | Sequence[str | Path], options: InspectOptions = InspectOptions()
) -> Report:
    """:func:`inspect_checkpoint` of each file (quoted glob patterns expanded), in one Report.

    Args:
        paths: checkpoint files or glob patterns.
        options: see :class:`InspectOptions`.

    Returns:
        The one file's Report, or a Report of every file's rows and findings, worst first.

    Raises:
        InputError: as :func:`inspect_checkpoint`; a pattern matches no file.
    """
    arguments = [paths] if isinstance(paths, (str, os.PathLike)) else paths
    reports = [inspect_checkpoint(p, options) for p in expand_arguments([str(a) for a in arguments])]
    if len(reports) == 1:
        return reports[0]
    first = reports[0]
    return replace(
        first,
        inputs=tuple(i for rep in reports for i in rep.inputs),
        layers=tuple(sorted((r for rep in reports for r in rep.layers), key=lambda r: -r.severity.rank)),
        findings=tuple(sorted((f for rep in reports for f in rep.findings), key=lambda f: -f.severity.rank)),
        next_step=next((rep.next_step for rep in reports if rep.next_step), None),
        channel_rows=tuple(row for rep in reports for row in rep.channel_rows),
        globals=_merged_globals(reports),
    )


def _merged_globals(reports: list[Report]) -> tuple[GlobalEntry, ...] | None:
    if all(rep.globals is None for rep in reports):
        return None
    return tuple(replace(entry, file=rep.inputs[0].path) for rep in reports for entry in rep.globals or ())


def _globals_listing(ckpt: Checkpoint) -> tuple[GlobalEntry, ...]:
    return tuple(GlobalEntry(u.qualname, u.safety.value, u.sources) for u in global_uses(ckpt.globals))


def _row_severity(findings: Iterable[Finding]) -> Severity:
    worst = max((f.severity for f in findings), key=lambda s: s.rank, default=Severity.OK)
    return Severity.OK if worst is Severity.INFO else worst


def _with_model_findings(rows: list[LayerRow], findings: list[Finding]) -> list[LayerRow]:
    """Rows raised to the worst warning or error about their layer (the counter and copy findings are made
    after the rows)."""
    worst: dict[tuple[str, str | None], Severity] = {}
    for f in findings:
        key = (f.state_dict or "", f.layer)
        counts = f.severity in (Severity.WARN, Severity.ERROR)
        if counts and f.severity.rank > worst.get(key, Severity.OK).rank:
            worst[key] = f.severity
    out = []
    for row in rows:
        severity = worst.get((row.state_dict, row.name), Severity.OK)
        out.append(replace(row, severity=severity) if severity.rank > row.severity.rank else row)
    return out


def _inspect_layer(
    sd: StateDictRef, bn: BnLayer, eps: float, display: str
) -> tuple[LayerRow, list[Finding], LayerStats | None]:
    problem = layer_problem(sd, bn)
    mean_ref = sd.tensors[bn.running_mean]
    channels = mean_ref.shape[0] if mean_ref.shape else 1
    if problem:
        finding = Finding(
            Severity.ERROR,
            FindingKind.MALFORMED_LAYER,
            f"layer '{bn.display_name}': {problem}; the layer cannot normalise — re-export the "
            "checkpoint from the model",
            file=display,
            state_dict=sd.name,
            layer=bn.name,
        )
        return LayerRow(bn.name, sd.name, Severity.ERROR, channels, {}), [finding], None
    stats = read_layer(sd, bn, display)
    found = health_findings(stats, eps, file=display, state_dict=sd.name, layer=bn.name)
    with np.errstate(invalid="ignore"):
        metrics: dict[str, float | int | None] = {
            "mean_abs_max": finite_max(np.abs(stats.mean)),
            "var_min": finite_min(stats.var),
            "var_max": finite_max(stats.var),
            "num_batches_tracked": stats.num_batches_tracked,
        }
    return LayerRow(bn.name, sd.name, _row_severity(found), stats.channels, metrics), found, stats


def _inspect_channels(stats: LayerStats) -> list[dict[str, Any]]:
    return [
        {
            "channel": c,
            "running_mean": float(stats.mean[c]),
            "running_var": float(stats.var[c]),
            "weight": None if stats.weight is None else float(stats.weight[c]),
            "bias": None if stats.bias is None else float(stats.bias[c]),
        }
        for c in range(stats.channels)
    ]


def _no_batchnorm_finding(display: str, sds: list[StateDictRef]) -> Finding:
    names = ", ".join(s.display_name for s in sds) or "none"
    return Finding(
        Severity.WARN,
        FindingKind.NO_BATCHNORM,
        f"no BatchNorm layers (keys ending in running_mean and running_var) in state dict(s) {names}; "
        "nothing to audit — check that this is the right file or --key",
        file=display,
    )


def _no_checksum_finding(display: str) -> Finding:
    return Finding(
        Severity.INFO,
        FindingKind.NO_CHECKSUM,
        "no CRC-32 stored (torch.save with compute_crc32 = False): the bytes were not verified, so "
        "corruption in the file would go unnoticed",
        file=display,
    )


def _inspect_next_step(findings: list[Finding], display: str) -> str | None:
    kinds = {f.kind for f in findings if f.severity in (Severity.WARN, Severity.ERROR)}
    if kinds & _RECALIBRATE:
        return f"bnaudit recalibrate {display} --model MODULE:FACTORY --data MODULE:LOADER -o fixed.pt"
    return None
