"""``average``: merge per-rank BatchNorm statistics into the reference checkpoint (the offline all-reduce)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bnaudit.audit.rank_reader import OpenedRank, UnsafeUnreadableRank, select_rank_state_dicts
from bnaudit.audit.scan import MeasureResult, PoolResult, measure_ranks, pool_ranks, with_transfers
from bnaudit.bn.archive_policy import checkpoint_findings
from bnaudit.bn.corrupt_pickle import unsafe_error
from bnaudit.bn.stats import MergeMethod
from bnaudit.checkpoint.bytesource import shown
from bnaudit.checkpoint.provenance import input_records, sidecar_path
from bnaudit.checkpoint.writer import TensorPatch, WriteResult
from bnaudit.repair.average_inputs import prepare_average
from bnaudit.repair.average_plan import AveragePlan, Sources
from bnaudit.repair.average_rows import (
    AVERAGE_COLUMNS,
    layer_record,
    layer_rows,
    merged_layers,
    patches,
    refusal,
)
from bnaudit.repair.average_write import write_average
from bnaudit.repair.options import AverageOptions
from bnaudit.report.model import Finding, LayerRow, Report, sort_findings
from bnaudit.report.sections import AverageOutcome, Command

log = logging.getLogger(__name__)
_DEFAULT_OPTIONS = AverageOptions()


@dataclass(frozen=True)
class AverageResult:
    """What :func:`average_checkpoints` did.

    Attributes:
        report: the Report (command ``average``): one row per merged layer, findings about the inputs.
        output: the checkpoint written, or None (dry run, or refused).
        sidecar: the provenance file written next to it, or None.
        refused: why nothing was written although the run was not a dry run (an error finding), else None.
        weights: the rank weights used (sample counts, or 1.0 each).
        patches: the new statistics, one per tensor rewritten (also for a dry run).
    """

    report: Report
    output: Path | None
    sidecar: Path | None
    refused: str | None
    weights: list[float]
    patches: list[TensorPatch]


def average_checkpoints(
    checkpoints: str | Path | Sequence[str | Path],
    out: str | Path | None,
    options: AverageOptions = _DEFAULT_OPTIONS,
) -> AverageResult:
    """Merge the BatchNorm statistics of per-rank checkpoints and write them into the reference checkpoint.

    The ranks are read through the rank scan (:mod:`bnaudit.audit.scan`), each once (memory: one rank's
    BatchNorm tensors plus a few float64 vectors per layer). Every state dict of the reference (or the one
    ``options.key`` names) gets, for each BatchNorm layer, the merge of the ranks' ``running_mean`` /
    ``running_var`` computed in float64 and written back in the tensor's own dtype; ``num_batches_tracked``
    and everything else keep the reference's bytes (see :func:`bnaudit.checkpoint.writer.write_patched`). A
    sidecar ``OUT.bnaudit.json`` records the provenance.

    Args:
        checkpoints: per-rank files or quoted glob patterns (one string or path is one argument); ranks come
            from the file names.
        out: the checkpoint to write (None only with ``dry_run``).
        options: see :class:`AverageOptions`.

    Returns:
        An AverageResult; ``refused`` is set when an error finding stopped the write.

    Raises:
        UsageError / InputError / ModelMismatchError / NoBatchNormError / OutputError: see the messages
            (exit 2).
        DtypeOverflowError: a merged value does not fit its dtype (nothing written).
        InternalError: the written file failed verification (nothing written).
    """
    prepared = prepare_average(checkpoints, out, options)
    plan, sources, method, out_path = prepared.plan, prepared.sources, prepared.method, prepared.out
    pooled, measured = _scan(plan, sources, options.allow_unsafe_input)
    if options.reference is not None:
        pooled = _with_reference_findings(pooled, sources)
    merged = merged_layers(plan, pooled, method)
    # The default reference is the first rank, whose statistics the scan has read already.
    old = pooled.first_stats if options.reference is None else None
    rows, row_findings = layer_rows(plan, merged, measured, old)
    findings = [*pooled.findings, *row_findings, *pooled.counter_findings]
    refused = refusal(findings, options.allow_unsafe_input)
    new_stats = patches(plan, merged)
    settings = _settings(plan, pooled, options, method, prepared.fmt)
    written: WriteResult | None = None
    dropped: list[str] = []
    if not options.dry_run and refused is None:
        assert out_path is not None
        record = _record(plan, pooled, rows, settings)
        written, dropped = write_average(
            sources.reference, new_stats, out_path, prepared.fmt, record, options.force
        )
    outcome = _Outcome((*prepared.warnings, *dropped), refused, written, out_path)
    report = _report(pooled, rows, findings, settings, outcome)
    sidecar = sidecar_path(out_path) if written and out_path else None
    refused_now = refused if not options.dry_run else None
    return AverageResult(
        report, out_path if written else None, sidecar, refused_now, list(pooled.weights), new_stats
    )


def _scan(plan: AveragePlan, sources: Sources, allow_unsafe: bool) -> tuple[PoolResult, MeasureResult]:
    """Both passes of the rank scan; a rank that is unsafe and unreadable is the unsafe-pickle error
    (exit 1), or with ``--allow-unsafe-input`` the layout error it causes."""
    rank0 = sources.files[0]
    first = OpenedRank(
        sources.rank0, select_rank_state_dicts(sources.rank0, rank0, None, plan.scan.state_dicts)
    )
    try:
        pooled = pool_ranks(plan.scan, first)
        return pooled, measure_ranks(plan.scan, pooled)
    except UnsafeUnreadableRank as exc:
        if allow_unsafe:
            raise exc.error from None
        raise unsafe_error(exc.findings, exc.rf.display, exc.error) from None


def _with_reference_findings(pooled: PoolResult, sources: Sources) -> PoolResult:
    extra = checkpoint_findings(sources.reference, sources.reference_display)
    return replace(pooled, findings=(*pooled.findings, *extra))


def _settings(
    plan: AveragePlan, pooled: PoolResult, options: AverageOptions, method: MergeMethod, fmt: str
) -> dict[str, Any]:
    ranks = len(plan.scan.files)
    weights = list(pooled.weights)
    unequal = weights != [1.0] * ranks
    source = "--rank-weights" if options.rank_weights else "metadata" if unequal else "equal"
    return {
        "method": method.value,
        "eps": options.eps,
        "key": options.key,
        "ignore": list(options.ignore),
        "ranks": ranks,
        "reference": plan.reference_display,
        "weights": weights,
        "weights_source": source,
        "to": fmt,
        "dry_run": options.dry_run,
    }


def _record(
    plan: AveragePlan, pooled: PoolResult, rows: list[LayerRow], settings: dict[str, Any]
) -> dict[str, Any]:
    """The provenance sidecar's record of the merge (the writer adds what it wrote)."""
    files = plan.scan.files
    weights = list(pooled.weights)
    return {
        "command": "average",
        "method": settings["method"],
        "eps": settings["eps"],
        "weights": weights,
        "weights_source": settings["weights_source"],
        "inputs": input_records(
            [f.display for f in files], [f.rank for f in files], weights, list(pooled.digests)
        ),
        "reference": {"path": plan.reference_display, "format": plan.reference_format},
        "layers": [layer_record(r, target) for r, target in zip(rows, plan.targets, strict=True)],
        "num_batches_tracked": "kept from the reference (never averaged)",
    }


