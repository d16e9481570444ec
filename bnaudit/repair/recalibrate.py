"""``recalibrate`` at checkpoint level: new statistics measured on data, patched into a copy of the file."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bnaudit.audit.measured import (
    RECALIBRATE_COLUMNS,
    calibration_data,
    nonfinite_finding,
    pass_layer_row,
    skipped_calls_finding,
    unreached_finding,
)
from bnaudit.bn.archive_policy import checkpoint_findings
from bnaudit.bn.corrupt_pickle import load_or_unsafe
from bnaudit.checkpoint import load_checkpoint
from bnaudit.checkpoint.bytesource import shown
from bnaudit.checkpoint.provenance import header_entry, sidecar_path, sidecar_text
from bnaudit.checkpoint.remote_folder_write import write_repair
from bnaudit.checkpoint.types import Checkpoint
from bnaudit.checkpoint.writer import TensorPatch, WriteResult, check_output_path
from bnaudit.errors import NonFiniteStatisticsError, UsageError
from bnaudit.live.launch import is_rank_zero
from bnaudit.live.methods import RecalibrationMethod
from bnaudit.live.options import CalibrationSpec, ProgressCallback
from bnaudit.live.passes import StateDictPass, run_passes
from bnaudit.repair.options import WriteOptions
from bnaudit.report.model import Finding, FindingKind, InputInfo, LayerRow, Report, Severity, sort_findings
from bnaudit.report.sections import Command, RecalibrationOutcome

UNSAFE_REASON = "its pickle references dangerous callables"
NONFINITE_REASON = "the new statistics are not finite"


@dataclass(frozen=True)
class CheckpointRecalibrationResult:
    """What :func:`recalibrate_checkpoint` did.

    Attributes:
        report: the Report (command ``recalibrate``): one row per layer, how far its statistics moved.
        output: the checkpoint written, or None (dry run, refused, or not rank 0 of a group).
        sidecar: the provenance file written next to it, or None.
        refused: True when nothing was written because of an error finding: an unsafe pickle (found before
            any pass) or new statistics that are NaN / Inf (the report says which layer and channel).
        passes: one pass per state dict that fits the model (empty when refused).
        reason: why it was refused, in a few words ("" when it was not).
    """

    report: Report
    output: Path | None
    sidecar: Path | None
    refused: bool
    passes: tuple[StateDictPass, ...]
    reason: str = ""


def recalibrate_checkpoint(
    path: str | Path,
    spec: CalibrationSpec,
    out: str | Path | None = None,
    *,
    write: WriteOptions | None = None,
    progress: ProgressCallback | None = None,
) -> CheckpointRecalibrationResult:
    """Re-estimate the BatchNorm statistics of a checkpoint on data and write them into a copy of it.

    Every state dict that fits ``spec.model`` (model and EMA copies) gets its own pass over ``spec.data``
    (see :func:`bnaudit.live.recalibrate.recalibrate`): for every layer the exact mean and unbiased variance
    of its input (``population``) or the batch-mean estimate. The output is the checkpoint with only those
    statistics' bytes replaced (:func:`bnaudit.checkpoint.writer.write_patched`), plus a provenance sidecar
    ``OUT.bnaudit.json``. Under torch.distributed every rank runs the passes on its share; rank 0 writes.

    Args:
        path: the checkpoint (read with the inert reader; never written).
        spec: model, data and pass options.
        out: the checkpoint to write (None only with ``write.dry_run``).
        write: force / dry run / unsafe input (default: :class:`WriteOptions`).
        progress: called after each local batch.

    Returns:
        A :class:`CheckpointRecalibrationResult`; ``refused`` when the pickle references dangerous
        callables and ``write.allow_unsafe_input`` is off (nothing run, nothing written).

    Raises:
        UsageError: no ``out`` without a dry run.
        OutputError: ``out`` is an input, exists without ``force``, or its folder is missing.
        ModelMismatchError / InputError: no state dict fits the model, bad specs, data or batches.

    New statistics that are NaN / Inf are never written: the result is ``refused`` with an error finding
    naming the layer and channel.
    """
    write = write or WriteOptions()
    target = None if write.dry_run or out is None else Path(out)
    if out is None and not write.dry_run:
        raise UsageError(
            "no output checkpoint given", fix="give -o OUT (the recalibrated checkpoint) or --dry-run"
        )
    if target is not None and is_rank_zero():
        check_output_path(target, [Path(path)], write.force, companions=(sidecar_path(target),))
    refusal = _refusal(str(path), write.allow_unsafe_input)
    if refusal is not None:
        return CheckpointRecalibrationResult(refusal, None, None, True, (), UNSAFE_REASON)
    try:
        ckpt, passes = run_passes(path, spec, write=True, progress=progress)
    except NonFiniteStatisticsError as exc:
        report = _nonfinite_refusal(str(path), exc)
        return CheckpointRecalibrationResult(report, None, None, True, (), NONFINITE_REASON)
    settings = {"method": spec.method, "data": spec.data, "model": spec.model}
    report = _recalibration_report(str(path), ckpt, passes, None if target is None else str(out), settings)
    if target is None or not is_rank_zero():
        return CheckpointRecalibrationResult(report, None, None, False, tuple(passes))
    report = _with_upload(report, _write(str(path), (target, write.force), (ckpt, passes), spec, report))
    return CheckpointRecalibrationResult(report, target, sidecar_path(target), False, tuple(passes))


def _with_upload(report: Report, upload: str | None) -> Report:
    """The report with the upload path a URL output took (server-side copy, or upload) recorded."""
    if upload is None or report.recalibration is None:
        return report
    return dataclasses.replace(report, recalibration=dataclasses.replace(report.recalibration, upload=upload))


def _nonfinite_refusal(display: str, exc: NonFiniteStatisticsError) -> Report:
    """The report that refuses to write NaN / Inf statistics (nothing was written)."""
    ckpt = load_checkpoint(display)
    return Report(Command.RECALIBRATE, (InputInfo(display, ckpt.format),), {}, (),
                  (nonfinite_finding(display, exc),), recalibration=RecalibrationOutcome(None, refused=True),
                  next_step="fix the calibration data or the model, then rerun")  # fmt: skip


# Findings that refuse the write unless --allow-unsafe-input: a payload the output would carry along.
_REFUSED_KINDS = (FindingKind.UNSAFE_PICKLE, FindingKind.AMBIGUOUS_ARCHIVE)


def _refusal(display: str, allow: bool) -> Report | None:
    """The report that refuses a checkpoint whose pickle references dangerous callables, or None."""
    ckpt = load_or_unsafe(display, display)
    findings = checkpoint_findings(ckpt, display)
    if allow or not any(f.kind in _REFUSED_KINDS for f in findings):
        return None
    return Report(Command.RECALIBRATE, (InputInfo(display, ckpt.format),), {}, (), sort_findings(findings),
                  next_step="rerun with --allow-unsafe-input to repair it anyway (the payload stays)",
                  recalibration=RecalibrationOutcome(None, refused=True))  # fmt: skip


def _recalibration_report(
    display: str,
    ckpt: Checkpoint,
    passes: Sequence[StateDictPass],
    output: str | None,
    settings: dict[str, Any],
) -> Report:
    """The before/after table of ``bnaudit recalibrate``: how far each layer moved (KL of new vs old)."""
    rows: list[LayerRow] = []
    findings: list[Finding] = checkpoint_findings(ckpt, display)
    for p in passes:
        for layer in p.result.layers:
            if not layer.reached:
                findings.append(unreached_finding(display, p.state_dict.name, layer.name, changed=True))
                rows.append(pass_layer_row(p.state_dict.name, layer, Severity.WARN))
                continue
            if layer.single_calls and p.result.method == RecalibrationMethod.BATCH_MEAN.value:
                findings.append(skipped_calls_finding(display, p.state_dict.name, layer))
            rows.append(pass_layer_row(p.state_dict.name, layer, Severity.OK))
    rows.sort(key=lambda r: -float(r.metrics.get("max_kl") or 0.0))
    evals = {p.state_dict.name: {"before": p.metrics_before, "after": p.metrics_after}
             for p in passes if p.metrics_before is not None}  # fmt: skip
    return Report(
        command=Command.RECALIBRATE,
        inputs=(InputInfo(display, ckpt.format, None, tuple(p.state_dict.name for p in passes)),),
        settings=settings or {},
        layers=tuple(rows),
        findings=sort_findings(findings),
        headline="max_kl",
        columns=RECALIBRATE_COLUMNS,
        calibration=calibration_data(passes),
        recalibration=RecalibrationOutcome(output, evals),
    )


def statistic_patches(passes: Sequence[StateDictPass]) -> list[TensorPatch]:
    """The writer's patches: new ``running_mean`` / ``running_var`` of each reached layer, by original key."""
    patches = []
    for p in passes:
        for layer in p.result.layers:
            if not layer.reached:
                continue
            for buffer, values in (("running_mean", layer.after_mean), ("running_var", layer.after_var)):
                key = p.checkpoint_key(layer.name, buffer)
                ref = p.state_dict.tensors[key]
                patches.append(TensorPatch(p.state_dict.name, key, ref, np.asarray(values, dtype=np.float64)))
    return patches


