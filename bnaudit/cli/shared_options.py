"""The Click options several commands share, as decorators: the audit options and the report options.

``report_options`` gives a command ``--format`` / ``-o`` (repeatable, paired), ``--fail-on``, ``--baseline``
and ``--write-baseline``; ``plot_option`` gives it ``--plot``. The command function receives
``output_format`` (a tuple of format names), ``output`` (a tuple of paths) and ``fail_on``, and passes them
to :func:`bnaudit.cli.options.emit_report`; the other values reach the output step through the Click
context, so that a command needs no change when an output option is added. Outputs are checked (pairing,
baseline file, matplotlib) before the command runs, so that a usage error never waits for an audit.
Commands that write a checkpoint (average, recalibrate) keep ``-o`` for it: ``repair_report_options``
gives them ``--report FILE`` instead.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from bnaudit.cli.output_plan import OrderedOption, checked_first, keep_value
from bnaudit.defaults import DEFAULT_EPS
from bnaudit.report import OutputFormat
from bnaudit.report.model import FailOn

F = TypeVar("F", bound=Callable[..., Any])

_FORMAT_CHOICE = click.Choice([f.value for f in OutputFormat])


def _compose(*decorators: Callable[[F], F]) -> Callable[[F], F]:
    def apply(func: F) -> F:
        for decorator in reversed(decorators):
            func = decorator(func)
        return func

    return apply


def _fail_on_option(help_text: str) -> Callable[[F], F]:
    return click.option(
        "--fail-on",
        type=click.Choice([f.value for f in FailOn]),
        default=FailOn.ERROR.value,
        show_default=True,
        help=help_text,
    )


def _side_file_option(name: str, help_text: str) -> Callable[[F], F]:
    # A file only the output step writes or reads: its value travels in the context (keep_value).
    return click.option(
        name,
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        metavar="FILE",
        expose_value=False,
        callback=keep_value,
        help=help_text,
    )


def level_option(name: str, default: float, help_text: str) -> Callable[[F], F]:
    """A gate level in nats (a positive float), e.g. ``--warn-kl``."""
    return click.option(
        name,
        type=click.FloatRange(min=0.0, min_open=True),
        default=default,
        show_default=True,
        help=help_text,
    )


def factor_option(name: str, default: float, help_text: str) -> Callable[[F], F]:
    """A ratio of at least 1, e.g. ``--flat-factor``."""
    return click.option(
        name, type=click.FloatRange(min=1.0), default=default, show_default=True, help=help_text
    )


key_option = click.option(
    "--key",
    metavar="PATH",
    default=None,
    help="Audit only this state dict: a '/'-separated path inside the file (e.g. state_dict_ema, model).",
)
eps_option = click.option(
    "--eps",
    type=click.FloatRange(min=0.0, min_open=True),
    default=DEFAULT_EPS,
    show_default=True,
    help="BatchNorm eps added to every variance (eps is not stored in state dicts).",
)
ignore_option = click.option(
    "--ignore",
    "ignore",
    metavar="PATTERN",
    multiple=True,
    help="Leave out layers whose name matches this glob (repeatable), e.g. 'head.*'.",
)
layer_option = click.option(
    "--layer", metavar="NAME", default=None, help="Also show this layer channel by channel."
)

report_options = _compose(
    click.option(
        "--format",
        "output_format",
        cls=OrderedOption,
        type=_FORMAT_CHOICE,
        multiple=True,
        default=(OutputFormat.TABLE.value,),
        show_default=True,
        help="Report format (repeatable, each with its own -o); the exit code is the same for every format.",
    ),
    click.option(
        "-o",
        "--output",
        "output",
        cls=OrderedOption,
        type=click.Path(dir_okay=False, path_type=Path),
        multiple=True,
        help="Write the report of the --format before it to this file (it may replace a report, never a "
        "checkpoint or an input); "
        "without it, or with '-', the report goes to stdout.",
    ),
    _fail_on_option("Exit 1 when a finding is at least this severe."),
    _side_file_option(
        "--baseline",
        "A previous JSON report: its findings are accepted (still shown, never failing) unless worse.",
    ),
    _side_file_option(
        "--write-baseline", "Record this run's findings in FILE, for --baseline in later runs."
    ),
    checked_first,
)

plot_option = _side_file_option(
    "--plot",
    "Draw per-layer divergence and a rank x layer heat map to FILE (.png or .svg; needs "
    "pip install 'bnaudit[plot]').",
)

repair_report_options = _compose(
    click.option(
        "--report",
        "report_file",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="Write the report to this file instead of stdout.",
    ),
    click.option(
        "--format",
        "output_format",
        type=_FORMAT_CHOICE,
        default=OutputFormat.TABLE.value,
        show_default=True,
        help="Report format; the exit code is the same for every format.",
    ),
    _fail_on_option("Exit 1 when a finding is at least this severe (a refused write always exits 1)."),
)
