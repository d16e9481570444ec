"""Where a command's reports go: each ``--format`` paired with its ``-o`` file, checked before the audit runs.

The output options record what they need in the Click context (``ctx.meta``): the order in which
``--format`` and ``-o`` occurred, the values of the options a command function never sees (``--baseline``,
``--write-baseline``, ``--plot``), and the :class:`OutputPlan` made from them before the command runs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from bnaudit.errors import UsageError
from bnaudit.report import SUFFIXES, OutputFormat

if TYPE_CHECKING:
    from bnaudit.audit.baseline import Baseline

F = TypeVar("F", bound=Callable[..., Any])

STDOUT = Path("-")
_ORDER_KEY = "bnaudit.output_order"
_PLAN_KEY = "bnaudit.output_plan"
_VALUES_KEY = "bnaudit.output_values"

Target = tuple[OutputFormat, Path | None]


class OrderedOption(click.Option):
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


def keep_value(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """A Click callback: note the option's value for the output step, which the command does not see.

    Values only the output step needs travel in the context, not through every command's signature.
    """
    ctx.meta.setdefault(_VALUES_KEY, {})[param.name] = value
    return value


@dataclass
class OutputPlan:
    """Where the report goes: (format, file or None for stdout) pairs, the baseline, and side outputs."""

    targets: list[Target]
    baseline: Baseline | None = None
    write_baseline: Path | None = None
    plot: Path | None = None
    files: list[Path] = field(default_factory=list)


def pair_formats(
    formats: Sequence[str], outputs: Sequence[Path], order: Sequence[str] | None = None
) -> list[Target]:
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
            f"{len(outputs)} -o file(s) for {len(fmts)} --format(s)",
            fix="give a --format for each -o, e.g. "
            "--format json -o report.json --format sarif -o report.sarif",
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
                f"two -o files ({paths[target]}, {outputs[0]}) follow one --format",
                where="-o",
                fix="give one --format per -o",
            )
        paths[target] = outputs.pop(0)
    return paths


def _check_pairs(pairs: list[Target]) -> None:
    to_stdout = [f.value for f, p in pairs if p is None]
    if len(to_stdout) > 1:
        raise UsageError(
            f"--format {' and --format '.join(to_stdout)} would all go to stdout",
            where="--format",
            fix="give all but one a -o FILE",
        )
    files = [p for _, p in pairs if p is not None]
    duplicates = sorted({str(p) for p in files if files.count(p) > 1})
    if duplicates:
        raise UsageError(
            "is given for two formats", path=duplicates[0], where="-o", fix="give each report its own file"
        )
    for fmt, path in pairs:
        suffix = path.suffix.lower() if path is not None else ""
        claimed = {f.value for f, suffixes in SUFFIXES.items() if suffix in suffixes}
        if claimed and fmt.value not in claimed:
            raise UsageError(
                f"is paired with --format {fmt.value}, but its suffix says {' or '.join(sorted(claimed))}",
                path=path,
                where="-o",
                fix="each -o belongs to the --format before it (or give --format and -o in matching order)",
            )


def _prepare(ctx: click.Context, formats: Sequence[str], outputs: Sequence[Path]) -> OutputPlan:
    values = ctx.meta.get(_VALUES_KEY, {})
    plan = OutputPlan(pair_formats(formats, outputs, ctx.meta.get(_ORDER_KEY)))
    # --write-baseline records this run afresh: a baseline from the configuration is not applied (and need
    # not exist yet, which is how a configured baseline is bootstrapped).
    if values.get("baseline") is not None and values.get("write_baseline") is None:
        from bnaudit.audit.baseline import load_baseline  # on use, like every optional output below

        plan.baseline = load_baseline(values["baseline"])
    plan.write_baseline = values.get("write_baseline")
    plan.plot = values.get("plot")
    reports = [p for _, p in plan.targets if p is not None]
    from bnaudit.cli.output_checks import check_report_outputs  # on use: it reads the files it checks

    # A baseline --write-baseline replaces is not read (see above), so it is not an input either.
    read_baseline = values.get("baseline") if plan.write_baseline is None else None
    check_report_outputs(reports, plan.write_baseline, plan.plot, read_baseline)
    if plan.plot is not None:
        from bnaudit.report.plot import check_plot_target

        check_plot_target(plan.plot)
    plan.files = reports + [p for p in (plan.write_baseline, plan.plot) if p is not None]
    return plan


def checked_first(func: F) -> F:
    """Make the output plan (pairing, baseline, plot checks) before the command's audit runs.

    Raises:
        UsageError / InputError: see :func:`pair_formats` and the baseline and plot checks.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ctx = click.get_current_context()
        ctx.meta[_PLAN_KEY] = _prepare(ctx, kwargs.get("output_format", ()), kwargs.get("output", ()))
        return func(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def current_plan(output_format: str | Sequence[str], output: Path | Sequence[Path] | None) -> OutputPlan:
    """The plan :func:`checked_first` made for this command, else one made from the arguments alone.

    Raises:
        UsageError: see :func:`pair_formats`.
    """
    ctx = click.get_current_context(silent=True)
    if ctx is not None and _PLAN_KEY in ctx.meta:
        plan: OutputPlan = ctx.meta[_PLAN_KEY]
        return plan
    # Called without report_options (a single format and file, as before the CI-gate options existed).
    formats = [output_format] if isinstance(output_format, str) else list(output_format)
    outputs = [] if output is None else [output] if isinstance(output, Path) else list(output)
    return OutputPlan(pair_formats(formats, outputs))
