"""The audits: ``inspect`` (one checkpoint's health) and ``compare`` (divergence across ranks) -> Report."""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bnaudit.bn.layers import BnLayer, find_bn_layers, is_ignored, normalize_key
from bnaudit.bn.layerstats import (
    LayerStats,
    differing_affine,
    health_findings,
    layer_problem,
    layer_tensor_refs,
    layers_to_check,
    read_layer,
    read_layers,
)
from bnaudit.bn.pickle_policy import global_uses, pickle_findings
from bnaudit.bn.stats import DEFAULT_EPS, Divergence, DivergenceAccumulator, MergeMethod, RankMerger
from bnaudit.checkpoint import load_checkpoint, read_tensor
from bnaudit.checkpoint.discover import select_state_dicts
from bnaudit.checkpoint.rank_files import RankFile, resolve_rank_files
from bnaudit.checkpoint.same_layout import LayoutTemplate
from bnaudit.checkpoint.types import Checkpoint, StateDictRef, TensorRef
from bnaudit.defaults import DEFAULT_ERROR_KL, DEFAULT_WARN_KL
from bnaudit.errors import InputError, ModelMismatchError, NoBatchNormError, UsageError
from bnaudit.report.model import (
    Finding,
    FindingKind,
    FiniteFloats,
    InputInfo,
    LayerRow,
    Report,
    Severity,
    sort_by_layer_metric,
    sort_findings,
)
from bnaudit.report.sections import Column, Command, GlobalEntry

if TYPE_CHECKING:
    from concurrent.futures import Future

log = logging.getLogger(__name__)

DCP_NOTE = (
    "note: {path} is a torch.distributed.checkpoint folder: DCP saves one copy of each replicated tensor, so "
    "it holds one rank's BatchNorm statistics (per layer, possibly different ranks for running_mean and "
    "running_var), not every rank's; to compare ranks, save them with bnaudit.save_rank_stats and compare "
    "those files"
)


# The layer table's columns after name and status, in the units each audit reports.
INSPECT_COLUMNS = (
    Column("channels", attribute="channels"),
    Column("max |mean|", "mean_abs_max"),
    Column("min var", "var_min"),
    Column("max var", "var_max"),
    Column("batches", "num_batches_tracked"),
)
COMPARE_COLUMNS = (
    Column("max KL", "max_kl"),
    Column("max shift (std)", "max_shift"),
    Column("max var ratio", "max_var_ratio"),
    Column("worst rank", attribute="worst_rank"),
    Column("channel", attribute="worst_channel"),
)


def _severity_for(value: float, warn: float, error: float) -> Severity:
    if value >= error:
        return Severity.ERROR
    if value >= warn:
        return Severity.WARN
    return Severity.OK


def _row_severity(findings: Iterable[Finding]) -> Severity:
    worst = max((f.severity for f in findings), key=lambda s: s.rank, default=Severity.OK)
    return Severity.OK if worst is Severity.INFO else worst


def _state_dicts(ckpt: Checkpoint, key: str | None) -> list[StateDictRef]:
    return select_state_dicts(ckpt.state_dicts, key, source=str(ckpt.path))


def _input_info(ckpt: Checkpoint, display: str, rank: int | None, sds: list[StateDictRef]) -> InputInfo:
    return InputInfo(path=display, format=ckpt.format, rank=rank, state_dicts=tuple(s.name for s in sds))


# --------------------------------------------------------------------------------------------- inspect


