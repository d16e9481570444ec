"""``bnaudit recalibrate``: exact population statistics on data, written into a copy of the checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import click

from bnaudit.cli.bundles import option_bundle
from bnaudit.cli.calibration_run import launch_if_asked
from bnaudit.cli.model_options import ModelOptions, model_options, progress_printer
from bnaudit.cli.options import key_option, repair_report_options, write_report_text
from bnaudit.live.launch import is_rank_zero
from bnaudit.live.options import CalibrationSpec
from bnaudit.optional import load, require
from bnaudit.repair.options import WriteOptions
from bnaudit.report import OutputFormat, render
from bnaudit.report.model import FailOn, Report


@dataclass(frozen=True)
class OutputTarget:
    """``-o`` / ``--force`` / ``--dry-run``: where the recalibrated checkpoint goes."""

    out: Path | None = None
    force: bool = False
    dry_run: bool = False


@dataclass(frozen=True)
class RepairInputs:
    """``--eval`` / ``--allow-unsafe-input``."""

    eval_spec: str | None = None
    allow_unsafe_input: bool = False


@dataclass(frozen=True)
class RepairReport:
    """``--report`` / ``--format`` / ``--fail-on`` of a repairing command."""

    report_file: Path | None = None
    output_format: str = OutputFormat.TABLE.value
    fail_on: str = FailOn.ERROR.value

    def emit(self, report: Report) -> int:
        """Write the rendered report; the exit code its verdict gives."""
        write_report_text(
            render(report, OutputFormat(self.output_format), FailOn(self.fail_on)), self.report_file
        )
        return exit_code(report, self.fail_on)


def exit_code(report: Report, fail_on: str) -> int:
    """1 when the report fails the ``--fail-on`` gate, else 0."""
    return 1 if report.verdict(FailOn(fail_on)) == "fail" else 0


_TARGET_OPTIONS = (
    click.option(
        "-o",
        "--output",
        "out",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="The checkpoint to write (required unless --dry-run). Never an input; an existing file "
        "needs --force.",
    ),
    click.option("--force", is_flag=True, help="Replace an existing output (never an input)."),
    click.option("--dry-run", is_flag=True, help="Run the pass and show what would change; write nothing."),
)

_REPAIR_OPTIONS = (
    click.option(
        "--eval",
        "eval_spec",
        default=None,
        metavar="SPEC",
        help="A callable(model) -> dict of metrics, reported before and after recalibration.",
    ),
    click.option(
        "--allow-unsafe-input",
        is_flag=True,
        help="Repair even when the pickle references dangerous callables (the output keeps them).",
    ),
)


@click.command("recalibrate")
@click.argument("checkpoint")
@option_bundle(OutputTarget, "target", _TARGET_OPTIONS)
@key_option
@model_options
@option_bundle(RepairInputs, "inputs", _REPAIR_OPTIONS)
@option_bundle(RepairReport, "report", (repair_report_options,))
def recalibrate_command(
    checkpoint: str,
    target: OutputTarget,
    key: str | None,
    model: ModelOptions,
    inputs: RepairInputs,
    report: RepairReport,
) -> int:
    """Re-estimate the BatchNorm statistics of CHECKPOINT on --data and write them to -o OUT.

    For every layer: the exact mean and unbiased variance of its input over all calibration samples, with
    BatchNorm normalising by batch statistics and every other module in eval mode (dropout off). Every state
    dict that fits --model gets its own pass (model and EMA copies). OUT is CHECKPOINT with only those
    statistics' bytes replaced, plus a provenance file OUT.bnaudit.json. Runs on several processes with
    --nproc N or under torchrun (rank 0 writes).
    """
    require("torch", where="bnaudit recalibrate")  # found, not imported: the workers import it
    if target.out is None and not target.dry_run:
        raise click.UsageError("give -o OUT (the recalibrated checkpoint to write) or --dry-run")
    # Checked before the workers start, so a bad output costs nothing (imported here: NumPy comes with it).
    from bnaudit.cli.output_checks import check_repair_outputs

    check_repair_outputs(None if target.dry_run else target.out, report.report_file, target.force)
    launched = launch_if_asked(model.nproc)  # before anything imports torch: the workers do
    if launched is not None:
        return launched
    spec = model.calibration_spec(key, inputs.eval_spec)
    return _recalibrate_here(checkpoint, spec, (target, model, inputs), report)


def _recalibrate_here(
    checkpoint: str,
    spec: CalibrationSpec,
    parsed: tuple[OutputTarget, ModelOptions, RepairInputs],
    report: RepairReport,
) -> int:
    load("torch", where="bnaudit recalibrate")  # a broken torch install is exit 2 too, not a bug
    from bnaudit.live.distributed import joined_process_group  # imports torch

    target, model, inputs = parsed
    write = WriteOptions(
        force=target.force, dry_run=target.dry_run, allow_unsafe_input=inputs.allow_unsafe_input
    )
    with joined_process_group(model.device):
        progress = progress_printer(not model.quiet and is_rank_zero())
        from bnaudit.repair.recalibrate import recalibrate_checkpoint  # on use, like every command's library

        result = recalibrate_checkpoint(checkpoint, spec, target.out, write=write, progress=progress)
    if not is_rank_zero():
        return 1 if result.refused else exit_code(result.report, report.fail_on)
    if result.refused:
        report.emit(result.report)
        click.echo(f"bnaudit: {checkpoint}: refused: {result.reason}; nothing was written", err=True)
        return 1
    code = report.emit(result.report)
    if result.output is not None and (report.report_file is not None or report.output_format != "table"):
        click.echo(f"bnaudit: wrote {target.out} (provenance: {target.out}.bnaudit.json)", err=True)
    return code
