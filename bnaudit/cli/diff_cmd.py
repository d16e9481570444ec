"""``bnaudit diff``: how each BatchNorm layer changed between two checkpoints of one model."""

from __future__ import annotations

from pathlib import Path

import click

from bnaudit.audit.options import DiffOptions
from bnaudit.cli.bundles import option_bundle
from bnaudit.cli.options import emit_report, eps_option, ignore_option, key_option, report_options

DIFF_OPTIONS = (
    key_option,
    eps_option,
    ignore_option,
    click.option(
        "--frozen",
        multiple=True,
        metavar="PATTERN",
        help="Glob of layers meant to be frozen (repeatable): any change of their statistics, counter or "
        "affine parameters is an error (frozen-changed).",
    ),
)


@click.command("diff")
@click.argument("base")
@click.argument("checkpoint")
@option_bundle(DiffOptions, "options", DIFF_OPTIONS)
@report_options
def diff_command(
    base: str,
    checkpoint: str,
    options: DiffOptions,
    output_format: tuple[str, ...],
    output: tuple[Path, ...],
    fail_on: str,
) -> int:
    """Show how each BatchNorm layer changed from BASE to CHECKPOINT (two checkpoints of one model: before
    and after fine-tuning, or a repair): KL(N(base) || N(checkpoint)), mean shift, variance ratio, counter
    and affine changes. Layers given with --frozen must not change at all. Only BatchNorm tensors are read.
    """
    # The library is imported on use: --help and the other commands start without NumPy.
    from bnaudit.audit import diff

    report = diff.diff_checkpoints(base, checkpoint, options)
    return emit_report(report, output_format, output, fail_on)