def inspect_checkpoint(
    path: str | Path,
    *,
    key: str | None = None,
    eps: float = DEFAULT_EPS,
    ignore: Sequence[str] = (),
    layer: str | None = None,
    security: bool = False,
) -> Report:
    """Audit the health of one checkpoint's BatchNorm statistics and what its pickle references.

    Args:
        path: the checkpoint file.
        key: restrict to one state dict (``/``-separated path), e.g. ``state_dict_ema``.
        eps: BatchNorm's eps (not stored in state dicts), used by the tiny-variance check.
        ignore: glob patterns of layer names to leave out.
        layer: a layer name whose per-channel statistics are returned in ``Report.channel_rows``.
        security: list every global the file's pickles reference in ``Report.globals``.

    Returns:
        A Report with one row per layer and findings of kinds nonfinite, negative-variance, tiny-variance,
        never-updated, malformed-layer, no-batchnorm, unsafe-pickle and suspicious-pickle.

    Raises:
        InputError: the file cannot be read, ``key`` or ``layer`` is not found.
    """
    display = str(path)
    ckpt = _load(path, display)
    sds = _state_dicts(ckpt, key)
    rows: list[LayerRow] = []
    findings: list[Finding] = pickle_findings(ckpt.globals, display)
    channel_rows: list[dict[str, Any]] = []
    for sd in sds:
        layers = [x for x in find_bn_layers(sd.tensors) if not is_ignored(x.name, ignore)]
        for bn in layers:
            row, layer_findings = _inspect_layer(sd, bn, eps, display)
            rows.append(row)
            findings.extend(layer_findings)
            if layer is not None and bn.name == layer and not channel_rows:
                channel_rows = _inspect_channels(read_layer(sd, bn, display))
    if not rows:
        findings.append(_no_batchnorm_finding(display, sds))
    if layer is not None and not channel_rows:
        raise InputError(f"{display}: no BatchNorm layer named '{layer}'; " + _layer_names_hint(rows))
    rows.sort(key=lambda r: -r.severity.rank)
    return Report(
        command=Command.INSPECT,
        inputs=(_input_info(ckpt, display, None, sds),),
        settings={"eps": eps, "key": key, "ignore": list(ignore), "layer": layer},
        layers=tuple(rows),
        findings=sort_findings(findings),
        headline="var_min",
        next_step=_inspect_next_step(findings, display),
        channel_rows=tuple(channel_rows),
        columns=INSPECT_COLUMNS,
        globals=_globals_listing(ckpt) if security else None,
    )


def _load(path: str | Path, display: str) -> Checkpoint:
    ckpt = load_checkpoint(path)
    for warning in ckpt.warnings:
        log.warning("%s: %s", display, warning)
    return ckpt


def _globals_listing(ckpt: Checkpoint) -> tuple[GlobalEntry, ...]:
    return tuple(GlobalEntry(u.qualname, u.safety.value, u.sources) for u in global_uses(ckpt.globals))


def _inspect_layer(sd: StateDictRef, bn: BnLayer, eps: float, display: str) -> tuple[LayerRow, list[Finding]]:
    problem = layer_problem(sd, bn)
    mean_ref = sd.tensors[bn.running_mean]
    channels = mean_ref.shape[0] if mean_ref.shape else 1
    if problem:
        finding = Finding(
            Severity.ERROR,
            FindingKind.MALFORMED_LAYER,
            f"layer '{bn.display_name}': {problem}; the layer cannot normalise — re-export the "
            "checkpoint from the model",
            file=display,
            state_dict=sd.name,
            layer=bn.name,
        )
        return LayerRow(bn.name, sd.name, Severity.ERROR, channels, {}), [finding]
    stats = read_layer(sd, bn, display)
    found = health_findings(stats, eps, file=display, state_dict=sd.name, layer=bn.name)
    with np.errstate(invalid="ignore"):
        metrics: dict[str, float | int | None] = {
            "mean_abs_max": _finite_max(np.abs(stats.mean)),
            "var_min": _finite_min(stats.var),
            "var_max": _finite_max(stats.var),
            "num_batches_tracked": stats.num_batches_tracked,
        }
    return LayerRow(bn.name, sd.name, _row_severity(found), stats.channels, metrics), found


def _finite_max(values: np.ndarray) -> float | None:
    finite = values[np.isfinite(values)]
    return float(finite.max()) if finite.size else None


def _finite_min(values: np.ndarray) -> float | None:
    finite = values[np.isfinite(values)]
    return float(finite.min()) if finite.size else None


def _inspect_channels(stats: LayerStats) -> list[dict[str, Any]]:
    rows = []
    for c in range(stats.channels):
        rows.append(
            {
                "channel": c,
                "running_mean": float(stats.mean[c]),
                "running_var": float(stats.var[c]),
                "weight": None if stats.weight is None else float(stats.weight[c]),
                "bias": None if stats.bias is None else float(stats.bias[c]),
            }
        )
    return rows


def _no_batchnorm_finding(display: str, sds: list[StateDictRef]) -> Finding:
    names = ", ".join(s.display_name for s in sds) or "none"
    return Finding(
        Severity.WARN,
        FindingKind.NO_BATCHNORM,
        f"no BatchNorm layers (keys ending in running_mean and running_var) in state dict(s) {names}; "
        "nothing to audit — check that this is the right file or --key",
        file=display,
    )


def _layer_names_hint(rows: list[LayerRow]) -> str:
    names = [r.name for r in rows][:8]
    more = "" if len(rows) <= 8 else f", ... ({len(rows)} in all)"
    return "layers are: " + ", ".join(names) + more if names else "the file has no BatchNorm layers"


