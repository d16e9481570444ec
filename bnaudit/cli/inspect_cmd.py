"""``bnaudit inspect``: the health of one or more checkpoints' BatchNorm statistics."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import click

from bnaudit.checkpoint.rank_files import expand_arguments
from bnaudit.cli.options import (
    emit_report,
    eps_option,
    ignore_option,
    key_option,
    layer_option,
    report_options,
)
from bnaudit.report.model import Report
from bnaudit.report.sections import Command, GlobalEntry


def _merge_reports(reports: list[Report]) -> Report:
    if len(reports) == 1:
        return reports[0]
    first = reports[0]
    rows = sorted((r for rep in reports for r in rep.layers), key=lambda r: -r.severity.rank)
    findings = sorted((f for rep in reports for f in rep.findings), key=lambda f: -f.severity.rank)
    return Report(
        command=Command.INSPECT,
        inputs=tuple(i for rep in reports for i in rep.inputs),
        settings=first.settings,
        layers=tuple(rows),
        findings=tuple(findings),
        headline=first.headline,
        next_step=next((rep.next_step for rep in reports if rep.next_step), None),
        channel_rows=tuple(row for rep in reports for row in rep.channel_rows),
        columns=first.columns,
        globals=_merged_globals(reports),
    )


def _merged_globals(reports: list[Report]) -> tuple[GlobalEntry, ...] | None:
    if all(rep.globals is None for rep in reports):
        return None
    return tuple(replace(entry, file=rep.inputs[0].path) for rep in reports for entry in rep.globals or ())


@click.command("inspect")
@click.argument("checkpoints", nargs=-1, required=True)
@key_option
@eps_option
@ignore_option
@layer_option
@click.option("--security", is_flag=True, help="List every global the file's pickles reference, classified.")
@report_options
def inspect_command(
    checkpoints: tuple[str, ...],
    key: str | None,
    eps: float,
    ignore: tuple[str, ...],
    layer: str | None,
    security: bool,
    output_format: tuple[str, ...],
    output: tuple[Path, ...],
    fail_on: str,
) -> int:
    """Check the BatchNorm statistics of each CHECKPOINT: NaN/Inf, negative or tiny variance, layers never
    updated, malformed layers — and what the file's pickle would import or run if torch.load-ed (nothing of
    it is executed here).

    CHECKPOINT is a torch file (.pt/.pth/.ckpt/.bin), a .safetensors file or a sharded index (*.index.json);
    quoted glob patterns are expanded.
    """
    from bnaudit.audit.compare import inspect_checkpoint

    reports = [
        inspect_checkpoint(path, key=key, eps=eps, ignore=ignore, layer=layer, security=security)
        for path in expand_arguments(list(checkpoints))
    ]
    return emit_report(_merge_reports(reports), output_format, output, fail_on)
