"""Open one rank's checkpoint, prove it holds the planned model, and read the planned layers' statistics."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from bnaudit.bn.archive_policy import checkpoint_findings
from bnaudit.bn.corrupt_pickle import unsafe_or_corrupt
from bnaudit.bn.layer_kind import InputKind
from bnaudit.bn.layers import BnLayer, find_bn_layers, normalize_key
from bnaudit.bn.layerstats import LayerStats, read_layers, read_layers_with_digest
from bnaudit.checkpoint import load_checkpoint
from bnaudit.checkpoint.discover import select_state_dicts
from bnaudit.checkpoint.rank_files import RankFile
from bnaudit.checkpoint.types import Checkpoint, StateDictRef
from bnaudit.checkpoint.unpickler import CorruptPickleError
from bnaudit.errors import InputError, ModelMismatchError
from bnaudit.report.model import Finding, FindingKind

log = logging.getLogger(__name__)

# Normalised key -> (shape, dtype) of every tensor of a state dict: what "the same model" compares.
Signature = dict[str, tuple[tuple[int, ...], str]]
# The planned layers of one rank: (state dict, layer) pairs in plan order, as bn.layerstats reads them.
Wanted = tuple[tuple[StateDictRef, BnLayer], ...]


@dataclass(frozen=True)
class ScanLayer:
    """One layer the scan reads: its ranks' state dict, its name, where its channels sit in the
    concatenated per-rank vectors (every layer's channels one after the other, in plan order), and what its
    input is (spatial feature maps or one value per sample, :mod:`bnaudit.bn.layer_kind`)."""

    state_dict: str
    name: str
    channels: int
    start: int
    kind: InputKind = InputKind.UNKNOWN

    @property
    def part(self) -> slice:
        return slice(self.start, self.start + self.channels)


@dataclass(frozen=True)
class OpenedRank:
    """A rank's checkpoint, opened, and the state dicts the scan reads from it."""

    ckpt: Checkpoint
    sds: tuple[StateDictRef, ...]


@dataclass(frozen=True)
class RankRead:
    """One rank read: its checkpoint and state dicts, the planned layers' statistics (plan order), the
    SHA-256 of their stored bytes when asked for, and the layers looked up (None when read through a
    layout template: nothing new to offer as a template)."""

    rf: RankFile
    ckpt: Checkpoint
    sds: tuple[StateDictRef, ...]
    stats: tuple[LayerStats, ...]
    digest: str | None
    wanted: Wanted | None


class UnsafeUnreadableRank(Exception):
    """A rank whose pickle references dangerous callables and whose layout cannot be read as planned.

    The unsafe pickle is the finding that matters (exit 1), not the layout error it causes (``error``).
    """

    def __init__(self, rf: RankFile, ckpt: Checkpoint, findings: list[Finding], error: InputError) -> None:
        super().__init__(str(error))
        self.rf, self.ckpt, self.findings, self.error = rf, ckpt, findings, error


def load_logged(path: str | Path, display: str) -> Checkpoint:
    """Load a checkpoint inertly and log its reader's warnings under the name the user gave.

    Raises:
        UnsafePickleError: the pickle is corrupt but referenced a dangerous callable before it broke.
        InputError: the file cannot be read.
    """
    try:
        ckpt = load_checkpoint(path)
    except CorruptPickleError as exc:
        raise unsafe_or_corrupt(exc, display) from None
    for warning in ckpt.warnings:
        log.warning("%s: %s", display, warning)
    return ckpt


_UNSAFE_KINDS = (FindingKind.UNSAFE_PICKLE, FindingKind.AMBIGUOUS_ARCHIVE)


def unsafe_findings(ckpt: Checkpoint, display: str) -> list[Finding]:
    """The findings that make a checkpoint unsafe: ``unsafe-pickle`` and ``ambiguous-archive``."""
    return [f for f in checkpoint_findings(ckpt, display) if f.kind in _UNSAFE_KINDS]


def model_signature(sd: StateDictRef) -> Signature:
    """Normalised key -> (shape, dtype) for every tensor of a state dict."""
    return {normalize_key(k): (t.shape, t.dtype) for k, t in sd.tensors.items()}


def describe_model_difference(ref: Signature, other: Signature) -> str | None:
    """How ``other`` differs from ``ref`` (missing or extra keys, a shape, a dtype), or None when equal."""
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


# Findings that outrank a layout error: the file runs code (or may, through another reader) under torch.load.
def open_rank(rf: RankFile, key: str | None, names: Sequence[str] | None) -> OpenedRank:
    """Open a rank and pick its state dicts: by ``key`` (the first rank), else the planned ``names``.

    Raises:
        UnsafeUnreadableRank: the state dicts cannot be picked and the pickle references dangerous callables.
        InputError / ModelMismatchError: the file cannot be read, or lacks a state dict.
    """
    ckpt = load_logged(rf.path, rf.display)
    try:
        return OpenedRank(ckpt, select_rank_state_dicts(ckpt, rf, key, names))
    except InputError as exc:
        unsafe = unsafe_findings(ckpt, rf.display)
        if unsafe:
            raise UnsafeUnreadableRank(rf, ckpt, unsafe, exc) from exc
        raise


def select_rank_state_dicts(
    ckpt: Checkpoint, rf: RankFile, key: str | None, names: Sequence[str] | None
) -> tuple[StateDictRef, ...]:
    """The state dicts ``key`` selects, or (``names`` given) those named, in that order.

    Raises:
        InputError: ``key`` selects nothing. ModelMismatchError: a named state dict is missing.
    """
    if names is None:
        return tuple(select_state_dicts(ckpt.state_dicts, key, source=str(ckpt.path)))
    found = {sd.name: sd for sd in ckpt.state_dicts}
    missing = [n for n in names if n not in found]
    if missing:
        have = ", ".join(s.display_name for s in ckpt.state_dicts) or "none"
        raise ModelMismatchError(
            f"has no state dict '{missing[0] or '<root>'}' (it has: {have})",
            path=rf.display,
            where=f"rank {rf.rank}",
            fix="all ranks must be checkpoints of the same model and layout",
        )
    return tuple(found[n] for n in names)


def check_same_model(
    signatures: Mapping[str, Signature],
    rf: RankFile,
    reference: RankFile,
    sds: Sequence[StateDictRef],
    fix: str,
) -> None:
    """Raise unless every state dict of ``sds`` has the signature planned from the reference rank.

    Raises:
        ModelMismatchError: a key is missing or extra, or a tensor's shape or dtype differs.
    """
    for sd in sds:
        diff = describe_model_difference(signatures[sd.name], model_signature(sd))
        if diff:
            where = f" in state dict '{sd.name}'" if sd.name else ""
            raise ModelMismatchError(
                f"is not the same model as {reference.display}{where}: {diff}",
                path=rf.display,
                where=f"rank {rf.rank}",
                fix=fix,
            )


def planned_layers(layers: Sequence[ScanLayer], rf: RankFile, sds: Sequence[StateDictRef]) -> Wanted:
    """Each planned layer looked up by name in this rank's state dicts (its own, possibly prefixed, keys).

    Raises:
        ModelMismatchError: the rank lacks a planned layer.
    """
    by_sd = {sd.name: (sd, {bn.name: bn for bn in find_bn_layers(sd.tensors)}) for sd in sds}
    wanted = []
    for layer in layers:
        sd, found = by_sd[layer.state_dict]
        bn = found.get(layer.name)
        if bn is None:
            raise ModelMismatchError(
                f"has no BatchNorm layer '{layer.name or '<root>'}'",
                path=rf.display,
                where=f"rank {rf.rank}",
                fix="all ranks must be checkpoints of the same model",
            )
        wanted.append((sd, bn))
    return tuple(wanted)


def read_stats(
    wanted: Wanted, rf: RankFile, path: Path | None, digest: bool
) -> tuple[tuple[LayerStats, ...], str | None]:
    """The planned layers' statistics of one rank (from ``path`` when it shares a template's layout), and
    the SHA-256 of their stored bytes when ``digest`` is set."""
    if digest:
        stats, sha = read_layers_with_digest(wanted, rf.display, path=path)
        return tuple(stats), sha
    return tuple(read_layers(wanted, rf.display, path=path)), None