def _inspect_next_step(findings: list[Finding], display: str) -> str | None:
    kinds = {f.kind for f in findings if f.severity in (Severity.WARN, Severity.ERROR)}
    if kinds & {
        FindingKind.NONFINITE,
        FindingKind.NEGATIVE_VARIANCE,
        FindingKind.NEVER_UPDATED,
        FindingKind.TINY_VARIANCE,
    }:
        return f"bnaudit recalibrate {display} --model MODULE:FACTORY --data MODULE:LOADER -o fixed.pt"
    return None


# --------------------------------------------------------------------------------------------- compare


@dataclass
class _LayerPlan:
    """One layer to compare: its key in each rank and where its channels sit in the plan's accumulators."""

    state_dict: str
    name: str
    channels: int
    start: int  # first channel of this layer in the concatenated vectors of the accumulators
    reference: LayerStats | None = None
    counters: dict[int, int] = field(default_factory=dict)

    @property
    def part(self) -> slice:
        return slice(self.start, self.start + self.channels)


@dataclass
class _ComparePlan:
    """The layers to compare and both passes' accumulators, for all layers at once (channels concatenated)."""

    eps: float
    state_dicts: list[str]
    signatures: dict[str, dict[str, tuple[tuple[int, ...], str]]]
    layers: list[_LayerPlan]
    merger: RankMerger = field(default_factory=lambda: RankMerger(0))
    divergence: DivergenceAccumulator | None = None
    # Ranks laid out byte for byte like an earlier one are read through its parsed layout; None: read every
    # rank in full (--check-weights compares every tensor, so each rank's own references are needed).
    templates: _Templates | None = None

    @property
    def channels(self) -> int:
        """Channels of all layers together (the accumulators' length)."""
        return self.layers[-1].part.stop if self.layers else 0

    def add_layer(self, state_dict: str, name: str, channels: int) -> None:
        self.layers.append(_LayerPlan(state_dict, name, channels, self.channels))


def _concatenated(stats: list[LayerStats], attr: str) -> np.ndarray:
    """Every layer's ``mean`` or ``var`` in one vector, in plan order."""
    return np.concatenate([getattr(s, attr) for s in stats]) if stats else np.zeros(0)


def model_signature(sd: StateDictRef) -> dict[str, tuple[tuple[int, ...], str]]:
    """Normalised key -> (shape, dtype) for every tensor of a state dict."""
    return {normalize_key(k): (t.shape, t.dtype) for k, t in sd.tensors.items()}


def describe_model_difference(
    ref: dict[str, tuple[tuple[int, ...], str]], other: dict[str, tuple[tuple[int, ...], str]]
) -> str | None:
    missing = [k for k in ref if k not in other]
    extra = [k for k in other if k not in ref]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} key(s) missing (e.g. '{missing[0]}')")
        if extra:
            parts.append(f"{len(extra)} extra key(s) (e.g. '{extra[0]}')")
        return " and ".join(parts)
    for k, (shape, dtype) in ref.items():
        oshape, odtype = other[k]
        if oshape != shape:
            return f"'{k}' has shape {list(oshape)}, the reference has {list(shape)}"
        if odtype != dtype:
            return f"'{k}' has dtype {odtype}, the reference has {dtype}"
    return None


