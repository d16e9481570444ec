"""``average``: merge per-rank BatchNorm statistics into the reference checkpoint (the offline all-reduce)."""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bnaudit.audit.compare import describe_model_difference, model_signature
from bnaudit.bn.layers import BnLayer, find_bn_layers, is_ignored
from bnaudit.bn.layerstats import (
    LayerStats,
    differing_affine,
    health_findings,
    layer_problem,
    read_layer,
    read_layers,
)
from bnaudit.bn.pickle_policy import pickle_findings
from bnaudit.bn.stats import DEFAULT_EPS, DivergenceAccumulator, MergeMethod, RankMerger, kl_normal
from bnaudit.checkpoint import load_checkpoint
from bnaudit.checkpoint.discover import select_state_dicts
from bnaudit.checkpoint.provenance import (
    header_entry,
    input_records,
    samples_from_metadata,
    sidecar_path,
    sidecar_text,
)
from bnaudit.checkpoint.rank_files import RankFile, resolve_rank_files
from bnaudit.checkpoint.tensors import read_tensor
from bnaudit.checkpoint.types import Checkpoint, StateDictRef, TensorRef
from bnaudit.checkpoint.writer import TensorPatch, WriteResult, check_output_path, write_patched
from bnaudit.defaults import CONVERSION_FORMATS
from bnaudit.errors import InputError, ModelMismatchError, NoBatchNormError, UsageError
from bnaudit.report.model import Finding, FindingKind, InputInfo, LayerRow, Report, Severity, sort_findings
from bnaudit.report.sections import AverageOutcome, Column, Command

log = logging.getLogger(__name__)

OUTPUT_FORMATS = CONVERSION_FORMATS
_TORCH_FORMATS = ("torch-zip", "torch-legacy")


# The layer table's columns: compare's numbers for the ranks, then what the write changes.
AVERAGE_COLUMNS = (
    Column("worst rank", attribute="worst_rank"),
    Column("KL before", "max_kl_before"),
    Column("shift before (std)", "max_shift_before"),
    Column("reference KL", "reference_kl"),
    Column("mean move (std)", "mean_move_std"),
    Column("var change (x)", "var_change_ratio"),
)


@dataclass
class _Layer:
    """One layer to merge: where it is in the reference (target) and in the ranks (source), and the merges."""

    target_sd: str
    source_sd: str
    target_dict: StateDictRef
    target: BnLayer
    source: BnLayer
    channels: int
    merger: RankMerger  # weighted: what is written
    pooled_equal: RankMerger  # equal weights: the divergence "before", exactly as compare measures it
    divergence: DivergenceAccumulator | None = None
    first: LayerStats | None = None
    counters: dict[int, int] = field(default_factory=dict)


@dataclass
class _Plan:
    ref: Checkpoint
    targets: dict[str, StateDictRef]
    sources: list[str]  # the ranks' state dict names read
    layers: list[_Layer]
    signatures: dict[str, dict[str, tuple[tuple[int, ...], str]]] = field(default_factory=dict)


@dataclass
class AverageResult:
    """What :func:`average_checkpoints` did.

    Attributes:
        report: the Report (command ``average``): one row per merged layer, findings about the inputs.
        output: the checkpoint written, or None (dry run, or refused).
        sidecar: the provenance file written next to it, or None.
        refused: why nothing was written although the run was not a dry run (an error finding), else None.
        weights: the rank weights used (sample counts, or 1.0 each).
        patches: the new statistics, one per tensor rewritten (also for a dry run).
    """

    report: Report
    output: Path | None
    sidecar: Path | None
    refused: str | None
    weights: list[float]
    patches: list[TensorPatch]


def _resolve_method(method: MergeMethod | str) -> MergeMethod:
    try:
        return MergeMethod(method)
    except ValueError:
        raise UsageError(f"--method {method!r} is not one of: pooled, mean") from None


def _check_weights(weights: Sequence[float] | None, files: list[RankFile]) -> list[float] | None:
    if weights is None:
        return None
    if len(weights) != len(files):
        raise UsageError(
            f"--rank-weights has {len(weights)} value(s) but there are {len(files)} ranks; pass one sample "
            "count per rank, in rank order (e.g. 3,3,3,2)"
        )
    for w in weights:
        if not (math.isfinite(w) and w > 0):
            raise UsageError(
                f"--rank-weights: {w} is not a positive number; pass sample counts such as 3,3,3,2"
            )
    return [float(w) for w in weights]


