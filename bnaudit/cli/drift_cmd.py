"""``bnaudit drift``: do a checkpoint's stored statistics describe the data? (the one-checkpoint gate)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from bnaudit.cli.calibration_run import build_spec, in_worker, is_rank_zero, launch_workers, process_group
from bnaudit.cli.model_options import model_options, progress_printer
from bnaudit.cli.options import emit_report, ignore_option, key_option, report_options
from bnaudit.defaults import DEFAULT_DRIFT_ERROR_KL, DEFAULT_DRIFT_WARN_KL
from bnaudit.report.model import FailOn

_positive = click.FloatRange(min=0.0, min_open=True)


@click.command("drift")
@click.argument("checkpoint")
@key_option
@model_options
@click.option(
    "--warn-kl",
    type=_positive,
    default=DEFAULT_DRIFT_WARN_KL,
    show_default=True,
    help="A layer whose max KL(data || stored) reaches this is a warning (nats).",
)
@click.option(
    "--error-kl",
    type=_positive,
    default=DEFAULT_DRIFT_ERROR_KL,
    show_default=True,
    help="A layer whose max KL(data || stored) reaches this is an error (nats).",
)
@ignore_option
@report_options
def drift_command(
    checkpoint: str,
    key: str | None,
    warn_kl: float,
    error_kl: float,
    ignore: tuple[str, ...],
    output_format: tuple[str, ...],
    output: tuple[Path, ...],
    fail_on: str,
    **params: Any,
) -> int:
    """Measure the population statistics of every BatchNorm layer on --data and compare them with the
    statistics stored in CHECKPOINT, without writing anything.

    The metric is compare's: KL(N(data) || N(stored)), max over channels, per layer. Use it when only one
    checkpoint exists; run it on held-out data to see what deployment will see.
    """
    if params["nproc"] > 1 and not in_worker():
        return launch_workers(params["nproc"])
    if not 0 < warn_kl <= error_kl:
        raise click.UsageError(f"--warn-kl ({warn_kl}) must not be above --error-kl ({error_kl})")
    from bnaudit.live.passes import drift_report, run_passes

    spec = build_spec(params)
    with process_group(spec.device):
        progress = progress_printer(not params["quiet"] and is_rank_zero())
        ckpt, passes = run_passes(checkpoint, spec, key=key, write=False, progress=progress)
        report = drift_report(
            checkpoint, ckpt, passes, warn_kl=warn_kl, error_kl=error_kl, ignore=ignore,
            settings={"method": spec.method, "data": spec.data, "model": spec.model},
        )  # fmt: skip
        if not is_rank_zero():
            return 1 if report.verdict(FailOn(fail_on)) == "fail" else 0
        return emit_report(report, output_format, output, fail_on)