def _write(
    checkpoint: str,
    output: tuple[Path, bool],
    measured: tuple[Checkpoint, list[StateDictPass]],
    spec: CalibrationSpec,
    report: Report,
) -> str | None:
    """Write the recalibrated checkpoint and its sidecar; the upload path taken for a URL output."""
    ckpt, passes = measured
    out, force = output
    options = spec.options

    def sidecar(result: WriteResult) -> list[tuple[Path, str]]:
        record = {
            "command": "recalibrate",
            "inputs": [{"path": checkpoint, "sha256": result.reference_sha256}],
            "output": {"path": shown(out), "sha256": result.output_sha256,
                       **({"upload": result.upload} if result.upload else {})},
            "method": spec.method,
            "pass_options": {"channels_last": options.channels_last, "amp": options.amp,
                             "amp_dtype": options.amp_dtype, "device": options.device,
                             "stop_after_last_bn": options.stop_after_last_bn,
                             "mode": options.chosen_mode.value, "passes": passes[0].result.passes,
                             "resident_batches": options.resident_batches},
            "model": spec.model, "model_args": spec.model_kwargs,
            "data": spec.data, "data_args": spec.data_kwargs,
            "batches": passes[0].result.batches, "samples": passes[0].result.samples,
            "world_size": passes[0].result.world_size,
            "layers": [{**row.to_dict(), "moved": row.metrics} for row in report.layers],
            "eval": report.recalibration.evals if report.recalibration else None,
        }  # fmt: skip
        return [(sidecar_path(out), sidecar_text(record))]

    world = passes[0].result.world_size if passes else 1
    written = write_repair(ckpt, statistic_patches(passes), out, metadata=header_entry("recalibrate",
                           spec.method, world, None), companions=sidecar, replace_existing=force)  # fmt: skip
    return written.upload
