"""Option bundles shared by several commands, and the helpers that turn reports into output and exit codes."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from bnaudit.errors import OutputError
from bnaudit.findings import FailOn, Report
from bnaudit.report import OutputFormat, render
from bnaudit.stats import DEFAULT_EPS

F = TypeVar("F", bound=Callable[..., Any])


def _compose(*decorators: Callable[[F], F]) -> Callable[[F], F]:
    def apply(func: F) -> F:
        for decorator in reversed(decorators):
            func = decorator(func)
        return func

    return apply


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
        type=click.Choice([f.value for f in OutputFormat]),
        default=OutputFormat.TABLE.value,
        show_default=True,
        help="Report format; the exit code is the same for every format.",
    ),
    click.option(
        "-o",
        "--output",
        "output",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="Write the report to this file instead of stdout (an existing report is replaced).",
    ),
    click.option(
        "--fail-on",
        type=click.Choice([f.value for f in FailOn]),
        default=FailOn.ERROR.value,
        show_default=True,
        help="Exit 1 when a finding is at least this severe.",
    ),
)


def write_text_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename.

    Raises:
        OutputError: the folder is missing or not writable, or the disk is full.
    """
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"{path}: the folder {folder} does not exist; create it or choose another -o path")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise OutputError(
            f"{path}: cannot write in {folder} ({exc.strerror}); choose another -o path"
        ) from exc
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise OutputError(
            f"{path}: cannot write the report ({exc.strerror}); check space and permissions"
        ) from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def emit_report(report: Report, output_format: str, output: Path | None, fail_on: str) -> int:
    """Render ``report``, send it to ``output`` or stdout, and return the exit code (0 pass, 1 fail)."""
    gate = FailOn(fail_on)
    text = render(report, OutputFormat(output_format), gate)
    if output is None:
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        write_text_atomically(output, text)
        click.echo(f"bnaudit: report written to {output} (verdict: {report.verdict(gate)})", err=True)
    return 1 if report.verdict(gate) == "fail" else 0
