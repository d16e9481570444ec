"""``bnaudit compare``: divergence of BatchNorm statistics across per-rank checkpoints."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from bnaudit.audit.options import CompareOptions
from bnaudit.cli.bundles import option_bundle
from bnaudit.cli.options import (
    emit_report,
    eps_option,
    ignore_option,
    key_option,
    layer_option,
    plot_option,
    report_options,
)
from bnaudit.cli.shared_options import factor_option, level_option
from bnaudit.defaults import DEFAULT_ERROR_KL, DEFAULT_FLAT_FACTOR, DEFAULT_WARN_KL

F = TypeVar("F", bound=Callable[..., Any])


def _kl_option(name: str, default: float, level: str) -> Callable[[F], F]:
    return level_option(
        name,
        default,
        f"A layer whose mean KL(pooled || rank) over its channels reaches this is {level} (nats; flat "
        "layers: "
        "this times --flat-factor).",
    )


COMPARE_OPTIONS: tuple[Callable[[F], F], ...] = (
    key_option,
    eps_option,
    _kl_option("--warn-kl", DEFAULT_WARN_KL, "a warning"),
    _kl_option("--error-kl", DEFAULT_ERROR_KL, "an error"),
    factor_option(
        "--flat-factor",
        DEFAULT_FLAT_FACTOR,
        "Levels for layers over one value per sample (BatchNorm1d after a Linear) are this many times "
        "higher: "
        "their statistics are that much noisier.",
    ),
    ignore_option,
    click.option("--check-weights", is_flag=True, help="Also compare every other tensor across ranks."),
    click.option(
        "--allow-empty", is_flag=True, help="Pass, instead of failing, when the model has no BatchNorm."
    ),
    click.option(
        "--jobs",
        type=click.IntRange(min=1),
        default=1,
        show_default=True,
        help="Read up to this many rank files ahead in threads (helps on network or object storage).",
    ),
    layer_option,
)


@click.command("compare")
@click.argument("checkpoints", nargs=-1, required=True)
@option_bundle(CompareOptions, "options", COMPARE_OPTIONS)
@report_options
@plot_option
def compare_command(
    checkpoints: tuple[str, ...],
    options: CompareOptions,
    output_format: tuple[str, ...],
    output: tuple[Path, ...],
    fail_on: str,
) -> int:
    """Compare the BatchNorm statistics of per-rank CHECKPOINTS of one DDP run.

    Pass each rank's file, or a quoted pattern such as "ckpt_rank*.pt". The rank of a file is the number
    after 'rank' in its name (else its last number); the lowest rank is the reference. For every layer the
    ranks are pooled, and the headline number is the mean over the layer's channels of KL(N(pooled) ||
    N(rank)) — how wrong a rank's statistics are for the data of all ranks — for the worst rank.
    """
    # The library is imported on use: --help and the other commands start without NumPy.
    from bnaudit.audit import compare

    return emit_report(compare.compare_ranks(list(checkpoints), options), output_format, output, fail_on)
