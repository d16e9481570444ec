"""``bnaudit inspect``: the health of one or more checkpoints' BatchNorm statistics."""

from __future__ import annotations

from pathlib import Path

import click

from bnaudit.audit.options import InspectOptions
from bnaudit.bn.deploy_dtype import DeployDtype
from bnaudit.cli.bundles import option_bundle
from bnaudit.cli.options import (
    emit_report,
    eps_option,
    ignore_option,
    key_option,
    layer_option,
    report_options,
)

INSPECT_OPTIONS = (
    key_option,
    eps_option,
    ignore_option,
    layer_option,
    click.option(
        "--security", is_flag=True, help="List every global the file's pickles reference, classified."
    ),
    click.option(
        "--deploy-dtype",
        type=click.Choice([d.value for d in DeployDtype]),
        default=None,
        help="The dtype the model is deployed in: statistics (and the folded scale and shift) that "
        "overflow or underflow it are errors. Default: fp16 is checked, as warnings.",
    ),
)


@click.command("inspect")
@click.argument("checkpoints", nargs=-1, required=True)
@option_bundle(InspectOptions, "options", INSPECT_OPTIONS)
@report_options
def inspect_command(
    checkpoints: tuple[str, ...],
    output_format: tuple[str, ...],
    output: tuple[Path, ...],
    fail_on: str,
    options: InspectOptions,
) -> int:
    """Check the BatchNorm statistics of each CHECKPOINT: NaN/Inf, negative or tiny variance, layers never
    updated, malformed layers, statistics that do not survive the deploy dtype, update counters that
    disagree with each other or the stored steps, stale EMA/SWA copies — and what the file's pickle would
    import or run if torch.load-ed (nothing of it is executed here).

    CHECKPOINT is a torch file (.pt/.pth/.ckpt/.bin), a .safetensors file or a sharded index (*.index.json);
    quoted glob patterns are expanded.
    """
    # The library is imported on use: --help and the other commands start without NumPy.
    from bnaudit.audit import inspect

    report = inspect.inspect_checkpoints(list(checkpoints), options)
    return emit_report(report, output_format, output, fail_on)
