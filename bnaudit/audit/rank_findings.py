"""Findings about ranks that should be identical: affine parameters, other tensors, batch counters."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from bnaudit.audit.rank_reader import ScanLayer
from bnaudit.audit.scan_plan import ScanTexts
from bnaudit.bn.health import differing_affine
from bnaudit.bn.layers import find_bn_layers, normalize_key
from bnaudit.bn.layerstats import LayerStats
from bnaudit.checkpoint.rank_files import RankFile
from bnaudit.checkpoint.tensors import read_tensor
from bnaudit.checkpoint.types import StateDictRef
from bnaudit.report.model import Finding, FindingKind, Severity


def affine_findings(
    layers: Sequence[ScanLayer],
    reference: Sequence[LayerStats],
    stats: Sequence[LayerStats],
    rf: RankFile,
    texts: ScanTexts,
) -> list[Finding]:
    """An error for each layer whose weight or bias differs from the reference rank's.

    DDP keeps parameters identical across ranks; one comparison of all layers at once settles the usual case.
    """
    if _all_affine_equal(reference, stats):
        return []
    out = []
    for layer, ref, other in zip(layers, reference, stats, strict=True):
        for attr, diff in differing_affine(ref, other):
            tensor = f"{layer.name}.{attr}" if layer.name else attr
            message = (
                f"'{tensor}' differs between the reference rank and rank {rf.rank} (max |diff| {diff:.3g}): "
                "DDP keeps parameters identical, so these files are not ranks of one step of one "
                f"run{texts.affine_consequence}"
            )
            out.append(_weights_differ(message, rf, layer.state_dict, tensor))
    return out


def _weights_differ(message: str, rf: RankFile, state_dict: str, tensor: str) -> Finding:
    return Finding(
        Severity.ERROR,
        FindingKind.WEIGHTS_DIFFER,
        message,
        file=rf.display,
        state_dict=state_dict,
        tensor=tensor,
        rank=rf.rank,
    )


def _all_affine_equal(reference: Sequence[LayerStats], stats: Sequence[LayerStats]) -> bool:
    """Whether every layer's weight and bias equal the reference rank's (one comparison for all layers)."""
    for attr in ("weight", "bias"):
        pairs = [(getattr(a, attr), getattr(b, attr)) for a, b in zip(reference, stats, strict=True)]
        present = [(a, b) for a, b in pairs if a is not None and b is not None]
        if present and not np.array_equal(
            np.concatenate([a for a, _ in present]), np.concatenate([b for _, b in present]), equal_nan=True
        ):
            return False
    return True


def other_tensor_findings(
    ref_sds: Sequence[StateDictRef], sds: Sequence[StateDictRef], rf: RankFile, reference: RankFile
) -> list[Finding]:
    """An error for each non-BatchNorm tensor of a rank that differs from the reference rank's."""
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
            message = (
                f"'{norm}' differs between {reference.display} and rank {rf.rank} (max |diff| "
                f"{_max_abs_diff(a, b)}); ranks of one DDP step hold identical parameters"
            )
            out.append(_weights_differ(message, rf, sd.name, norm))
    return out


def _max_abs_diff(a: np.ndarray, b: np.ndarray) -> str:
    try:
        return f"{float(np.nanmax(np.abs(a.astype(np.float64) - b.astype(np.float64)))):.3g}"
    except (TypeError, ValueError):
        return "n/a"


def counter_findings(
    layers: Sequence[ScanLayer],
    counters: Sequence[Sequence[tuple[int, int]]],
    files: Sequence[RankFile],
    texts: ScanTexts,
) -> list[Finding]:
    """A warning for the first layer whose ``num_batches_tracked`` differs across ranks (one is enough).

    Args:
        counters: per layer, the (rank, num_batches_tracked) of every rank that stores one.
    """
    for layer, values in zip(layers, counters, strict=True):
        by_rank = dict(values)
        if len(set(by_rank.values())) > 1:
            first = files[0].rank
            first_value = by_rank.get(first)
            other_rank, other = next((r, v) for r, v in by_rank.items() if v != first_value)
            return [
                Finding(
                    Severity.WARN,
                    FindingKind.COUNTER_MISMATCH,
                    f"layer '{layer.name or '<root>'}': num_batches_tracked differs across ranks (rank "
                    f"{first}: {first_value}, rank {other_rank}: {other}); {texts.counter_advice}",
                    file=files[0].display,
                    state_dict=layer.state_dict,
                    layer=layer.name,
                    rank=other_rank,
                )
            ]
    return []