def compare_ranks(
    paths: Sequence[str | Path],
    *,
    key: str | None = None,
    eps: float = DEFAULT_EPS,
    warn_kl: float = DEFAULT_WARN_KL,
    error_kl: float = DEFAULT_ERROR_KL,
    ignore: Sequence[str] = (),
    check_weights: bool = False,
    layer: str | None = None,
    allow_empty: bool = False,
    jobs: int = 1,
) -> Report:
    """Compare per-rank checkpoints' BatchNorm statistics.

    Streams the ranks twice (memory: one rank's BatchNorm tensors plus per-layer accumulators): the first
    pass checks that every rank holds the same model, compares affine weights (and with ``check_weights``
    every other tensor) with the reference rank, and pools the statistics; the second measures how far each
    rank is from the pooled statistics.

    Args:
        paths: per-rank files or quoted glob patterns; ranks come from the file names (``rank3``).
        key: restrict to one state dict.
        eps: BatchNorm's eps, added to every variance before the divergence metrics.
        warn_kl, error_kl: thresholds on the layer's max KL(N(pooled) || N(rank)) in nats.
        ignore: glob patterns of layer names to leave out.
        check_weights: also compare every non-BatchNorm tensor across ranks.
        layer: a layer name whose per-channel detail goes to ``Report.channel_rows``.
        allow_empty: a model without BatchNorm layers passes instead of being an input error.
        jobs: read up to this many rank files ahead in threads (for high-latency storage).

    Returns:
        A Report whose rows are ordered worst first (by max KL).

    Raises:
        InputError / ModelMismatchError / NoBatchNormError / UsageError: see the messages.
    """
    if not 0 < warn_kl <= error_kl:
        raise UsageError(f"--warn-kl ({warn_kl}) must be positive and not above --error-kl ({error_kl})")
    files, warnings = resolve_rank_files([str(p) for p in paths])
    for w in warnings:
        log.warning(w)
    inputs: list[InputInfo] = []
    findings: list[Finding] = []
    try:
        plan, reference = _plan_from_reference(files, key, eps, ignore)
        cache = _first_pass(files, plan, reference, key, check_weights, jobs, inputs, findings)
    except _UnsafeUnreadable as exc:
        return _unsafe_report(exc, files)
    for info in inputs:
        if info.format == "dcp":
            warnings.append(DCP_NOTE.format(path=info.path))
            log.warning(warnings[-1])
    if not plan.layers:
        if not allow_empty:
            raise NoBatchNormError(
                f"{files[0].display}: no BatchNorm layers (keys ending in running_mean and running_var) in "
                f"state dict(s) {', '.join(n or '<root>' for n in plan.state_dicts)}; nothing to compare — "
                "check --key and --ignore, or pass --allow-empty"
            )
        findings.append(
            Finding(
                Severity.INFO,
                FindingKind.NO_BATCHNORM,
                "no BatchNorm layers to compare",
                file=files[0].display,
            )
        )
    _second_pass(files, key, plan, cache, jobs)
    rows, channel_rows = _divergence_rows(plan, files, warn_kl, error_kl, layer, findings)
    findings.extend(_counter_findings(plan, files))
    ordered = sort_findings(_divergence_first(findings))
    return Report(
        command=Command.COMPARE,
        inputs=tuple(inputs),
        settings={
            "eps": eps,
            "warn_kl": warn_kl,
            "error_kl": error_kl,
            "key": key,
            "ignore": list(ignore),
            "check_weights": check_weights,
            "ranks": len(files),
        },
        layers=tuple(rows),
        findings=ordered,
        headline="max_kl",
        next_step=_compare_next_step(files, ordered),
        channel_rows=tuple(channel_rows),
        columns=COMPARE_COLUMNS,
        warnings=tuple(warnings),
    )


def _divergence_first(findings: list[Finding]) -> list[Finding]:
    # Within one severity, divergence findings (already worst layer first) lead: they are the headline.
    return sorted(findings, key=lambda f: f.kind is not FindingKind.DIVERGENCE)


class _UnsafeUnreadable(Exception):
    """A rank whose pickle references dangerous callables and whose layout cannot be compared.

    The unsafe pickle is the finding that matters (exit 1), not the layout error it causes.
    """

    def __init__(self, rf: RankFile, ckpt: Checkpoint, findings: list[Finding], reason: str) -> None:
        super().__init__(reason)
        self.rf, self.ckpt, self.findings, self.reason = rf, ckpt, findings, reason


def _unsafe_report(exc: _UnsafeUnreadable, files: list[RankFile]) -> Report:
    return Report(
        command=Command.COMPARE,
        inputs=(_input_info(exc.ckpt, exc.rf.display, exc.rf.rank, list(exc.ckpt.state_dicts)),),
        settings={"ranks": len(files)},
        layers=(),
        findings=sort_findings(exc.findings),
        headline="max_kl",
        columns=COMPARE_COLUMNS,
        next_step=f"{exc.rf.display} was not compared ({exc.reason}); replace it with a file from a trusted "
        "source",
    )


def _open_rank(
    rf: RankFile, key: str | None, names: list[str] | None
) -> tuple[Checkpoint, list[StateDictRef]]:
    ckpt = _load(rf.path, rf.display)
    try:
        return ckpt, _select_rank_state_dicts(ckpt, rf, key, names)
    except InputError as exc:
        unsafe = [f for f in pickle_findings(ckpt.globals, rf.display) if f.kind is FindingKind.UNSAFE_PICKLE]
        if unsafe:
            raise _UnsafeUnreadable(rf, ckpt, unsafe, str(exc)) from exc
        raise


def _select_rank_state_dicts(
    ckpt: Checkpoint, rf: RankFile, key: str | None, names: list[str] | None
) -> list[StateDictRef]:
    if names is None:
        return _state_dicts(ckpt, key)
    found = {sd.name: sd for sd in ckpt.state_dicts}
    missing = [n for n in names if n not in found]
    if missing:
        have = ", ".join(s.display_name for s in ckpt.state_dicts) or "none"
        raise ModelMismatchError(
            f"{rf.display}: rank {rf.rank} has no state dict '{missing[0] or '<root>'}' (it has: {have}); "
            "all ranks must be checkpoints of the same model and layout"
        )
    return [found[n] for n in names]


