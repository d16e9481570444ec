"""``bnaudit average``: merge per-rank BatchNorm statistics into one checkpoint (the offline all-reduce)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from bnaudit.cli.bundles import option_bundle
from bnaudit.cli.options import eps_option, ignore_option, repair_report_options, write_report_text
from bnaudit.defaults import CONVERSION_FORMATS, MERGE_METHODS
from bnaudit.errors import UsageError
from bnaudit.repair.options import AverageOptions
from bnaudit.report import OutputFormat, render
from bnaudit.report.model import FailOn

if TYPE_CHECKING:
    from bnaudit.repair.average import AverageResult


def parse_weights(text: str | None) -> list[float] | None:
    """``"3,3,3,2"`` -> [3.0, 3.0, 3.0, 2.0]; None stays None.

    Raises:
        UsageError: an item is not a number.
    """
    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise UsageError(
            f"{text!r} is not a list of numbers",
            where="--rank-weights",
            expected="comma-separated sample counts, one per rank (e.g. 3,3,3,2)",
        ) from None


def _weights_callback(_ctx: click.Context, _param: click.Parameter, value: str | None) -> list[float] | None:
    # --rank-weights reaches AverageOptions parsed, so the command passes the bundle straight through.
    return parse_weights(value)


AVERAGE_OPTIONS = (
    click.option(
        "--method",
        type=click.Choice(list(MERGE_METHODS)),
        default=MERGE_METHODS[0],
        show_default=True,
        help="pooled: law of total variance (the variance of all ranks' data); mean: mean of running_var.",
    ),
    click.option(
        "--rank-weights",
        metavar="N,N,...",
        default=None,
        callback=_weights_callback,
        help="Per-rank sample counts in rank order (uneven shards), e.g. 3,3,3,2. Default: counts recorded "
        "by save_rank_stats, else equal.",
    ),
    click.option("--key", metavar="PATH", default=None, help="Merge only this state dict of the reference."),
    click.option(
        "--reference",
        type=click.Path(dir_okay=True, path_type=Path),
        help="The checkpoint to copy and patch (default: the lowest rank), e.g. rank 0's full checkpoint "
        "when the ranks are save_rank_stats files.",
    ),
    click.option(
        "--to",
        type=click.Choice(list(CONVERSION_FORMATS)),
        help="Convert: pt (torch.save of the state dict; needs torch) or safetensors (one state dict's "
        "tensors).",
    ),
    click.option("--force", is_flag=True, help="Replace an existing output (never an input)."),
    click.option("--dry-run", is_flag=True, help="Show what would change; write nothing."),
    click.option(
        "--allow-unsafe-input",
        is_flag=True,
        help="Repair even when an input's pickle references dangerous callables (the output carries them "
        "too).",
    ),
    eps_option,
    ignore_option,
)


@click.command("average")
@click.argument("checkpoints", nargs=-1, required=True)
@click.option(
    "-o",
    "--output",
    "output",
    type=click.Path(path_type=Path),
    default=None,
    help="The checkpoint to write (required unless --dry-run); never an input; replacing needs --force.",
)
@option_bundle(AverageOptions, "options", AVERAGE_OPTIONS)
@repair_report_options
def average_command(
    checkpoints: tuple[str, ...],
    output: Path | None,
    options: AverageOptions,
    report_file: Path | None,
    output_format: str,
    fail_on: str,
) -> int:
    """Merge the BatchNorm statistics of per-rank CHECKPOINTS into one checkpoint, -o OUT.

    OUT is the reference checkpoint (the lowest rank, or --reference) with only running_mean / running_var
    replaced, byte for byte: optimizer state, metadata, other tensors and num_batches_tracked are kept. A
    provenance file OUT.bnaudit.json is written next to it. Exit codes: 0 written, 1 refused (an input with
    an unsafe pickle, unusable statistics, parameters that differ) or a finding at or above --fail-on,
    2 usage or input error, 3 internal error, 130 interrupted.
    """
    from bnaudit.cli.output_checks import check_repair_outputs

    # Every output is checked before the ranks are read: a refused output costs nothing.
    check_repair_outputs(None if options.dry_run else output, report_file, options.force, [options.reference])
    # The library is imported on use: --help and the other commands start without NumPy.
    from bnaudit.repair import average

    result = average.average_checkpoints(list(checkpoints), output, options)
    return _emit(result, output_format, report_file, FailOn(fail_on))


def _emit(result: AverageResult, output_format: str, report_file: Path | None, gate: FailOn) -> int:
    report = result.report
    write_report_text(render(report, OutputFormat(output_format), gate), report_file)
    if result.refused:
        click.echo(f"bnaudit: refused: {result.refused}", err=True)
        return 1
    if result.output is not None and report.average is not None:  # a URL output shown as written
        click.echo(f"bnaudit: wrote {report.average.output} and {report.average.sidecar}", err=True)
    return 1 if report.verdict(gate) == "fail" else 0