def _load(path: Path, display: str) -> Checkpoint:
    ckpt = load_checkpoint(path)
    for warning in ckpt.warnings:
        log.warning("%s: %s", display, warning)
    return ckpt


def _source_name(target: str, rank0: Checkpoint, n_targets: int, display: str) -> str:
    names = [sd.name for sd in rank0.state_dicts]
    if target in names:
        return target
    if len(names) == 1 and n_targets == 1:
        return names[0]
    have = ", ".join(repr(n) for n in names) or "none"
    hint = "pass --key to pick the reference's state dict" if len(names) == 1 else "check --reference"
    raise ModelMismatchError(
        f"{display}: the ranks have no state dict {target or '<root>'!r} of the reference (they have: "
        f"{have}); "
        f"{hint}"
    )


def _plan(
    ref: Checkpoint,
    ref_display: str,
    rank0: Checkpoint,
    rank0_display: str,
    key: str | None,
    ignore: Sequence[str],
) -> _Plan:
    targets = select_state_dicts(ref.state_dicts, key, source=ref_display)
    plan = _Plan(ref, {sd.name: sd for sd in targets}, [], [])
    rank0_sds = {sd.name: sd for sd in rank0.state_dicts}
    for target in targets:
        source_name = _source_name(target.name, rank0, len(targets), rank0_display)
        if source_name not in plan.sources:
            plan.sources.append(source_name)
        source_layers = {bn.name: bn for bn in find_bn_layers(rank0_sds[source_name].tensors)}
        for bn in find_bn_layers(target.tensors):
            if is_ignored(bn.name, ignore):
                continue
            problem = layer_problem(target, bn)
            if problem:
                raise InputError(f"{ref_display}: layer '{bn.display_name}': {problem}; fix or --ignore it")
            src = source_layers.get(bn.name)
            if src is None:
                raise ModelMismatchError(
                    f"{rank0_display}: has no BatchNorm layer '{bn.display_name}' of the reference's state "
                    "dict "
                    f"'{target.display_name}'; the ranks must hold every layer of the reference (or --ignore "
                    "it)"
                )
            src_shape = rank0_sds[source_name].tensors[src.running_mean].shape
            ref_shape = target.tensors[bn.running_mean].shape
            if src_shape != ref_shape:
                raise ModelMismatchError(
                    f"{rank0_display}: layer '{bn.display_name}' has {list(src_shape)} channels, the "
                    "reference "
                    f"{list(ref_shape)}; the ranks and the reference must be the same model"
                )
            channels = ref_shape[0]
            plan.layers.append(
                _Layer(
                    target.name,
                    source_name,
                    target,
                    bn,
                    src,
                    channels,
                    RankMerger(channels),
                    RankMerger(channels),
                )
            )
    plan.signatures = {name: model_signature(rank0_sds[name]) for name in plan.sources}
    return plan


def _rank_sds(plan: _Plan, ckpt: Checkpoint, rf: RankFile) -> dict[str, StateDictRef]:
    found = {sd.name: sd for sd in ckpt.state_dicts}
    out = {}
    for name in plan.sources:
        sd = found.get(name)
        if sd is None:
            have = ", ".join(s.display_name for s in ckpt.state_dicts) or "none"
            raise ModelMismatchError(
                f"{rf.display}: rank {rf.rank} has no state dict '{name or '<root>'}' (it has: {have}); all "
                "ranks must be checkpoints of the same model and layout"
            )
        diff = describe_model_difference(plan.signatures[name], model_signature(sd))
        if diff:
            where = f" in state dict '{name}'" if name else ""
            raise ModelMismatchError(
                f"{rf.display}: rank {rf.rank} is not the same model as the first rank{where}: {diff}; "
                "average only checkpoints of one training run and one step"
            )
        out[name] = sd
    return out


def _raw_bytes(ref: TensorRef) -> bytes:
    """The tensor's bytes as stored (for the provenance hash); decoded values when they are not contiguous."""
    if ref.storage.compressed or not ref.is_contiguous():
        return np.ascontiguousarray(read_tensor(ref)).tobytes()
    start, end = ref.byte_span()
    fd = os.open(ref.storage.path, os.O_RDONLY)
    try:
        return os.pread(fd, end - start, start)
    finally:
        os.close(fd)