def _layers_by_name(sd: StateDictRef) -> dict[str, BnLayer]:
    return {bn.name: bn for bn in find_bn_layers(sd.tensors)}


@dataclass
class _RankData:
    """One rank opened and read: its checkpoint, state dicts and the planned layers' statistics."""

    rf: RankFile
    ckpt: Checkpoint
    sds: list[StateDictRef]
    stats: list[LayerStats]

    @property
    def stats_bytes(self) -> int:
        return sum(s.mean.nbytes + s.var.nbytes for s in self.stats)


# Statistics of this many bytes are kept between the two passes instead of being read again: four ranks
# of a large CNN (4 x 120 layers x 512 channels x 2 x 8 bytes = 4 MB) are kept, 1,024 ranks are streamed.
CACHE_BUDGET_BYTES = 32 << 20


# A rank that is not laid out like the current template becomes the template for the ranks after it, at most
# this many times per run: ranks 1-9, 10-99 and 100-999 of one job differ in the length of their file names,
# which torch.save puts into every zip entry name, so each group has its own layout.
MAX_LAYOUT_TEMPLATES = 8


@dataclass
class _Template:
    """A rank read in full whose layout later ranks may share (:mod:`bnaudit.checkpoint.same_layout`)."""

    layout: LayoutTemplate
    sds: list[StateDictRef]
    wanted: list[tuple[StateDictRef, BnLayer]]  # the planned layers, in plan order
    refs: list[TensorRef]  # every tensor read_layers reads for them


@dataclass
class _Templates:
    current: _Template | None = None
    built: int = 0

    def offer(
        self, ckpt: Checkpoint, sds: list[StateDictRef], wanted: list[tuple[StateDictRef, BnLayer]]
    ) -> None:
        """Make a rank just read in full the template, within MAX_LAYOUT_TEMPLATES."""
        if self.built >= MAX_LAYOUT_TEMPLATES:
            return
        self.built += 1
        layout = LayoutTemplate.of(ckpt)
        if layout is not None:
            self.current = _Template(layout, sds, wanted, layer_tensor_refs(wanted))

    def read(self, rf: RankFile) -> _RankData | None:
        """The rank's statistics read through the template, or None when its layout is not the same."""
        template = self.current
        if template is None or not template.layout.same_layout(rf.path, template.refs):
            return None
        stats = read_layers(template.wanted, rf.display, path=rf.path)
        return _RankData(rf, template.layout.checkpoint, template.sds, stats)


def _read_rank(
    rf: RankFile,
    key: str | None,
    plan: _ComparePlan,
    reference: RankFile,
    opened: tuple[Checkpoint, list[StateDictRef]] | None = None,
) -> _RankData:
    if opened is None and plan.templates is not None:
        # Same size, directory, local headers and pickle as a rank read in full: same model and layers,
        # so only the statistics are read (the model check, pickle audit and layer lookup carry over).
        reused = plan.templates.read(rf)
        if reused is not None:
            return reused
    ckpt, sds = opened or _open_rank(rf, key, plan.state_dicts)
    _check_same_model(plan, rf, reference, sds)
    by_sd = {sd.name: (sd, _layers_by_name(sd)) for sd in sds}
    wanted = []
    for lp in plan.layers:
        sd, layers = by_sd[lp.state_dict]
        bn = layers.get(lp.name)
        if bn is None:
            raise ModelMismatchError(f"{rf.display}: rank {rf.rank} has no BatchNorm layer '{lp.name}'")
        wanted.append((sd, bn))
    data = _RankData(rf, ckpt, sds, read_layers(wanted, rf.display))
    if plan.templates is not None:
        plan.templates.offer(ckpt, sds, wanted)
    return data


def _read_ranks(
    files: Sequence[RankFile], key: str | None, plan: _ComparePlan, jobs: int, reference: RankFile
) -> Iterator[_RankData]:
    """Read ranks in order; with ``jobs`` > 1, up to ``jobs`` files are read ahead in threads.

    File reads release the GIL, so threads help on high-latency storage; memory stays bounded by the
    ``jobs`` ranks in flight.
    """
    if jobs <= 1:
        for rf in files:
            yield _read_rank(rf, key, plan, reference)
        return
    from concurrent.futures import ThreadPoolExecutor  # on use: --jobs > 1 only

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        pending: deque[Future[_RankData]] = deque()
        queue = iter(files)
        for rf in itertools.islice(queue, jobs):
            pending.append(pool.submit(_read_rank, rf, key, plan, reference))
        while pending:
            data = pending.popleft().result()
            for rf in itertools.islice(queue, 1):
                pending.append(pool.submit(_read_rank, rf, key, plan, reference))
            yield data


