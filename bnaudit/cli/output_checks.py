"""Every command's outputs and inputs, gathered from its options and checked by the one output policy.

The rules are :mod:`bnaudit.checkpoint.output_policy`'s; this module only knows which option names which
file: the report commands (``-o``, ``--write-baseline``, ``--plot``; inputs: the checkpoints, ``--baseline``
and the files ``--model`` / ``--data`` name) and the repairs (``-o`` the checkpoint, its sidecar,
``--report``; inputs: the checkpoints and ``--reference``). It runs before the command's work.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from bnaudit.errors import UsageError

# Suffixes only reports have: a repair's -o with one of them and a --format meant --report.
_REPORT_SUFFIXES = frozenset({".json", ".sarif", ".xml", ".md"})


def _spec_files(specs: Iterable[str | None]) -> list[Path]:
    """The existing files a ``--model`` / ``--data`` spec names (``file.py:factory``, ``x.pt``)."""
    found: list[Path] = []
    for spec in specs:
        if not spec:
            continue
        for candidate in {spec, spec.rsplit(":", 1)[0]}:
            if Path(candidate).is_file():
                found.append(Path(candidate))
    return found


def command_inputs(params: dict[str, Any], extra: Sequence[str | Path | None] = ()) -> list[str | Path]:
    """Every input a command's parsed parameters name: checkpoints (diff's BASE too), model and data files,
    ``extra``."""
    inputs: list[str | Path] = list(params.get("checkpoints") or ())
    inputs += [params[name] for name in ("base", "checkpoint") if params.get(name)]  # diff's BASE
    inputs += _spec_files([params.get("model_spec"), params.get("data_spec")])
    return inputs + [p for p in extra if p is not None]


def check_report_outputs(
    reports: Sequence[Path], write_baseline: Path | None, plot: Path | None, baseline: Path | None
) -> None:
    """The policy for ``inspect`` / ``compare`` / ``drift``: reports, baseline and plot.

    Raises:
        OutputError: an output is an input, another output, a checkpoint or other non-report file.
    """
    from bnaudit.checkpoint.output_policy import OutputKind, PlannedOutput, check_outputs

    planned = [PlannedOutput(p, OutputKind.REPORT, "-o") for p in reports]
    if write_baseline is not None:
        planned.append(PlannedOutput(write_baseline, OutputKind.BASELINE, "--write-baseline"))
    if plot is not None:
        planned.append(PlannedOutput(plot, OutputKind.PLOT, "--plot"))
    ctx = click.get_current_context()
    check_outputs(planned, command_inputs(ctx.params, [baseline]))


def check_repair_outputs(
    checkpoint: Path | None,
    report_file: Path | None,
    force: bool,
    extra_inputs: Sequence[str | Path | None] = (),
) -> None:
    """The policy for ``average`` / ``recalibrate``: the checkpoint (None: a dry run), sidecar and report.

    Raises:
        UsageError: ``-o`` names a report file while ``--format`` is given (``--report`` was meant).
        OutputError: see :func:`bnaudit.checkpoint.output_policy.check_outputs`.
    """
    from bnaudit.checkpoint.output_policy import OutputKind, PlannedOutput, check_outputs
    from bnaudit.checkpoint.provenance import sidecar_path

    ctx = click.get_current_context()
    if checkpoint is not None:
        _refuse_report_name(ctx, checkpoint)
    planned = []
    if checkpoint is not None:
        planned.append(PlannedOutput(checkpoint, OutputKind.CHECKPOINT, "-o"))
        planned.append(PlannedOutput(sidecar_path(checkpoint), OutputKind.SIDECAR, "-o's sidecar"))
    if report_file is not None:
        planned.append(PlannedOutput(report_file, OutputKind.REPORT, "--report"))
    check_outputs(planned, command_inputs(ctx.params, extra_inputs), force=force)


def _refuse_report_name(ctx: click.Context, checkpoint: Path) -> None:
    given = ctx.get_parameter_source("output_format") not in (None, ParameterSource.DEFAULT)
    if checkpoint.suffix.lower() in _REPORT_SUFFIXES and given:
        raise UsageError(
            f"-o is the checkpoint {ctx.info_name} writes, but {checkpoint} is named like a report",
            path=checkpoint,
            where="-o",
            fix=f"for the report, use --report {checkpoint} (and -o OUT.pt for the checkpoint)",
        )
