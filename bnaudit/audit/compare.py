"""``compare``: how far per-rank checkpoints' BatchNorm statistics diverge from their pooled statistics."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bnaudit.audit.causes import RankEvidence, compare_cause
from bnaudit.audit.compare_rows import COMPARE_COLUMNS, GateLevels, divergence_rows
from bnaudit.audit.options import CompareOptions
from bnaudit.audit.rank_reader import (
    OpenedRank,
    UnsafeUnreadableRank,
    model_signature,
    open_rank,
    unsafe_findings,
)
from bnaudit.audit.scan import MeasureResult, PoolResult, measure_ranks, pool_ranks, with_transfers
from bnaudit.audit.scan_plan import ScanPlan, ScanTexts, no_batchnorm_error, scan_layers
from bnaudit.audit.stored_config import stored_training
from bnaudit.bn.layers import find_bn_layers, is_ignored
from bnaudit.bn.layerstats import layer_problem
from bnaudit.checkpoint.formats import ContainerFormat, format_spec
from bnaudit.checkpoint.rank_files import RankFile, resolve_rank_files
from bnaudit.errors import InputError, NoBatchNormError, UsageError
from bnaudit.report.model import Finding, FindingKind, InputInfo, Report, Severity, sort_findings
from bnaudit.report.sections import Cause, Command

log = logging.getLogger(__name__)

DCP_NOTE = (
    "note: {path} is a torch.distributed.checkpoint folder: DCP saves one copy of each replicated tensor, so "
    "it holds one rank's BatchNorm statistics (per layer, possibly different ranks for running_mean and "
    "running_var), not every rank's; to compare ranks, save them with bnaudit.save_rank_stats and compare "
    "those files"
)
COMPARE_TEXTS = ScanTexts(
    mismatch_fix="compare only checkpoints of one training run and one step",
    affine_consequence="",
    counter_advice="DDP ranks take the same number of steps, so these files may come from different steps "
    "or runs",
)


def compare_ranks(
    checkpoints: str | Path | Sequence[str | Path], options: CompareOptions = CompareOptions()
) -> Report:
    """Compare per-rank checkpoints' BatchNorm statistics.

    Reads the ranks through the rank scan (:mod:`bnaudit.audit.scan`): the first pass checks that every
    rank holds the same model, compares affine weights (and with ``check_weights`` every other tensor) with
    the reference rank, and pools the statistics; the second measures how far each rank is from the pool.

    Args:
        checkpoints: per-rank files or quoted glob patterns (one string or path is one argument);
            ranks come from the file names (``rank3``).
        options: see :class:`CompareOptions`.

    Returns:
        A Report whose rows are ordered worst first (by max KL).

    Raises:
        InputError / ModelMismatchError / NoBatchNormError / UsageError: see the messages.
    """
    _check_thresholds(options)
    arguments = [checkpoints] if isinstance(checkpoints, (str, os.PathLike)) else checkpoints
    files, warnings = resolve_rank_files([str(p) for p in arguments])
    for w in warnings:
        log.warning(w)
    try:
        first = open_rank(files[0], options.key, None)
        plan = _plan(files, first, options)
        pooled = pool_ranks(plan, first)
    except UnsafeUnreadableRank as exc:
        return _unsafe_report(exc, files)
    warnings += _dcp_notes(pooled.inputs)
    findings = list(pooled.findings)
    if not plan.layers:
        try:
            findings.append(_no_batchnorm(plan, options))
        except NoBatchNormError as exc:
            unsafe = unsafe_findings(first.ckpt, files[0].display)
            if not unsafe:
                raise
            # An unsafe pickle is the verdict (exit 1), not the missing layers it comes with.
            return _unsafe_report(UnsafeUnreadableRank(files[0], first.ckpt, unsafe, exc), files)
    measured = measure_ranks(plan, pooled)
    limits = GateLevels(options.warn_kl, options.error_kl, options.flat_factor)
    pool = (pooled.equal.mean, pooled.equal.pooled_var)
    rows = divergence_rows(plan.layers, measured.layers, pool, files, limits, options.layer)
    ordered = sort_findings(_divergence_first([*findings, *rows.findings, *pooled.counter_findings]))
    return Report(
        command=Command.COMPARE,
        inputs=with_transfers(pooled.inputs),
        settings=_settings(options, len(files)),
        layers=rows.rows,
        findings=ordered,
        headline="gate_kl",
        next_step=_compare_next_step(files, ordered),
        channel_rows=rows.channel_rows,
        columns=COMPARE_COLUMNS,
        warnings=tuple(warnings),
        cause=_cause(plan, measured, pooled, first, limits),
    )


def _cause(
    plan: ScanPlan, measured: MeasureResult, pooled: PoolResult, first: OpenedRank, limits: GateLevels
) -> Cause | None:
    counter = next(iter(pooled.counter_findings), None)
    ranks = [rf.rank for rf in plan.files]
    stored = stored_training(first.ckpt.root)
    return compare_cause(RankEvidence(plan.layers, measured.layers, ranks, limits, counter, stored))


def _check_thresholds(options: CompareOptions) -> None:
    if not options.flat_factor >= 1:
        raise UsageError("must be at least 1", where="--flat-factor", found=str(options.flat_factor))
    if not 0 < options.warn_kl <= options.error_kl:
        raise UsageError(
            "must be positive and not above --error-kl",
            where="--warn-kl",
            expected=f"at most {options.error_kl}",
            found=str(options.warn_kl),
        )


def _settings(options: CompareOptions, ranks: int) -> dict[str, Any]:
    return {
        "eps": options.eps,
        "warn_kl": options.warn_kl,
        "error_kl": options.error_kl,
        "flat_factor": options.flat_factor,
        "key": options.key,
        "ignore": list(options.ignore),
        "check_weights": options.check_weights,
        "ranks": ranks,
    }


def _plan(files: list[RankFile], first: OpenedRank, options: CompareOptions) -> ScanPlan:
    """Every BatchNorm layer of the first rank's selected state dicts, checked, less the ignored ones."""
    pairs = []
    for sd in first.sds:
        for bn in find_bn_layers(sd.tensors):
            if is_ignored(bn.name, options.ignore):
                continue
            problem = layer_problem(sd, bn)
            if problem:
                raise InputError(
                    problem,
                    path=files[0].display,
                    where=f"layer '{bn.display_name}'",
                    fix="fix or --ignore it",
                )
            pairs.append((sd, bn))
    return ScanPlan(
        files=tuple(files),
        state_dicts=tuple(sd.name for sd in first.sds),
        signatures={sd.name: model_signature(sd) for sd in first.sds},
        layers=scan_layers(pairs),
        eps=options.eps,
        texts=COMPARE_TEXTS,
        jobs=options.jobs,
        # --check-weights compares every tensor, so each rank's own references are needed.
        reuse_layouts=not options.check_weights,
        check_weights=options.check_weights,
    )