def _plan_from_reference(
    files: list[RankFile], key: str | None, eps: float, ignore: Sequence[str]
) -> tuple[_ComparePlan, tuple[Checkpoint, list[StateDictRef]]]:
    ref_ckpt, ref_sds = _open_rank(files[0], key, None)
    plan = _ComparePlan(
        eps, [sd.name for sd in ref_sds], {sd.name: model_signature(sd) for sd in ref_sds}, []
    )
    for sd in ref_sds:
        for bn in find_bn_layers(sd.tensors):
            if is_ignored(bn.name, ignore):
                continue
            problem = layer_problem(sd, bn)
            if problem:
                raise InputError(
                    f"{files[0].display}: layer '{bn.display_name}': {problem}; fix or --ignore it"
                )
            plan.add_layer(sd.name, bn.name, sd.tensors[bn.running_mean].shape[0])
    plan.merger = RankMerger(plan.channels)
    return plan, (ref_ckpt, ref_sds)


def _first_pass(
    files: list[RankFile],
    plan: _ComparePlan,
    opened_reference: tuple[Checkpoint, list[StateDictRef]],
    key: str | None,
    check_weights: bool,
    jobs: int,
    inputs: list[InputInfo],
    findings: list[Finding],
) -> dict[int, list[LayerStats]]:
    """Check and pool every rank; return the statistics kept for the second pass (within the budget)."""
    cache: dict[int, list[LayerStats]] = {}
    cached_bytes = 0
    reference: _RankData | None = None
    plan.templates = None if check_weights else _Templates()
    first = _read_rank(files[0], key, plan, files[0], opened=opened_reference)
    others = _read_ranks(files[1:], key, plan, jobs, files[0])
    for index, data in enumerate(itertools.chain([first], others)):
        rf = data.rf
        inputs.append(_input_info(data.ckpt, rf.display, rf.rank, data.sds))
        findings.extend(pickle_findings(data.ckpt.globals, rf.display))
        _accumulate_rank(plan, data, findings)
        if reference is None:
            reference = data
        elif check_weights:
            findings.extend(_compare_other_tensors(reference.sds, data.sds, rf, files[0]))
        if cached_bytes + data.stats_bytes <= CACHE_BUDGET_BYTES:
            cache[index] = data.stats
            cached_bytes += data.stats_bytes
    return cache


def _check_same_model(plan: _ComparePlan, rf: RankFile, ref: RankFile, sds: list[StateDictRef]) -> None:
    for sd in sds:
        diff = describe_model_difference(plan.signatures[sd.name], model_signature(sd))
        if diff:
            where = f" in state dict '{sd.name}'" if sd.name else ""
            raise ModelMismatchError(
                f"{rf.display}: rank {rf.rank} is not the same model as {ref.display}{where}: {diff}; "
                "compare only checkpoints of one training run and one step"
            )


def _accumulate_rank(plan: _ComparePlan, data: _RankData, findings: list[Finding]) -> None:
    rf = data.rf
    plan.merger.add(_concatenated(data.stats, "mean"), _concatenated(data.stats, "var"))
    for i in layers_to_check(data.stats, plan.eps):
        lp = plan.layers[i]
        findings.extend(
            health_findings(data.stats[i], plan.eps, file=rf.display, state_dict=lp.state_dict,
                            layer=lp.name, rank=rf.rank)
        )  # fmt: skip
    first_rank = not plan.layers or plan.layers[0].reference is None
    affine_equal = first_rank or _all_affine_equal(plan, data.stats)
    for lp, stats in zip(plan.layers, data.stats, strict=True):
        if stats.num_batches_tracked is not None:
            lp.counters[rf.rank] = stats.num_batches_tracked
        if lp.reference is None:
            lp.reference = stats
        elif not affine_equal:
            findings.extend(_affine_findings(lp, stats, rf))


def _all_affine_equal(plan: _ComparePlan, stats: list[LayerStats]) -> bool:
    """Whether every layer's weight and bias equal the reference rank's (one comparison for all layers)."""
    for attr in ("weight", "bias"):
        pairs = [
            (getattr(lp.reference, attr), getattr(s, attr)) for lp, s in zip(plan.layers, stats, strict=True)
        ]
        present = [(a, b) for a, b in pairs if a is not None and b is not None]
        if present and not np.array_equal(
            np.concatenate([a for a, _ in present]), np.concatenate([b for _, b in present]), equal_nan=True
        ):
            return False
    return True


