"""Option bundles shared by several commands, and the helpers that turn reports into output and exit codes.

``report_options`` gives a command ``--format`` / ``-o`` (repeatable, paired), ``--fail-on``, ``--baseline``
and ``--write-baseline``; ``plot_option`` gives it ``--plot``. The command function receives
``output_format`` (a tuple of format names), ``output`` (a tuple of paths) and ``fail_on``, and passes them
to :func:`emit_report`; the other values reach :func:`emit_report` through the Click context, so that a
command needs no change when an output option is added. Outputs are checked (pairing, baseline file,
matplotlib) before the command runs, so that a usage error never waits for an audit.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from bnaudit import atomic_output
from bnaudit.defaults import DEFAULT_EPS
from bnaudit.errors import OutputError, UsageError
from bnaudit.report import SUFFIXES, OutputFormat, render
from bnaudit.report.json_format import report_to_dict
from bnaudit.report.model import FailOn, Report

if TYPE_CHECKING:
    from bnaudit.audit.baseline import Baseline

F = TypeVar("F", bound=Callable[..., Any])

STDOUT = Path("-")
_ORDER_KEY = "bnaudit.output_order"
_PLAN_KEY = "bnaudit.output_plan"
_VALUES_KEY = "bnaudit.output_values"


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


class _OrderedOption(click.Option):
    """An option that notes each of its occurrences on the command line, in order, in ``ctx.meta``.

    Click keeps each option's values in order but not how the occurrences of two options interleave;
    that is what pairs ``--format github --format sarif -o r.sarif`` (github to stdout) correctly.
    """

    def add_to_parser(self, parser: Any, ctx: click.Context) -> None:
        super().add_to_parser(parser, ctx)
        seen: set[int] = set()
        for opt in self.opts:
            parsed = getattr(parser, "_long_opt", {}).get(opt) or getattr(parser, "_short_opt", {}).get(opt)
            if parsed is None or id(parsed) in seen or not hasattr(parsed, "process"):
                continue  # another Click version: pairing falls back to the order of the values
            seen.add(id(parsed))
            parsed.process = _noting(parsed.process, self.name, ctx)


def _noting(process: Callable[..., Any], name: str | None, ctx: click.Context) -> Callable[..., Any]:
    def wrapper(value: Any, state: Any) -> Any:
        ctx.meta.setdefault(_ORDER_KEY, []).append(name)
        return process(value, state)

    return wrapper


def _keep(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    # Values only emit_report needs travel in the context, not through every command's signature.
    ctx.meta.setdefault(_VALUES_KEY, {})[param.name] = value
    return value


@dataclass
class OutputPlan:
    """Where the report goes: (format, file or None for stdout) pairs, the baseline, and side outputs."""

    targets: list[tuple[OutputFormat, Path | None]]
    baseline: Baseline | None = None
    write_baseline: Path | None = None
    plot: Path | None = None
    files: list[Path] = field(default_factory=list)


def pair_formats(
    formats: Sequence[str], outputs: Sequence[Path], order: Sequence[str] | None = None
) -> list[tuple[OutputFormat, Path | None]]:
    """Pair each ``--format`` with its ``-o`` file (``None``: stdout).

    With as many files as formats they pair in order. With one file fewer, one format goes to stdout:
    when the command line order is known (``order``: the parameter names in the order they occurred),
    each ``-o`` belongs to the ``--format`` before it, else the last format is the one left for stdout.
    ``-o -`` is stdout explicitly.

    Raises:
        UsageError: more files than formats, two reports for stdout, one file twice, or a file whose
            suffix names another format (``-o r.sarif`` paired with ``--format github``).
    """
    fmts = [OutputFormat(f) for f in formats] or [OutputFormat.TABLE]
    if len(outputs) > len(fmts):
        raise UsageError(
            f"{len(outputs)} -o file(s) for {len(fmts)} --format(s): give a --format for each -o, e.g. "
            "--format json -o report.json --format sarif -o report.sarif"
        )
    paths: list[Path | None] = [None] * len(fmts)
    if len(outputs) == len(fmts) - 1 and order is not None and _complete(order, len(fmts), len(outputs)):
        paths = _positional(order, list(outputs), len(fmts))
    else:
        paths[: len(outputs)] = list(outputs)
    pairs = [(f, None if p == STDOUT else p) for f, p in zip(fmts, paths, strict=True)]
    _check_pairs(pairs)
    return pairs


def _complete(order: Sequence[str], n_formats: int, n_outputs: int) -> bool:
    return order.count("output_format") == n_formats and order.count("output") == n_outputs


def _positional(order: Sequence[str], outputs: list[Path], n_formats: int) -> list[Path | None]:
    paths: list[Path | None] = [None] * n_formats
    current = -1
    for name in order:
        if name == "output_format":
            current += 1
            continue
        target = max(current, 0)  # an -o before every --format belongs to the first one
        if paths[target] is not None:
            raise UsageError(
                f"two -o files ({paths[target]}, {outputs[0]}) follow one --format; give one --format per -o"
            )
        paths[target] = outputs.pop(0)
    return paths


def _check_pairs(pairs: list[tuple[OutputFormat, Path | None]]) -> None:
    to_stdout = [f.value for f, p in pairs if p is None]
    if len(to_stdout) > 1:
        raise UsageError(
            f"--format {' and --format '.join(to_stdout)} would all go to stdout: give all but one a -o FILE"
        )
    files = [p for _, p in pairs if p is not None]
    duplicates = sorted({str(p) for p in files if files.count(p) > 1})
    if duplicates:
        raise UsageError(f"-o {duplicates[0]} is given for two formats; give each report its own file")
    for fmt, path in pairs:
        suffix = path.suffix.lower() if path is not None else ""
        claimed = {f.value for f, suffixes in SUFFIXES.items() if suffix in suffixes}
        if claimed and fmt.value not in claimed:
            says = " or ".join(sorted(claimed))
            raise UsageError(
                f"-o {path} is paired with --format {fmt.value}, but its suffix says {says}; each -o belongs "
                "to the --format before it (or give --format and -o in matching order)"
            )


def _prepare(ctx: click.Context, formats: Sequence[str], outputs: Sequence[Path]) -> OutputPlan:
    values = ctx.meta.get(_VALUES_KEY, {})
    plan = OutputPlan(pair_formats(formats, outputs, ctx.meta.get(_ORDER_KEY)))
    if values.get("baseline") is not None:
        from bnaudit.audit.baseline import load_baseline  # on use, like every optional output below

        plan.baseline = load_baseline(values["baseline"])
    plan.write_baseline = values.get("write_baseline")
    plan.plot = values.get("plot")
    if plan.plot is not None:
        from bnaudit.report.plot import check_plot_target

        check_plot_target(plan.plot)
    files = [p for _, p in plan.targets if p is not None]
    files += [p for p in (plan.write_baseline, plan.plot) if p is not None]
    if len({p.resolve() for p in files}) != len(files):
        raise UsageError("one file is given to two of -o, --write-baseline and --plot; give each its own")
    plan.files = files
    return plan


def _checked_first(func: F) -> F:
    """Run the output checks (pairing, baseline, plot) before the command's audit."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ctx = click.get_current_context()
        ctx.meta[_PLAN_KEY] = _prepare(ctx, kwargs.get("output_format", ()), kwargs.get("output", ()))
        return func(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


report_options = _compose(
    click.option(
        "--format",
        "output_format",
        cls=_OrderedOption,
        type=click.Choice([f.value for f in OutputFormat]),
        multiple=True,
        default=(OutputFormat.TABLE.value,),
        show_default=True,
        help="Report format (repeatable, each with its own -o); the exit code is the same for every format.",
    ),
    click.option(
        "-o",
        "--output",
        "output",
        cls=_OrderedOption,
        type=click.Path(dir_okay=False, path_type=Path),
        multiple=True,
        help="Write the report of the --format before it to this file (an existing report is replaced); "
        "without it, or with '-', the report goes to stdout.",
    ),
    click.option(
        "--fail-on",
        type=click.Choice([f.value for f in FailOn]),
        default=FailOn.ERROR.value,
        show_default=True,
        help="Exit 1 when a finding is at least this severe.",
    ),
    click.option(
        "--baseline",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        metavar="FILE",
        expose_value=False,
        callback=_keep,
        help="A previous JSON report: its findings are accepted (still shown, never failing) unless worse.",
    ),
    click.option(
        "--write-baseline",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        metavar="FILE",
        expose_value=False,
        callback=_keep,
        help="Record this run's findings in FILE, for --baseline in later runs.",
    ),
    _checked_first,
)

plot_option = click.option(
    "--plot",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    metavar="FILE",
    expose_value=False,
    callback=_keep,
    help="Draw per-layer divergence and a rank x layer heat map to FILE (.png or .svg; needs "
    "pip install 'bnaudit[plot]').",
)


def write_text_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (:mod:`bnaudit.atomic_output`)."""
    atomic_output.write_text_atomically(path, text)


def write_bytes_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (:mod:`bnaudit.atomic_output`)."""
    atomic_output.write_bytes_atomically(path, data)


def _current_plan(output_format: str | Sequence[str], output: Path | Sequence[Path] | None) -> OutputPlan:
    ctx = click.get_current_context(silent=True)
    if ctx is not None and _PLAN_KEY in ctx.meta:
        plan: OutputPlan = ctx.meta[_PLAN_KEY]
        return plan
    # Called without report_options (a single format and file, as before the CI-gate options existed).
    formats = [output_format] if isinstance(output_format, str) else list(output_format)
    outputs = [] if output is None else [output] if isinstance(output, Path) else list(output)
    return OutputPlan(pair_formats(formats, outputs))


def _append_job_summary(report: Report, gate: FailOn) -> None:
    # GitHub collects the step's summary from this file; append, as other steps may have written to it.
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if not summary:
        return
    try:
        with open(summary, "a", encoding="utf-8") as handle:
            handle.write(render(report, OutputFormat.MARKDOWN, gate) + "\n")
    except OSError as exc:
        raise OutputError(
            f"{summary} ($GITHUB_STEP_SUMMARY): cannot append the job summary ({exc.strerror})"
        ) from exc


def emit_report(
    report: Report,
    output_format: str | Sequence[str],
    output: Path | Sequence[Path] | None,
    fail_on: str,
) -> int:
    """Render ``report`` in every requested format, write the side outputs, and return the exit code.

    Applies ``--baseline`` first (accepted findings do not count for the verdict), then writes each
    format to its ``-o`` file or stdout, appends the job summary for ``--format github`` when
    ``$GITHUB_STEP_SUMMARY`` is set, and writes ``--write-baseline`` and ``--plot``.

    Returns:
        0 when the gate passes, 1 when it fails — whatever the formats.
    """
    gate = FailOn(fail_on)
    plan = _current_plan(output_format, output)
    if plan.baseline is not None:
        from bnaudit.audit.baseline import apply_baseline

        report = apply_baseline(report, plan.baseline)
    verdict = report.verdict(gate)
    for fmt, path in plan.targets:
        text = render(report, fmt, gate)
        if path is None:
            sys.stdout.write(text)
            sys.stdout.flush()
        else:
            write_text_atomically(path, text)
            click.echo(f"bnaudit: {fmt.value} report written to {path} (verdict: {verdict})", err=True)
    if any(fmt is OutputFormat.GITHUB for fmt, _ in plan.targets):
        _append_job_summary(report, gate)
    if plan.write_baseline is not None:
        from bnaudit.audit.baseline import baseline_document

        document = baseline_document(report_to_dict(report, gate))
        write_text_atomically(plan.write_baseline, json.dumps(document, indent=2) + "\n")
        count = len(report.findings)
        click.echo(f"bnaudit: baseline of {count} finding(s) written to {plan.write_baseline}", err=True)
    if plan.plot is not None:
        from bnaudit.report.plot import plot_image

        write_bytes_atomically(plan.plot, plot_image(report, plan.plot))
        click.echo(f"bnaudit: plot written to {plan.plot}", err=True)
    return 1 if verdict == "fail" else 0


# Commands that write a checkpoint (average, recalibrate) keep -o for it: their report takes --report.
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
        type=click.Choice([f.value for f in OutputFormat]),
        default=OutputFormat.TABLE.value,
        show_default=True,
        help="Report format; the exit code is the same for every format.",
    ),
    click.option(
        "--fail-on",
        type=click.Choice([f.value for f in FailOn]),
        default=FailOn.ERROR.value,
        show_default=True,
        help="Exit 1 when a finding is at least this severe (a refused write always exits 1).",
    ),
)


def write_report_text(text: str, report_file: Path | None) -> None:
    """Send a rendered report to ``report_file`` (atomically) or to stdout."""
    if report_file is None:
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        write_text_atomically(report_file, text)
