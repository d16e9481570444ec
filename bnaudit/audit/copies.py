"""``inspect``'s copy audit: an EMA or SWA copy of the model whose BatchNorm statistics are not its own.

A checkpoint often holds a second copy of the model: timm's ``state_dict_ema``, ``model_ema``, ``ema``,
``swa_model``, ``torch.optim.swa_utils.AveragedModel`` (keys under ``module.`` and an ``n_averaged``
buffer), Lightning's averaging callbacks' state. A copy is found by structure — a state dict with the same
set of BatchNorm layers as the live model (the first state dict) — whatever its name. Its statistics are
stale when they

- are still at their initial values (mean 0, var 1) in every layer while the live model's moved: an EMA
  that averages ``parameters()`` only never touches the buffers (pytorch #84053);
- are bit-identical to the live model's while the weights (BatchNorm's affine parameters) differ: copied
  instead of averaged, or — for an averaged model (SWA) — not recomputed after averaging:
  ``AveragedModel(use_buffers=False)`` copies the live buffers at every ``update_parameters`` (torch 2.x)
  and only ``update_bn`` recomputes them (Lightning #8811, composer #624). The weights and the statistics
  then describe different networks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from bnaudit.audit.read_state import ReadStateDict, trained
from bnaudit.bn.layerstats import LayerStats
from bnaudit.report.model import Finding, FindingKind, Severity

_AVERAGED_MARKERS = ("swa", "averag", "n_averaged")


def _by_name(read: ReadStateDict) -> dict[str, LayerStats]:
    return {bn.name: stats for bn, stats in read.layers}


def _is_averaged(read: ReadStateDict) -> bool:
    """An SWA / AveragedModel copy: its name says so, or it holds AveragedModel's ``n_averaged`` buffer."""
    name = read.sd.name.lower()
    return any(m in name for m in _AVERAGED_MARKERS) or any(k.endswith("n_averaged") for k in read.sd.tensors)


def _same(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    return a is None or b is None or bool(np.array_equal(a, b))


def _fix(file: str, key: str) -> str:
    return (
        f"recompute them for the copy's weights: bnaudit recalibrate {file} --key {key} "
        "--model MODULE:FACTORY --data MODULE:LOADER -o fixed.pt"
    )


def _stale_copy(live: dict[str, LayerStats], copy: ReadStateDict, file: str) -> Finding | None:
    pairs = [(live[name], stats) for name, stats in _by_name(copy).items()]
    averaged = _is_averaged(copy)
    label = f"{'averaged (SWA) ' if averaged else ''}copy '{copy.sd.display_name}' of the model"
    if all(not trained(c) for _, c in pairs) and any(trained(a) for a, _ in pairs):
        cause = (
            "has BatchNorm statistics still at their initial values (mean 0, var 1) in all "
            f"{len(pairs)} layers while the live model's were trained: its buffers were never updated (an "
            "EMA that averages parameters() only, or an AveragedModel whose buffers were never synced, "
            "pytorch #84053)"
        )
    elif all(np.array_equal(a.mean, c.mean) and np.array_equal(a.var, c.var) for a, c in pairs) and not all(
        _same(a.weight, c.weight) and _same(a.bias, c.bias) for a, c in pairs
    ):
        how = (
            "are the last live model's, not recomputed after averaging (AveragedModel(use_buffers=False) "
            "copies the live buffers at every update; update_bn was skipped, Lightning #8811)"
            if averaged
            else "were copied from the live model instead of averaged"
        )
        cause = (
            f"has BatchNorm statistics bit-identical to the live model's in all {len(pairs)} layers while "
            f"its weights differ: they {how}, so they describe the live weights, not the copy's"
        )
    else:
        return None
    message = f"{label} {cause}; {_fix(file, copy.sd.name)}"
    return Finding(Severity.WARN, FindingKind.STALE_COPY, message, file, copy.sd.name)


def copy_findings(read: Sequence[ReadStateDict], file: str) -> list[Finding]:
    """``stale-copy`` findings: each state dict with the live model's BatchNorm layers, set against it."""
    with_layers = [r for r in read if r.layers]
    if len(with_layers) < 2:
        return []
    live = _by_name(with_layers[0])
    copies = [r for r in with_layers[1:] if set(_by_name(r)) == set(live)]
    return [f for f in (_stale_copy(live, c, file) for c in copies) if f is not None]