def _rank_weight(
    rf: RankFile, ckpt: Checkpoint, explicit: list[float] | None, index: int, from_meta: bool
) -> float:
    if explicit is not None:
        return explicit[index]
    try:
        samples = samples_from_metadata(ckpt.metadata)
    except ValueError as exc:
        raise InputError(f"{rf.display}: {exc}; re-save the file or pass --rank-weights") from None
    if (samples is not None) != from_meta:
        raise InputError(
            f"{rf.display}: rank {rf.rank} {'records no' if from_meta else 'records a'} sample count but the "
            f"first rank {'does' if from_meta else 'does not'}; pass --rank-weights to set every rank's "
            "weight"
        )
    return 1.0 if samples is None else samples


def _affine_findings(layer: _Layer, stats: LayerStats, rf: RankFile) -> list[Finding]:
    assert layer.first is not None
    out = []
    for attr, _ in differing_affine(layer.first, stats):
        tensor = f"{layer.target.name}.{attr}" if layer.target.name else attr
        out.append(
            Finding(
                Severity.ERROR,
                FindingKind.WEIGHTS_DIFFER,
                f"'{tensor}' differs between the first rank and rank {rf.rank}: DDP keeps parameters "
                "identical, "
                "so these files are not ranks of one step of one run — averaging them would mix models",
                file=rf.display,
                state_dict=layer.source_sd,
                tensor=tensor,
                rank=rf.rank,
            )
        )
    return out


@dataclass
class _Pass1:
    weights: list[float]
    hashes: list[str]
    inputs: list[InputInfo]
    findings: list[Finding]


def _first_pass(
    plan: _Plan, files: list[RankFile], rank0: Checkpoint, explicit: list[float] | None, eps: float
) -> _Pass1:
    result = _Pass1([], [], [], [])
    from_meta = explicit is None and samples_from_metadata_safe(rank0) is not None
    for index, rf in enumerate(files):
        ckpt = rank0 if index == 0 else _load(rf.path, rf.display)
        sds = _rank_sds(plan, ckpt, rf)
        weight = _rank_weight(rf, ckpt, explicit, index, from_meta)
        result.weights.append(weight)
        result.inputs.append(InputInfo(rf.display, ckpt.format, rf.rank, tuple(plan.sources)))
        result.findings.extend(pickle_findings(ckpt.globals, rf.display))
        digest = hashlib.sha256()
        rank_stats = read_layers([(sds[layer.source_sd], layer.source) for layer in plan.layers], rf.display)
        for layer, stats in zip(plan.layers, rank_stats, strict=True):
            sd = sds[layer.source_sd]
            for key in layer.source.stat_keys():
                digest.update(_raw_bytes(sd.tensors[key]))
            layer.merger.add(stats.mean, stats.var, weight)
            layer.pooled_equal.add(stats.mean, stats.var)
            result.findings.extend(
                health_findings(
                    stats, eps, file=rf.display, state_dict=sd.name, layer=layer.target.name, rank=rf.rank
                )
            )
            if stats.num_batches_tracked is not None:
                layer.counters[rf.rank] = stats.num_batches_tracked
            if layer.first is None:
                layer.first = stats
            else:
                result.findings.extend(_affine_findings(layer, stats, rf))
        result.hashes.append(digest.hexdigest())
    return result


def samples_from_metadata_safe(ckpt: Checkpoint) -> float | None:
    """The sample count a per-rank statistics file records, or None (also for an unreadable entry)."""
    try:
        return samples_from_metadata(ckpt.metadata)
    except ValueError:
        return None


def _second_pass(plan: _Plan, files: list[RankFile], eps: float) -> None:
    for layer in plan.layers:
        mean, var = layer.pooled_equal.result(MergeMethod.POOLED)
        layer.divergence = DivergenceAccumulator(mean, var, eps=eps)
    for index, rf in enumerate(files):
        sds = _rank_sds(plan, _load(rf.path, rf.display), rf)
        rank_stats = read_layers([(sds[layer.source_sd], layer.source) for layer in plan.layers], rf.display)
        for layer, stats in zip(plan.layers, rank_stats, strict=True):
            assert layer.divergence is not None
            layer.divergence.add(index, stats.mean, stats.var)


