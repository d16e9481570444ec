"""What the rank scan reads and how it words its findings: one frozen plan, built by each command."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from bnaudit.audit.rank_reader import ScanLayer, Signature
from bnaudit.bn.layer_kind import InputKind, input_kinds
from bnaudit.bn.layers import BnLayer, find_bn_layers
from bnaudit.checkpoint.rank_files import RankFile
from bnaudit.checkpoint.types import StateDictRef
from bnaudit.errors import NoBatchNormError


@dataclass(frozen=True)
class ScanTexts:
    """The command's own ends of the scan's messages.

    Attributes:
        mismatch_fix: the next step when a rank is not the same model as the first.
        affine_consequence: what differing affine parameters mean for the command ("" or a clause).
        counter_advice: what a differing ``num_batches_tracked`` means for the command.
    """

    mismatch_fix: str
    affine_consequence: str
    counter_advice: str


@dataclass(frozen=True)
class RankWeights:
    """How much each rank counts in the weighted merge.

    Attributes:
        explicit: one weight per rank (``--rank-weights``), or None.
        from_metadata: without explicit weights, each rank counts the samples its metadata records (as
            ``save_rank_stats`` writes them) when the first rank records one, else 1; the ranks must agree
            on recording one.
    """

    explicit: tuple[float, ...] | None = None
    from_metadata: bool = False

    @property
    def equal(self) -> bool:
        """Every rank counts 1 whatever the files say: the weighted merge is the equal one."""
        return self.explicit is None and not self.from_metadata


@dataclass(frozen=True)
class ScanPlan:
    """Everything the two passes of the scan need, fixed before the first rank after the reference is read.

    Attributes:
        files: the ranks, by rank; the first is the reference the others are checked against.
        state_dicts: the names of the state dicts read from every rank.
        signatures: state dict name -> the reference rank's model signature.
        layers: the layers read, in order (their channels concatenated in that order).
        eps: BatchNorm's eps for the health checks and divergence metrics.
        texts: the command's wording.
        weights: the rank weights of the weighted merge.
        jobs: ranks read ahead in threads.
        reuse_layouts: read ranks laid out like an earlier one through its parsed layout.
        check_weights: compare every other tensor with the reference rank (reads every rank in full).
        digest: hash each rank's stored statistics (provenance).
    """

    files: tuple[RankFile, ...]
    state_dicts: tuple[str, ...]
    signatures: Mapping[str, Signature]
    layers: tuple[ScanLayer, ...]
    eps: float
    texts: ScanTexts
    weights: RankWeights = RankWeights()
    jobs: int = 1
    reuse_layouts: bool = True
    check_weights: bool = False
    digest: bool = False

    @property
    def channels(self) -> int:
        """Channels of all layers together (the length of the concatenated vectors)."""
        return self.layers[-1].part.stop if self.layers else 0


def scan_layers(pairs: Sequence[tuple[StateDictRef, BnLayer]]) -> tuple[ScanLayer, ...]:
    """The planned layers for (state dict, layer) pairs of the reference, their channels concatenated."""
    out: list[ScanLayer] = []
    start = 0
    kinds: dict[str, dict[str, InputKind]] = {}
    for sd, bn in pairs:
        if sd.name not in kinds:
            kinds[sd.name] = input_kinds(sd.tensors, find_bn_layers(sd.tensors))
        channels = sd.tensors[bn.running_mean].shape[0]
        out.append(
            ScanLayer(sd.name, bn.name, channels, start, kinds[sd.name].get(bn.name, InputKind.UNKNOWN))
        )
        start += channels
    return tuple(out)


def no_batchnorm_error(path: str, state_dicts: Sequence[str], command: str, fix: str) -> NoBatchNormError:
    """The error for a plan without layers: nothing for ``command`` to do."""
    return NoBatchNormError(
        f"no BatchNorm layers (keys ending in running_mean and running_var) in state dict(s) "
        f"{', '.join(n or '<root>' for n in state_dicts)}; nothing to {command}",
        path=path,
        fix=fix,
    )