@dataclass(frozen=True)
class _Outcome:
    warnings: tuple[str, ...]
    refused: str | None
    written: WriteResult | None
    out: Path | None


def _report(
    pooled: PoolResult,
    rows: list[LayerRow],
    findings: list[Finding],
    settings: dict[str, Any],
    outcome: _Outcome,
) -> Report:
    written, out = outcome.written, outcome.out
    return Report(
        command=Command.AVERAGE,
        inputs=with_transfers(pooled.inputs),
        settings=settings,
        layers=tuple(sorted(rows, key=lambda r: -(r.metrics.get("max_kl_before") or 0.0))),
        findings=sort_findings(findings),
        headline="max_kl_before",
        next_step=_next_step(outcome.refused, pooled.inputs[0].path),
        columns=AVERAGE_COLUMNS,
        warnings=outcome.warnings,
        average=AverageOutcome(
            output=shown(out) if written and out else None,
            sidecar=shown(sidecar_path(out)) if written and out else None,
            refused=outcome.refused,
            reference_sha256=written.reference_sha256 if written else None,
            output_sha256=written.output_sha256 if written else None,
            stats_sha256=pooled.digests,
            upload=written.upload if written else None,
        ),
    )


def _next_step(refused: str | None, first: str) -> str | None:
    if refused is None:
        return None
    return f"fix the inputs, then rerun bnaudit average (or bnaudit recalibrate {first} ...)"