def _counter_findings(plan: _Plan, files: list[RankFile]) -> list[Finding]:
    for layer in plan.layers:
        if len(set(layer.counters.values())) > 1:
            first = files[0].rank
            other_rank, other = next(
                (r, v) for r, v in layer.counters.items() if v != layer.counters.get(first)
            )
            return [
                Finding(
                    Severity.WARN,
                    FindingKind.COUNTER_MISMATCH,
                    f"layer '{layer.target.name or '<root>'}': num_batches_tracked differs across ranks "
                    "(rank "
                    f"{first}: {layer.counters.get(first)}, rank {other_rank}: {other}); the reference's "
                    "value is "
                    "kept — check that the files come from one step",
                    file=files[0].display,
                    state_dict=layer.source_sd,
                    layer=layer.target.name,
                    rank=other_rank,
                )
            ]
    return []


def _layer_row(
    layer: _Layer,
    new_mean: np.ndarray,
    new_var: np.ndarray,
    files: list[RankFile],
    ref_display: str,
    eps: float,
) -> tuple[LayerRow, list[Finding]]:
    assert layer.divergence is not None
    div = layer.divergence.result
    old = read_layer(layer.target_dict, layer.target, ref_display)
    findings: list[Finding] = []
    with np.errstate(divide="ignore", invalid="ignore"):
        move = np.abs(new_mean - old.mean) / np.sqrt(old.var + eps)
        ratio = np.maximum((new_var + eps) / (old.var + eps), (old.var + eps) / (new_var + eps))
        ref_kl = kl_normal(new_mean, new_var + eps, old.mean, old.var + eps)
    bad = ~np.isfinite(new_mean) | ~np.isfinite(new_var) | (new_var < 0)
    severity = Severity.OK
    if bad.any():
        severity = Severity.ERROR
        ch = int(np.argmax(bad))
        findings.append(
            Finding(
                Severity.ERROR,
                FindingKind.NONFINITE,
                f"layer '{layer.target.display_name}': the merged statistics of channel {ch} are not usable "
                f"(mean {new_mean[ch]:.3g}, var {new_var[ch]:.3g}); nothing is written — fix the inputs or "
                "recalibrate with `bnaudit recalibrate`",
                file=ref_display,
                state_dict=layer.target_sd,
                layer=layer.target.name,
                channel=ch,
            )
        )
    channel = int(np.argmax(div.kl)) if layer.channels else 0
    metrics: dict[str, float | int | None] = {
        "max_kl_before": float(div.kl[channel]) if layer.channels else 0.0,
        "max_shift_before": float(div.shift.max()) if layer.channels else 0.0,
        "max_var_ratio_before": float(div.var_ratio.max()) if layer.channels else 1.0,
        "reference_kl": _finite_max(ref_kl),
        "mean_move_std": _finite_max(move),
        "var_change_ratio": _finite_max(ratio),
    }
    worst = files[int(div.kl_rank[channel])].rank if layer.channels else None
    row = LayerRow(layer.target.name, layer.target_sd, severity, layer.channels, metrics, worst, channel)
    return row, findings


def _finite_max(values: np.ndarray) -> float | None:
    finite = values[np.isfinite(values)]
    return float(finite.max()) if finite.size else None


def _patches(plan: _Plan, method: MergeMethod) -> list[TensorPatch]:
    patches = []
    for layer in plan.layers:
        mean, var = layer.merger.result(method)
        target = plan.targets[layer.target_sd]
        for key, values in ((layer.target.running_mean, mean), (layer.target.running_var, var)):
            ref = target.tensors[key]
            patches.append(TensorPatch(layer.target_sd, key, ref, values.reshape(ref.shape)))
    return patches


def _output_format(ref: Checkpoint, to: str | None, display: str) -> str:
    if to is not None and to not in OUTPUT_FORMATS:
        raise UsageError(f"--to {to!r} is not one of: {', '.join(OUTPUT_FORMATS)}")
    if ref.format not in (*_TORCH_FORMATS, "safetensors"):
        raise UsageError(
            f"{display}: is a {ref.format} checkpoint, which bnaudit cannot write; pass --reference with a "
            "single torch.save or .safetensors file that holds the model"
        )
    current = "safetensors" if ref.format == "safetensors" else "pt"
    return to or current


