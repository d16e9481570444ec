"""Which BatchNorm layers ``average`` rewrites: each reference layer, and where the ranks hold it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from bnaudit.audit.rank_reader import model_signature
from bnaudit.audit.scan_plan import RankWeights, ScanPlan, ScanTexts, no_batchnorm_error, scan_layers
from bnaudit.bn.layers import BnLayer, find_bn_layers, is_ignored
from bnaudit.bn.layerstats import layer_problem
from bnaudit.checkpoint.discover import select_state_dicts
from bnaudit.checkpoint.rank_files import RankFile
from bnaudit.checkpoint.types import Checkpoint, StateDictRef
from bnaudit.errors import InputError, ModelMismatchError

AVERAGE_TEXTS = ScanTexts(
    mismatch_fix="average only checkpoints of one training run and one step",
    affine_consequence=" — averaging them would mix models",
    counter_advice="the reference's value is kept — check that the files come from one step",
)


@dataclass(frozen=True)
class TargetLayer:
    """A reference layer whose statistics are rewritten: its state dict and keys in the reference."""

    state_dict: StateDictRef
    layer: BnLayer


@dataclass(frozen=True)
class AveragePlan:
    """The scan of the ranks and, for each of its layers (same order), the reference layer it rewrites."""

    scan: ScanPlan
    targets: tuple[TargetLayer, ...]
    reference_display: str
    reference_format: str


@dataclass(frozen=True)
class Sources:
    """What ``average`` reads: the ranks, the first rank opened, and where the reference is."""

    files: tuple[RankFile, ...]
    rank0: Checkpoint
    reference: Checkpoint
    reference_display: str


def plan_average(
    sources: Sources, key: str | None, ignore: Sequence[str], eps: float, weights: RankWeights
) -> AveragePlan:
    """Map every (not ignored) BatchNorm layer of the reference's selected state dicts to the ranks'.

    Raises:
        InputError: a reference layer is malformed. ModelMismatchError: the ranks lack a state dict or a
            layer of the reference, or hold it with another number of channels.
        NoBatchNormError: nothing to average.
    """
    ref_display, rank0_display = sources.reference_display, sources.files[0].display
    targets = select_state_dicts(sources.reference.state_dicts, key, source=ref_display)
    rank0_sds = {sd.name: sd for sd in sources.rank0.state_dicts}
    source_names: list[str] = []
    pairs: list[tuple[StateDictRef, BnLayer]] = []
    planned: list[TargetLayer] = []
    for target in targets:
        source_name = _source_name(target.name, sources.rank0, len(targets), rank0_display)
        if source_name not in source_names:
            source_names.append(source_name)
        source = rank0_sds[source_name]
        source_layers = {bn.name: bn for bn in find_bn_layers(source.tensors)}
        for bn in find_bn_layers(target.tensors):
            if not is_ignored(bn.name, ignore):
                pairs.append((source, _source_layer(target, bn, source, source_layers, sources)))
                planned.append(TargetLayer(target, bn))
    if not planned:
        fix = "check --key and --ignore"
        raise no_batchnorm_error(ref_display, [t.name for t in targets], "average", fix)
    scan = ScanPlan(
        files=sources.files,
        state_dicts=tuple(source_names),
        signatures={name: model_signature(rank0_sds[name]) for name in source_names},
        layers=scan_layers(pairs),
        eps=eps,
        texts=AVERAGE_TEXTS,
        weights=weights,
        digest=True,
    )
    return AveragePlan(scan, tuple(planned), ref_display, str(sources.reference.format))


def _source_layer(
    target: StateDictRef,
    bn: BnLayer,
    source: StateDictRef,
    source_layers: dict[str, BnLayer],
    sources: Sources,
) -> BnLayer:
    """The ranks' layer for a reference layer, checked: present, well formed, with the same channels."""
    problem = layer_problem(target, bn)
    if problem:
        raise InputError(
            problem,
            path=sources.reference_display,
            where=f"layer '{bn.display_name}'",
            fix="fix or --ignore it",
        )
    src = source_layers.get(bn.name)
    rank0_display = sources.files[0].display
    if src is None:
        raise ModelMismatchError(
            f"has no BatchNorm layer '{bn.display_name}' of the reference's state dict "
            f"'{target.display_name}'",
            path=rank0_display,
            fix="the ranks must hold every layer of the reference (or --ignore it)",
        )
    src_shape = source.tensors[src.running_mean].shape
    ref_shape = target.tensors[bn.running_mean].shape
    if src_shape != ref_shape:
        raise ModelMismatchError(
            "has another number of channels than the reference",
            path=rank0_display,
            where=f"layer '{bn.display_name}'",
            expected=str(list(ref_shape)),
            found=str(list(src_shape)),
            fix="the ranks and the reference must be the same model",
        )
    return src


def _source_name(target: str, rank0: Checkpoint, n_targets: int, display: str) -> str:
    """The ranks' state dict for a reference state dict: the same name, or the ranks' only one."""
    names = [sd.name for sd in rank0.state_dicts]
    if target in names:
        return target
    if len(names) == 1 and n_targets == 1:
        return names[0]
    have = ", ".join(repr(n) for n in names) or "none"
    raise ModelMismatchError(
        f"the ranks have no state dict {target or '<root>'!r} of the reference (they have: {have})",
        path=display,
        fix="pass --key to pick the reference's state dict" if len(names) == 1 else "check --reference",
    )
