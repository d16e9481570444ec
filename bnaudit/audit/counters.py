"""``inspect``'s counter audit: ``num_batches_tracked`` set against the other layers and the stored steps.

Every train-mode forward adds one to a layer's counter. Within one state dict the layers of a model
normally agree; a layer that counted twice as much ran twice per step (reentrant gradient checkpointing
re-runs the forward in backward and updates BatchNorm again, pytorch #96136), one that counted less was
frozen or in eval mode for part of training. Against the optimizer's steps, a ratio of k means k forwards
per step (gradient accumulation over k micro-batches when the stored settings say so; else a double
forward for k = 2), a ratio that is not whole means partial freezing or an accumulation with a remainder.
Across ranks (``compare``) counters are ``counter-mismatch``'s business, not this module's.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from bnaudit.audit.stored_steps import StoredSteps
from bnaudit.report.model import Finding, FindingKind, Severity


@dataclass(frozen=True)
class LayerCount:
    """One layer's counter: its state dict, name, ``num_batches_tracked`` and whether its stats moved."""

    state_dict: str
    layer: str
    count: int
    trained: bool


def _ratio_cause(count: int, reference: int, what: str) -> str:
    """Words for ``count`` updates where ``reference`` (``what``) were expected."""
    ratio = count / reference
    if count % reference == 0 and ratio == 2:
        return (
            f"twice {what} ({reference}): its forward ran twice per step — reentrant gradient checkpointing "
            "(torch.utils.checkpoint with use_reentrant=True) re-runs it in backward and updates the "
            "statistics again (pytorch #96136), or the module is called twice per forward"
        )
    if count % reference == 0:
        return (
            f"{ratio:g} x {what} ({reference}): {ratio:g} forwards per step — gradient accumulation over "
            f"{ratio:g} micro-batches (store the setting, e.g. grad_accum_steps, to confirm) or a module "
            "called repeatedly"
        )
    if count < reference:
        return (
            f"{ratio:.3g} x {what} ({reference}): fewer updates than steps — frozen or in eval mode for part "
            "of training, or a counter reset when training resumed"
        )
    return (
        f"{ratio:.3g} x {what} ({reference}), not a whole number: gradient accumulation with a remainder, "
        "layers frozen for part of training, or a resumed run"
    )


def _finding(group: Sequence[LayerCount], file: str, cause: str) -> Finding:
    first = group[0]
    others = f" and {len(group) - 1} other layer(s)" if len(group) > 1 else ""
    message = (
        f"layer '{first.layer or '<root>'}'{others}: num_batches_tracked = {first.count} is {cause}; "
        "check how these layers were trained — their statistics may not describe the final weights"
    )
    return Finding(Severity.WARN, FindingKind.COUNTER_ANOMALY, message, file, first.state_dict, first.layer)


def _groups(layers: Sequence[LayerCount]) -> dict[int, list[LayerCount]]:
    groups: dict[int, list[LayerCount]] = {}
    for layer in layers:
        groups.setdefault(layer.count, []).append(layer)
    return groups


def _within(layers: Sequence[LayerCount], file: str) -> list[Finding]:
    """Layers whose counter differs from most layers' (ties: the smaller count is the reference)."""
    groups = _groups(layers)
    if len(groups) < 2:
        return []
    tally = Counter({count: len(group) for count, group in groups.items()})
    reference = max(tally, key=lambda c: (tally[c], -c))
    what = "the other layers' count"
    return [_finding(g, file, _ratio_cause(c, reference, what)) for c, g in groups.items() if c != reference]


def _consistent(count: int, steps: Sequence[StoredSteps], accumulation: int) -> bool:
    # One step either way: a checkpoint saved between the forward and the optimizer step.
    return any(abs(count - accumulation * r) <= accumulation for s in steps for r in s.readings)


def counter_findings(
    layers: Sequence[LayerCount], steps: Sequence[StoredSteps], accumulation: int | None, file: str
) -> list[Finding]:
    """``counter-anomaly`` findings for the layers of one state dict.

    Args:
        layers: the state dict's layers that store a counter.
        steps: the step counts the checkpoint stores (empty: only the layers are compared).
        accumulation: the stored gradient accumulation (None: not stored).
        file: the checkpoint, for the findings.
    """
    # A counter of 0 is never-updated's (bn/health.py): a note beside set statistics, a warning at reset.
    counted = [x for x in layers if x.count]
    usable = [s for s in steps if s.steps > 0]
    if not usable:
        return _within(counted, file)
    k = accumulation or 1
    reference = usable[0]
    scale = f" x the stored gradient accumulation {k}" if k > 1 else ""
    return [
        _finding(group, file, _ratio_cause(count, reference.steps * k, f"{reference.where}{scale}"))
        for count, group in _groups(counted).items()
        if not _consistent(count, usable, k)
    ]
