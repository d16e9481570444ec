"""``bnaudit recalibrate``: exact population statistics on data, written into a copy of the checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from bnaudit.cli.calibration_run import build_spec, in_worker, is_rank_zero, launch_workers, process_group
from bnaudit.cli.model_options import model_options, progress_printer
from bnaudit.cli.options import key_option, repair_report_options, write_report_text
from bnaudit.report import OutputFormat, render
from bnaudit.report.model import FailOn, Report


def _refuse_unsafe(checkpoint: str, allow: bool) -> Report | None:
    """The report that refuses a checkpoint whose pickle references dangerous callables, or None."""
    from bnaudit.bn.pickle_policy import pickle_findings
    from bnaudit.checkpoint import load_checkpoint
    from bnaudit.report.model import FindingKind, InputInfo, sort_findings
    from bnaudit.report.sections import Command, RecalibrationOutcome

    ckpt = load_checkpoint(checkpoint)
    findings = pickle_findings(ckpt.globals, checkpoint)
    if allow or not any(f.kind is FindingKind.UNSAFE_PICKLE for f in findings):
        return None
    return Report(Command.RECALIBRATE, (InputInfo(checkpoint, ckpt.format),), {}, (), sort_findings(findings),
                  next_step="rerun with --allow-unsafe-input to repair it anyway (the payload stays)",
                  recalibration=RecalibrationOutcome(None, refused=True))  # fmt: skip


def _write(checkpoint: str, out: Path, ckpt: Any, passes: list[Any], spec: Any, report: Report) -> None:
    from bnaudit.checkpoint.provenance import header_entry, sidecar_path, sidecar_text
    from bnaudit.checkpoint.writer import write_patched
    from bnaudit.live.passes import statistic_patches

    def sidecar(result: Any) -> list[tuple[Path, str]]:
        record = {
            "command": "recalibrate",
            "inputs": [{"path": checkpoint, "sha256": result.reference_sha256}],
            "output": {"path": str(out), "sha256": result.output_sha256},
            "method": spec.method,
            "pass_options": {"channels_last": spec.channels_last, "amp": spec.amp,
                             "amp_dtype": spec.amp_dtype, "device": spec.device,
                             "stop_after_last_bn": spec.stop_after_last_bn},
            "model": spec.model, "model_args": spec.model_kwargs,
            "data": spec.data, "data_args": spec.data_kwargs,
            "batches": passes[0].result.batches, "samples": passes[0].result.samples,
            "world_size": passes[0].result.world_size,
            "layers": [{**row.to_dict(), "moved": row.metrics} for row in report.layers],
            "eval": report.recalibration.evals if report.recalibration else None,
        }  # fmt: skip
        return [(sidecar_path(out), sidecar_text(record))]

    world = passes[0].result.world_size if passes else 1
    write_patched(ckpt, statistic_patches(passes), out, metadata=header_entry("recalibrate", spec.method,
                  world, None), companions=sidecar)  # fmt: skip


def _emit(report: Report, output_format: str, report_file: Path | None, fail_on: str) -> None:
    write_report_text(render(report, OutputFormat(output_format), FailOn(fail_on)), report_file)


@click.command("recalibrate")
@click.argument("checkpoint")
@click.option(
    "-o",
    "--output",
    "out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="The checkpoint to write (required unless --dry-run). Never an input; an existing file "
    "needs --force.",
)
@click.option("--force", is_flag=True, help="Replace an existing output (never an input).")
@click.option("--dry-run", is_flag=True, help="Run the pass and show what would change; write nothing.")
@key_option
@model_options
@click.option(
    "--eval",
    "eval_spec",
    default=None,
    metavar="SPEC",
    help="A callable(model) -> dict of metrics, reported before and after recalibration.",
)
@click.option(
    "--allow-unsafe-input",
    is_flag=True,
    help="Repair even when the pickle references dangerous callables (the output keeps them).",
)
@repair_report_options
def recalibrate_command(
    checkpoint: str,
    out: Path | None,
    force: bool,
    dry_run: bool,
    key: str | None,
    eval_spec: str | None,
    allow_unsafe_input: bool,
    report_file: Path | None,
    output_format: str,
    fail_on: str,
    **params: Any,
) -> int:
    """Re-estimate the BatchNorm statistics of CHECKPOINT on --data and write them to -o OUT.

    For every layer: the exact mean and unbiased variance of its input over all calibration samples, with
    BatchNorm normalising by batch statistics and every other module in eval mode (dropout off). Every state
    dict that fits --model gets its own pass (model and EMA copies). OUT is CHECKPOINT with only those
    statistics' bytes replaced, plus a provenance file OUT.bnaudit.json. Runs on several processes with
    --nproc N or under torchrun (rank 0 writes).
    """
    from bnaudit.checkpoint.provenance import sidecar_path
    from bnaudit.checkpoint.writer import check_output_path

    if out is None and not dry_run:
        raise click.UsageError("give -o OUT (the recalibrated checkpoint to write) or --dry-run")
    if out is not None and not dry_run:
        check_output_path(out, [Path(checkpoint)], force, companions=(sidecar_path(out),))
    if params["nproc"] > 1 and not in_worker():
        return launch_workers(params["nproc"])  # before the imports below: the workers do them
    from bnaudit.live.passes import recalibration_report, run_passes

    refused = _refuse_unsafe(checkpoint, allow_unsafe_input)
    if refused is not None:
        if is_rank_zero():
            _emit(refused, output_format, report_file, fail_on)
            click.echo(f"bnaudit: {checkpoint}: refused: its pickle references dangerous callables; nothing "
                       "was written", err=True)  # fmt: skip
        return 1
    spec = build_spec(params, eval_spec)
    with process_group(spec.device):
        progress = progress_printer(not params["quiet"] and is_rank_zero())
        ckpt, passes = run_passes(checkpoint, spec, key=key, write=True, progress=progress)
        target = None if dry_run or out is None else str(out)
        report = recalibration_report(
            checkpoint,
            ckpt,
            passes,
            output=target,
            settings={"method": spec.method, "data": spec.data, "model": spec.model},
        )
        if not is_rank_zero():
            return 1 if report.verdict(FailOn(fail_on)) == "fail" else 0
        if target is not None and out is not None:
            _write(checkpoint, out, ckpt, passes, spec, report)
        _emit(report, output_format, report_file, fail_on)
        if target is not None and (report_file is not None or output_format != "table"):
            click.echo(f"bnaudit: wrote {out} (provenance: {out}.bnaudit.json)", err=True)
        return 1 if report.verdict(FailOn(fail_on)) == "fail" else 0
