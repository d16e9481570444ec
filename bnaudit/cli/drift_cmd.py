"""``bnaudit drift``: do a checkpoint's stored statistics describe the data? (the one-checkpoint gate)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import click

from bnaudit.audit.options import DriftThresholds
from bnaudit.cli.bundles import option_bundle
from bnaudit.cli.calibration_run import launch_if_asked
from bnaudit.cli.model_options import ModelOptions, model_options, progress_printer
from bnaudit.cli.options import (
    emit_report,
    factor_option,
    ignore_option,
    key_option,
    level_option,
    report_options,
)
from bnaudit.defaults import DEFAULT_DRIFT_ERROR_KL, DEFAULT_DRIFT_NOISE_RATIO, DEFAULT_DRIFT_WARN_KL
from bnaudit.live.launch import is_rank_zero
from bnaudit.optional import load, require
from bnaudit.report.model import FailOn


@dataclass(frozen=True)
class DriftGate:
    """``--warn-kl`` / ``--error-kl`` / ``--noise-ratio`` / ``--ignore``."""

    warn_kl: float = DEFAULT_DRIFT_WARN_KL
    error_kl: float = DEFAULT_DRIFT_ERROR_KL
    noise_ratio: float = DEFAULT_DRIFT_NOISE_RATIO
    ignore: tuple[str, ...] = ()


@dataclass(frozen=True)
class ReportOutputs:
    """``--format`` / ``-o`` / ``--fail-on`` of :data:`~bnaudit.cli.options.report_options`.

    ``--baseline`` / ``--write-baseline`` are read by the output step itself (``emit_report``) and never
    reach the command.
    """

    output_format: tuple[str, ...] = ()
    output: tuple[Path, ...] = ()
    fail_on: str = FailOn.ERROR.value


_GATE_OPTIONS = (
    level_option(
        "--warn-kl",
        DEFAULT_DRIFT_WARN_KL,
        "A layer whose mean KL(data || stored) is real (--noise-ratio) and this far above the data's own "
        "noise "
        "is a warning (nats).",
    ),
    level_option("--error-kl", DEFAULT_DRIFT_ERROR_KL, "... this far above the noise is an error (nats)."),
    factor_option(
        "--noise-ratio",
        DEFAULT_DRIFT_NOISE_RATIO,
        "A KL is real when it is at least this many times what the data sample's own noise gives (measured "
        "from the spread between its batches).",
    ),
    ignore_option,
)


@click.command("drift")
@click.argument("checkpoint")
@key_option
@model_options
@option_bundle(DriftGate, "gate", _GATE_OPTIONS)
@option_bundle(ReportOutputs, "outputs", (report_options,))
def drift_command(
    checkpoint: str, key: str | None, model: ModelOptions, gate: DriftGate, outputs: ReportOutputs
) -> int:
    """Measure the population statistics of every BatchNorm layer on --data and compare them with the
    statistics stored in CHECKPOINT, without writing anything.

    Per layer, the mean over channels of KL(N(data) || N(stored)) is set against what the data sample's own
    noise gives: a layer fails when its KL is real and large. Use it when only one checkpoint exists; run
    it on held-out data to see what deployment will see.
    """
    require("torch", where="bnaudit drift")  # found, not imported: the workers import it
    launched = launch_if_asked(model.nproc)  # before anything imports torch: the workers do
    if launched is not None:
        return launched
    if not 0 < gate.warn_kl <= gate.error_kl:
        raise click.UsageError(f"--warn-kl ({gate.warn_kl}) must not be above --error-kl ({gate.error_kl})")
    load("torch", where="bnaudit drift")  # a broken torch install is exit 2 too, not a bug
    from bnaudit.live.distributed import joined_process_group  # imports torch

    spec = model.calibration_spec(key)
    thresholds = DriftThresholds(gate.warn_kl, gate.error_kl, gate.ignore, gate.noise_ratio)
    with joined_process_group(model.device):
        progress = progress_printer(not model.quiet and is_rank_zero())
        from bnaudit.audit.drift import drift_checkpoint  # on use, like every command's library

        report = drift_checkpoint(checkpoint, spec, thresholds, progress=progress).report
    if not is_rank_zero():
        return 1 if report.verdict(FailOn(outputs.fail_on)) == "fail" else 0
    return emit_report(report, outputs.output_format, outputs.output, outputs.fail_on)