def _no_batchnorm(plan: ScanPlan, options: CompareOptions) -> Finding:
    """The info finding for a model without BatchNorm, with --allow-empty; else the input error.

    Raises:
        NoBatchNormError: without ``allow_empty``.
    """
    display = plan.files[0].display
    if not options.allow_empty:
        raise no_batchnorm_error(
            display, plan.state_dicts, "compare", "check --key and --ignore, or pass --allow-empty"
        )
    return Finding(Severity.INFO, FindingKind.NO_BATCHNORM, "no BatchNorm layers to compare", file=display)


def _dcp_notes(inputs: Sequence[InputInfo]) -> list[str]:
    notes = [
        DCP_NOTE.format(path=i.path) for i in inputs if format_spec(i.format).format is ContainerFormat.DCP
    ]
    for note in notes:
        log.warning(note)
    return notes


def _divergence_first(findings: list[Finding]) -> list[Finding]:
    # Within one severity, divergence findings (already worst layer first) lead: they are the headline.
    return sorted(findings, key=lambda f: f.kind is not FindingKind.DIVERGENCE)


def _unsafe_report(exc: UnsafeUnreadableRank, files: list[RankFile]) -> Report:
    ckpt, rf = exc.ckpt, exc.rf
    return Report(
        command=Command.COMPARE,
        inputs=(InputInfo(rf.display, ckpt.format, rf.rank, tuple(s.name for s in ckpt.state_dicts)),),
        settings={"ranks": len(files)},
        layers=(),
        findings=sort_findings(exc.findings),
        headline="gate_kl",
        columns=COMPARE_COLUMNS,
        next_step=f"{rf.display} was not compared ({exc.error}); replace it with a file from a trusted "
        "source",
    )


def _compare_next_step(files: list[RankFile], findings: tuple[Finding, ...]) -> str | None:
    kinds = {f.kind for f in findings if f.severity is Severity.ERROR}
    if FindingKind.WEIGHTS_DIFFER in kinds:
        return "check that the files are the ranks of one step of one run before repairing them"
    if FindingKind.DIVERGENCE in kinds or FindingKind.NONFINITE in kinds:
        names = " ".join(f.display for f in files) if len(files) <= 2 else f'"{_common_pattern(files)}"'
        return (
            f"bnaudit average {names} -o averaged.pt   (or, better, bnaudit recalibrate {files[0].display} "
            "--model MODULE:FACTORY --data MODULE:LOADER -o fixed.pt)"
        )
    return None


def _common_pattern(files: list[RankFile]) -> str:
    first = files[0].display
    digits = str(files[0].rank)
    index = first.rfind(digits)
    return first[:index] + "*" + first[index + len(digits) :] if index >= 0 else first
