"""What ``average`` is asked to do: its options, and the ranks, reference, output and plan they name."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bnaudit.audit.rank_reader import load_logged, unsafe_findings
from bnaudit.audit.scan_plan import RankWeights
from bnaudit.bn.corrupt_pickle import unsafe_error
from bnaudit.bn.stats import MergeMethod
from bnaudit.checkpoint.rank_files import RankFile, resolve_rank_files
from bnaudit.errors import BnauditError, InputError, UsageError
from bnaudit.repair.average_plan import AveragePlan, Sources, plan_average
from bnaudit.repair.average_write import checked_output, output_format
from bnaudit.repair.options import AverageOptions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedAverage:
    """The checked request: the plan, where the inputs are, the merge, the output and its format."""

    plan: AveragePlan
    sources: Sources
    method: MergeMethod
    out: Path | None
    fmt: str
    warnings: tuple[str, ...]


def prepare_average(
    checkpoints: str | Path | Sequence[str | Path], out: str | Path | None, options: AverageOptions
) -> PreparedAverage:
    """Check the options, resolve the ranks, open the first rank and the reference, and plan the merge.

    Raises:
        UsageError / InputError / ModelMismatchError / NoBatchNormError / OutputError: see the messages.
    """
    method = _resolve_method(options.method)
    arguments = [checkpoints] if isinstance(checkpoints, (str, os.PathLike)) else checkpoints
    files, warnings = resolve_rank_files([str(p) for p in arguments])
    for w in warnings:
        log.warning(w)
    weights = RankWeights(_weights(options.rank_weights, files), from_metadata=options.rank_weights is None)
    ref_path = Path(options.reference) if options.reference is not None else files[0].path
    out_path = checked_output(out, options.dry_run, [f.path for f in files] + [ref_path], options.force)
    sources = _sources(files, options.reference)
    try:
        fmt = output_format(sources.reference, options.to, sources.reference_display)
        plan = plan_average(sources, options.key, options.ignore, options.eps, weights)
    except (InputError, UsageError) as exc:
        raise_unsafe_first(sources, exc, options.allow_unsafe_input)
        raise
    return PreparedAverage(plan, sources, method, out_path, fmt, tuple(warnings))


def raise_unsafe_first(sources: Sources, error: BnauditError, allow_unsafe: bool) -> None:
    """Raise the exit-1 unsafe-pickle error when an input the error stopped has an unsafe pickle.

    A file an attacker built may also lack BatchNorm layers or be of a kind bnaudit cannot write; the
    unsafe pickle is the verdict, not those. With ``--allow-unsafe-input`` the error stands as it is.
    """
    if allow_unsafe:
        return
    for ckpt, display in (
        (sources.rank0, sources.files[0].display),
        (sources.reference, sources.reference_display),
    ):
        unsafe = unsafe_findings(ckpt, display)
        if unsafe:
            raise unsafe_error(unsafe, display, error) from None


def _resolve_method(method: MergeMethod | str) -> MergeMethod:
    try:
        return MergeMethod(method)
    except ValueError:
        raise UsageError(f"{method!r} is not one of: pooled, mean", where="--method") from None


def _weights(weights: Sequence[float] | None, files: list[RankFile]) -> tuple[float, ...] | None:
    if weights is None:
        return None
    if len(weights) != len(files):
        raise UsageError(
            "needs one value per rank",
            where="--rank-weights",
            expected=f"{len(files)} values",
            found=f"{len(weights)}",
            fix="pass one sample count per rank, in rank order (e.g. 3,3,3,2)",
        )
    for w in weights:
        if not (math.isfinite(w) and w > 0):
            raise UsageError(
                f"{w} is not a positive number",
                where="--rank-weights",
                fix="pass sample counts such as 3,3,3,2",
            )
    return tuple(float(w) for w in weights)


def _sources(files: list[RankFile], reference: str | Path | None) -> Sources:
    rank0 = load_logged(files[0].path, files[0].display)
    if reference is None:
        return Sources(tuple(files), rank0, rank0, files[0].display)
    return Sources(tuple(files), rank0, load_logged(reference, str(reference)), str(reference))
