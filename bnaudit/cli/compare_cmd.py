"""``bnaudit compare``: divergence of BatchNorm statistics across per-rank checkpoints."""

from __future__ import annotations

from pathlib import Path

import click

from bnaudit.cli.options import (
    emit_report,
    eps_option,
    ignore_option,
    key_option,
    layer_option,
    plot_option,
    report_options,
)
from bnaudit.defaults import DEFAULT_ERROR_KL, DEFAULT_WARN_KL

_positive = click.FloatRange(min=0.0, min_open=True)


@click.command("compare")
@click.argument("checkpoints", nargs=-1, required=True)
@key_option
@eps_option
@click.option(
    "--warn-kl",
    type=_positive,
    default=DEFAULT_WARN_KL,
    show_default=True,
    help="A layer whose max KL(pooled || rank) reaches this is a warning (nats).",
)
@click.option(
    "--error-kl",
    type=_positive,
    default=DEFAULT_ERROR_KL,
    show_default=True,
    help="A layer whose max KL(pooled || rank) reaches this is an error (nats).",
)
@ignore_option
@click.option("--check-weights", is_flag=True, help="Also compare every other tensor across ranks.")
@click.option(
    "--allow-empty", is_flag=True, help="Pass, instead of failing, when the model has no BatchNorm."
)
@click.option(
    "--jobs",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Read up to this many rank files ahead in threads (helps on network or object storage).",
)
@layer_option
@report_options
@plot_option
def compare_command(
    checkpoints: tuple[str, ...],
    key: str | None,
    eps: float,
    warn_kl: float,
    error_kl: float,
    ignore: tuple[str, ...],
    check_weights: bool,
    allow_empty: bool,
    jobs: int,
    layer: str | None,
    output_format: tuple[str, ...],
    output: tuple[Path, ...],
    fail_on: str,
) -> int:
    """Compare the BatchNorm statistics of per-rank CHECKPOINTS of one DDP run.

    Pass each rank's file, or a quoted pattern such as "ckpt_rank*.pt". The rank of a file is the number
    after 'rank' in its name (else its last number); the lowest rank is the reference. For every layer the
    ranks are pooled, and the headline number is KL(N(pooled) || N(rank)) — how wrong a rank's statistics
    are for the data of all ranks — max over ranks and channels.
    """
    from bnaudit.audit.compare import compare_ranks

    report = compare_ranks(
        list(checkpoints),
        key=key,
        eps=eps,
        warn_kl=warn_kl,
        error_kl=error_kl,
        ignore=ignore,
        check_weights=check_weights,
        layer=layer,
        allow_empty=allow_empty,
        jobs=jobs,
    )
    return emit_report(report, output_format, output, fail_on)
