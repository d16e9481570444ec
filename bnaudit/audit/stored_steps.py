"""The step counts a checkpoint stores beside the model, read from the inert pickle's tree.

``num_batches_tracked`` counts train-mode forwards; the checkpoint often says how many optimizer steps ran:
the optimizer's per-parameter ``step`` (Adam, AdamW, RMSprop... a scalar tensor or a number; SGD stores
none), per parameter group; Lightning's ``global_step``; an ``epoch`` with a stored ``steps_per_epoch``.
Nothing here runs code: the values are plain numbers or tensors of the inert tree.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from bnaudit.audit.stored_config import CONTAINERS, stored_training
from bnaudit.checkpoint.tensors import read_tensor
from bnaudit.checkpoint.types import TensorRef
from bnaudit.errors import InputError

_OPTIMIZER_KEYS = ("optimizer", "optimizer_state_dict", "optim", "optimizers", "optimizer_states")
_ACCUMULATION = ("grad_accum_steps", "accumulate_grad_batches")


@dataclass(frozen=True)
class StoredSteps:
    """One stored count of training steps: where (``optimizer param_groups[0] step``) and how many.

    ``alternatives`` are other readings of the same source (an ``epoch`` counted from 0 or from 1).
    """

    where: str
    steps: int
    alternatives: tuple[int, ...] = ()

    @property
    def readings(self) -> tuple[int, ...]:
        return (self.steps, *self.alternatives)


def _number(value: Any) -> float | None:
    """A finite, non-negative count stored as a number or a one-value tensor; None for anything else."""
    number: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, TensorRef) and value.numel == 1:
        try:
            number = float(read_tensor(value).reshape(-1)[0])
        except (InputError, ValueError, OverflowError):  # a tensor the readers refuse is no evidence
            return None
    return number if number is not None and math.isfinite(number) and number >= 0 else None


def _optimizers(top: Mapping[Any, Any]) -> Iterator[tuple[str, Mapping[Any, Any]]]:
    for key in _OPTIMIZER_KEYS:
        value = top.get(key)
        candidates = list(enumerate(value)) if isinstance(value, list | tuple) else [(None, value)]
        for index, optimizer in candidates:
            if isinstance(optimizer, Mapping) and "state" in optimizer and "param_groups" in optimizer:
                yield (key if index is None else f"{key}[{index}]"), optimizer


def _group_steps(where: str, optimizer: Mapping[Any, Any]) -> Iterator[StoredSteps]:
    """The step of each parameter group: that of its first parameter with a ``step`` (a group's parameters
    step together; one read per group keeps a large optimizer state cheap)."""
    state, groups = optimizer.get("state"), optimizer.get("param_groups")
    if not isinstance(state, Mapping) or not isinstance(groups, list):
        return
    for g, group in enumerate(groups):
        params = group.get("params") if isinstance(group, Mapping) else None
        if not isinstance(params, list | tuple):
            continue
        for p in params:
            entry = state.get(p) if isinstance(p, int) else None
            step = _number(entry.get("step")) if isinstance(entry, Mapping) else None
            if step is not None:
                yield StoredSteps(f"{where} param_groups[{g}] step", int(step))
                break


def _steps_per_epoch(top: Mapping[Any, Any]) -> int | None:
    for scope in (top, *(top.get(name) for name in CONTAINERS)):
        if isinstance(scope, Mapping):
            value = scope.get("steps_per_epoch")
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def stored_steps(root: Any) -> list[StoredSteps]:
    """Every step count the checkpoint's top level stores (empty: none)."""
    if not isinstance(root, Mapping):
        return []
    found = [s for where, opt in _optimizers(root) for s in _group_steps(where, opt)]
    global_step = _number(root.get("global_step"))
    if global_step is not None:
        found.append(StoredSteps("global_step", int(global_step)))
    epoch, per_epoch = _number(root.get("epoch")), _steps_per_epoch(root)
    if epoch is not None and per_epoch is not None:
        # Whether the epoch saved is the one finished (1-based) or its index (0-based) is not stored.
        e = int(epoch)
        where = f"epoch {e} x steps_per_epoch {per_epoch}"
        found.append(StoredSteps(where, e * per_epoch, ((e + 1) * per_epoch,)))
    return found


def stored_accumulation(root: Any) -> int | None:
    """The gradient accumulation the stored settings give (``grad_accum_steps``...), None when unsaid."""
    training = stored_training(root)
    if training is None:
        return None
    values = [s.value for s in training.settings if s.where.rpartition(".")[2] in _ACCUMULATION]
    ints = [v for v in values if isinstance(v, int) and not isinstance(v, bool) and v > 0]
    return max(ints) if ints else None