def _affine_findings(lp: _LayerPlan, stats: LayerStats, rf: RankFile) -> list[Finding]:
    assert lp.reference is not None
    out = []
    for attr, diff in differing_affine(lp.reference, stats):
        tensor = f"{lp.name}.{attr}" if lp.name else attr
        out.append(
            Finding(
                Severity.ERROR,
                FindingKind.WEIGHTS_DIFFER,
                f"'{tensor}' differs between the reference rank and rank {rf.rank} (max |diff| "
                f"{diff:.3g}): DDP keeps parameters identical, so these files are not ranks of one "
                "step of one run",
                file=rf.display,
                state_dict=lp.state_dict,
                tensor=tensor,
                rank=rf.rank,
            )
        )
    return out


def _compare_other_tensors(
    ref_sds: list[StateDictRef], sds: list[StateDictRef], rf: RankFile, ref: RankFile
) -> list[Finding]:
    out = []
    for ref_sd, sd in zip(ref_sds, sds, strict=True):
        bn_keys = {normalize_key(k) for bn in find_bn_layers(sd.tensors) for k in bn.all_keys()}
        by_norm = {normalize_key(k): t for k, t in sd.tensors.items()}
        for k, ref_t in ref_sd.tensors.items():
            norm = normalize_key(k)
            if norm in bn_keys:
                continue
            # One tensor of each rank at a time: memory stays at the largest tensor, twice.
            a, b = read_tensor(ref_t), read_tensor(by_norm[norm])
            if np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"):
                continue
            diff = _max_abs_diff(a, b)
            out.append(
                Finding(
                    Severity.ERROR,
                    FindingKind.WEIGHTS_DIFFER,
                    f"'{norm}' differs between {ref.display} and rank {rf.rank} (max |diff| {diff}); "
                    "ranks of one DDP step hold identical parameters",
                    file=rf.display,
                    state_dict=sd.name,
                    tensor=norm,
                    rank=rf.rank,
                )
            )
    return out


def _max_abs_diff(a: np.ndarray, b: np.ndarray) -> str:
    try:
        return f"{float(np.nanmax(np.abs(a.astype(np.float64) - b.astype(np.float64)))):.3g}"
    except (TypeError, ValueError):
        return "n/a"


def _second_pass(
    files: list[RankFile], key: str | None, plan: _ComparePlan, cache: dict[int, list[LayerStats]], jobs: int
) -> None:
    mean, var = plan.merger.result(MergeMethod.POOLED)
    plan.divergence = DivergenceAccumulator(mean, var, plan.eps, [lp.start for lp in plan.layers])
    uncached = [rf for i, rf in enumerate(files) if i not in cache]
    reread = _read_ranks(uncached, key, plan, jobs, files[0])
    for index in range(len(files)):
        stats = cache[index] if index in cache else next(reread).stats
        plan.divergence.add(index, _concatenated(stats, "mean"), _concatenated(stats, "var"))


def _divergence_rows(
    plan: _ComparePlan,
    files: list[RankFile],
    warn_kl: float,
    error_kl: float,
    layer: str | None,
    findings: list[Finding],
) -> tuple[list[LayerRow], list[dict[str, Any]]]:
    rows: list[LayerRow] = []
    channel_rows: list[dict[str, Any]] = []
    assert plan.divergence is not None
    all_mean, all_var = plan.merger.result(MergeMethod.POOLED)
    for depth, lp in enumerate(plan.layers):
        div = plan.divergence.layer(depth)
        mean, var = all_mean[lp.part], all_var[lp.part]
        channel = int(np.argmax(div.kl)) if lp.channels else 0
        max_kl = float(div.kl[channel]) if lp.channels else 0.0
        rank = files[int(div.kl_rank[channel])].rank if lp.channels else None
        severity = _severity_for(max_kl, warn_kl, error_kl)
        metrics: dict[str, float | int | None] = {
            "max_kl": max_kl,
            "max_shift": float(div.shift.max()) if lp.channels else 0.0,
            "max_var_ratio": float(div.var_ratio.max()) if lp.channels else 1.0,
            "channels_over_warn": int((div.kl >= warn_kl).sum()),
            "layer_index": depth,
        }
        rows.append(
            LayerRow(
                lp.name,
                lp.state_dict,
                severity,
                lp.channels,
                metrics,
                rank,
                channel,
                # per_rank_*: one value per input, in the order of Report.inputs (for --plot).
                arrays={
                    "pooled_mean": _channel_values(mean),
                    "pooled_var": _channel_values(var),
                    "per_rank_max_kl": list(div.per_rank_max_kl),
                    "per_rank_max_shift": list(div.per_rank_max_shift),
                },
            )
        )
        if severity is not Severity.OK:
            findings.append(
                _divergence_finding(lp, severity, max_kl, metrics, rank, channel, files, warn_kl, error_kl)
            )
        if layer is not None and lp.name == layer and not channel_rows:
            channel_rows = _compare_channels(lp, div, mean, var, files)
    if layer is not None and not channel_rows:
        raise InputError(
            f"{files[0].display}: no BatchNorm layer named '{layer}'; " + _layer_names_hint(rows)
        )
    rows.sort(key=lambda r: (-r.severity.rank, -(r.metrics.get("max_kl") or 0.0)))
    sort_by_layer_metric(findings, rows, FindingKind.DIVERGENCE)
    return rows, channel_rows