def average_checkpoints(
    paths: Sequence[str | Path],
    out: str | Path | None,
    *,
    method: MergeMethod | str = MergeMethod.POOLED,
    rank_weights: Sequence[float] | None = None,
    key: str | None = None,
    reference: str | Path | None = None,
    to: str | None = None,
    force: bool = False,
    dry_run: bool = False,
    allow_unsafe_input: bool = False,
    eps: float = DEFAULT_EPS,
    ignore: Sequence[str] = (),
) -> AverageResult:
    """Merge the BatchNorm statistics of per-rank checkpoints and write them into the reference checkpoint.

    The ranks are streamed twice (memory: one rank's BatchNorm tensors plus a few float64 vectors per layer).
    Every state dict of the reference (or the one ``key`` names) gets, for each BatchNorm layer, the merge of
    the ranks' ``running_mean`` / ``running_var`` computed in float64 and written back in the tensor's own
    dtype; ``num_batches_tracked`` and everything else keep the reference's bytes (see
    :func:`bnaudit.checkpoint.writer.write_patched`). A sidecar ``OUT.bnaudit.json`` records the provenance.

    Args:
        paths: per-rank files or quoted glob patterns; ranks come from the file names.
        out: the checkpoint to write (None only with ``dry_run``).
        method: ``pooled`` (law of total variance, the default) or ``mean`` (mean of the variances).
        rank_weights: per-rank sample counts in rank order; default: the counts recorded by
            ``save_rank_stats`` when every rank has one, else equal weights.
        key: merge only this state dict of the reference.
        reference: the file whose bytes are copied (default: the lowest rank).
        to: ``pt`` or ``safetensors`` to convert; default: the reference's format.
        force: replace an existing ``out`` (never an input).
        dry_run: compute and report, write nothing.
        allow_unsafe_input: write even when an input's pickle references dangerous callables.
        eps: BatchNorm eps for the divergence metrics.
        ignore: glob patterns of layers to leave unchanged.

    Returns:
        An AverageResult; ``refused`` is set when an error finding stopped the write.

    Raises:
        UsageError / InputError / ModelMismatchError / NoBatchNormError / OutputError: see the messages
            (exit 2).
        DtypeOverflowError: a merged value does not fit its dtype (nothing written).
        InternalError: the written file failed verification (nothing written).
    """
    merge = _resolve_method(method)
    files, warnings = resolve_rank_files([str(p) for p in paths])
    for w in warnings:
        log.warning(w)
    explicit = _check_weights(rank_weights, files)
    ref_path = Path(reference) if reference is not None else files[0].path
    ref_display = str(reference) if reference is not None else files[0].display
    out_path = _check_out(out, dry_run, files, ref_path, force)
    rank0 = _load(files[0].path, files[0].display)
    ref = rank0 if reference is None else _load(ref_path, ref_display)
    fmt = _output_format(ref, to, ref_display)
    plan = _plan(ref, ref_display, rank0, files[0].display, key, ignore)
    if not plan.layers:
        raise NoBatchNormError(
            f"{ref_display}: no BatchNorm layers (keys ending in running_mean and running_var) in state "
            "dict(s) "
            f"{', '.join(n or '<root>' for n in plan.targets)}; nothing to average — check --key and --ignore"
        )
    first = _first_pass(plan, files, rank0, explicit, eps)
    _second_pass(plan, files, eps)
    if reference is not None:
        first.findings.extend(pickle_findings(ref.globals, ref_display))
    rows, findings = [], list(first.findings)
    for layer in plan.layers:
        mean, var = layer.merger.result(merge)
        row, row_findings = _layer_row(layer, mean, var, files, ref_display, eps)
        rows.append(row)
        findings.extend(row_findings)
    findings.extend(_counter_findings(plan, files))
    refused = _refusal(findings, allow_unsafe_input)
    patches = _patches(plan, merge)
    written: WriteResult | None = None
    settings = {
        "method": merge.value,
        "eps": eps,
        "key": key,
        "ignore": list(ignore),
        "ranks": len(files),
        "reference": ref_display,
        "weights": first.weights,
        "weights_source": "--rank-weights"
        if explicit
        else "metadata"
        if first.weights != [1.0] * len(files)
        else "equal",
        "to": fmt,
        "dry_run": dry_run,
    }
    dropped: list[str] = []
    if not dry_run and refused is None:
        assert out_path is not None
        record = {
            "command": "average",
            "method": merge.value,
            "eps": eps,
            "weights": first.weights,
            "weights_source": settings["weights_source"],
            "inputs": input_records(
                [f.display for f in files], [f.rank for f in files], first.weights, first.hashes
            ),
            "reference": {"path": ref_display, "format": ref.format},
            "layers": [_layer_record(r, layer) for r, layer in zip(rows, plan.layers, strict=True)],
            "num_batches_tracked": "kept from the reference (never averaged)",
        }
        written, dropped = _write(ref, patches, out_path, fmt, record, merge, len(files))
        for note in dropped:
            log.warning(note)
    report = Report(
        command=Command.AVERAGE,
        inputs=tuple(first.inputs),
        settings=settings,
        layers=tuple(sorted(rows, key=lambda r: -(r.metrics.get("max_kl_before") or 0.0))),
        findings=sort_findings(findings),
        headline="max_kl_before",
        next_step=_next_step(refused, files),
        columns=AVERAGE_COLUMNS,
        warnings=tuple(warnings + dropped),
        average=AverageOutcome(
            output=str(out_path) if written else None,
            sidecar=str(sidecar_path(out_path)) if written and out_path else None,
            refused=refused,
            reference_sha256=written.reference_sha256 if written else None,
            output_sha256=written.output_sha256 if written else None,
            stats_sha256=tuple(first.hashes),
        ),
    )
    return AverageResult(
        report,
        out_path if written else None,
        sidecar_path(out_path) if written and out_path else None,
        refused if not dry_run else None,
        first.weights,
        patches,
    )


def _check_out(
    out: str | Path | None, dry_run: bool, files: list[RankFile], ref_path: Path, force: bool
) -> Path | None:
    if out is None:
        if dry_run:
            return None
        raise UsageError("average needs -o OUT, the checkpoint to write (or --dry-run to write nothing)")
    out_path = Path(out)
    if dry_run:
        return out_path  # nothing is written, so an existing file is no obstacle
    check_output_path(out_path, [f.path for f in files] + [ref_path], force, (sidecar_path(out_path),))
    return out_path


def _refusal(findings: list[Finding], allow_unsafe_input: bool) -> str | None:
    for f in findings:
        if f.severity is not Severity.ERROR:
            continue
        if f.kind is FindingKind.UNSAFE_PICKLE:
            if allow_unsafe_input:
                continue
            return (
                f"{f.file}: its pickle references '{f.tensor}', which the output would carry too; nothing "
                "was "
                "written (pass --allow-unsafe-input to repair it anyway)"
            )
        return f"{f.file}: {f.kind.value}: {f.message}; nothing was written"
    return None


def _next_step(refused: str | None, files: list[RankFile]) -> str | None:
    if refused is None:
        return None
    return f"fix the inputs, then rerun bnaudit average (or bnaudit recalibrate {files[0].display} ...)"


def _layer_record(row: LayerRow, layer: _Layer) -> dict[str, Any]:
    return {
        "state_dict": row.state_dict,
        "layer": row.name,
        "keys": [layer.target.running_mean, layer.target.running_var],
        "channels": row.channels,
        "worst_rank_before": row.worst_rank,
        **row.metrics,
    }


def _write(
    ref: Checkpoint,
    patches: list[TensorPatch],
    out: Path,
    fmt: str,
    record: dict[str, Any],
    method: MergeMethod,
    ranks: int,
) -> tuple[WriteResult, list[str]]:
    current = "safetensors" if ref.format == "safetensors" else "pt"

    def companions(result: WriteResult) -> list[tuple[Path, str]]:
        doc = {
            **record,
            "reference": {**record["reference"], "sha256": result.reference_sha256},
            "output": {"path": str(out), "format": fmt, "sha256": result.output_sha256},
            "patched_bytes": sum(len(r.data) for r in result.ranges),
            "crc_recomputed": result.crc_entries,
            "header_metadata": result.metadata,
            "dropped": dropped,
        }
        return [(sidecar_path(out), sidecar_text(doc))]

    dropped: list[str] = []
    if fmt == current:
        meta = header_entry("average", method.value, ranks, None)
        return write_patched(ref, patches, out, metadata=meta, companions=companions), dropped
    from bnaudit.checkpoint.convert import Conversion, convert_checkpoint

    meta = header_entry("average", method.value, ranks, None)
    result = convert_checkpoint(ref, patches, out, Conversion(fmt, meta, companions, dropped))
    return result, dropped