def _channel_values(values: np.ndarray) -> list[float]:
    # One NumPy check here saves the JSON writer a Python-level check of every value.
    return FiniteFloats(values.tolist()) if np.isfinite(values).all() else values.tolist()


def _divergence_finding(
    lp: _LayerPlan,
    severity: Severity,
    max_kl: float,
    metrics: dict[str, float | int | None],
    rank: int | None,
    channel: int,
    files: list[RankFile],
    warn_kl: float,
    error_kl: float,
) -> Finding:
    limit = error_kl if severity is Severity.ERROR else warn_kl
    name = lp.name or "<root>"
    message = (
        f"layer '{name}': rank {rank} channel {channel} diverges from the pooled statistics of "
        f"{len(files)} ranks (KL {max_kl:.3g} >= {limit:g}; mean shift up to {metrics['max_shift']:.2f} std, "
        f"variance ratio up to {metrics['max_var_ratio']:.2f})"
    )
    return Finding(
        severity,
        FindingKind.DIVERGENCE,
        message,
        file=files[0].display,
        state_dict=lp.state_dict,
        layer=lp.name,
        rank=rank,
        channel=channel,
    )


def _compare_channels(
    lp: _LayerPlan, div: Divergence, mean: np.ndarray, var: np.ndarray, files: list[RankFile]
) -> list[dict[str, Any]]:
    return [
        {
            "channel": c,
            "pooled_mean": float(mean[c]),
            "pooled_var": float(var[c]),
            "max_kl": float(div.kl[c]),
            "worst_rank": files[int(div.kl_rank[c])].rank,
            "max_shift": float(div.shift[c]),
            "max_var_ratio": float(div.var_ratio[c]),
        }
        for c in range(lp.channels)
    ]


def _counter_findings(plan: _ComparePlan, files: list[RankFile]) -> list[Finding]:
    for lp in plan.layers:
        values = set(lp.counters.values())
        if len(values) > 1:
            ref_rank = files[0].rank
            ref_value = lp.counters.get(ref_rank)
            other_rank, other = next((r, v) for r, v in lp.counters.items() if v != ref_value)
            return [
                Finding(
                    Severity.WARN,
                    FindingKind.COUNTER_MISMATCH,
                    f"layer '{lp.name or '<root>'}': num_batches_tracked differs across ranks (rank "
                    f"{ref_rank}: {ref_value}, rank {other_rank}: {other}); DDP ranks take the same "
                    "number of steps, so these files may come from different steps or runs",
                    file=files[0].display,
                    state_dict=lp.state_dict,
                    layer=lp.name,
                    rank=other_rank,
                )
            ]
    return []


def _compare_next_step(files: list[RankFile], findings: tuple[Finding, ...]) -> str | None:
    kinds = {f.kind for f in findings if f.severity is Severity.ERROR}
    if FindingKind.WEIGHTS_DIFFER in kinds:
        return "check that the files are the ranks of one step of one run before repairing them"
    if FindingKind.DIVERGENCE in kinds or FindingKind.NONFINITE in kinds:
        names = " ".join(f.display for f in files) if len(files) <= 2 else f'"{_common_pattern(files)}"'
        return (
            f"bnaudit average {names} -o averaged.pt   (or, better, bnaudit recalibrate {files[0].display} "
            "--model MODULE:FACTORY --data MODULE:LOADER -o fixed.pt)"
        )
    return None


def _common_pattern(files: list[RankFile]) -> str:
    first = files[0].display
    digits = str(files[0].rank)
    index = first.rfind(digits)
    return first[:index] + "*" + first[index + len(digits) :] if index >= 0 else first
