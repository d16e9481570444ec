"""Load a checkpoint's state dict (lazy tensors from the inert reader) into a model, finding its prefix."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from bnaudit.checkpoint.tensors import read_tensor
from bnaudit.checkpoint.types import StateDictRef
from bnaudit.errors import ModelMismatchError

if TYPE_CHECKING:
    import torch

Shape = tuple[int, ...]
MAX_LISTED = 5


@dataclass(frozen=True)
class PrefixMatch:
    """How a checkpoint's keys map onto a model's: checkpoint key = ``prefix`` + model key.

    Attributes:
        prefix: the prefix (``""``, ``module.``, ``model.``, ...).
        unused_keys: checkpoint keys the model does not take (worth an info line), in checkpoint order.
    """

    prefix: str
    unused_keys: tuple[str, ...]


@dataclass(frozen=True)
class LoadResult:
    """What :func:`load_state_dict_into` did.

    Attributes:
        prefix: the prefix used.
        loaded: number of model tensors filled from the checkpoint.
        unused_keys: checkpoint keys the model does not take.
        casts: ``(model key, checkpoint dtype, model dtype)`` for every tensor whose dtype was converted.
    """

    prefix: str
    loaded: int
    unused_keys: tuple[str, ...]
    casts: tuple[tuple[str, str, str], ...]


@dataclass(frozen=True)
class _Fit:
    prefix: str
    missing: list[str]
    mismatched: list[tuple[str, Shape, Shape]]

    @property
    def ok(self) -> bool:
        return not self.missing and not self.mismatched


def _fit(prefix: str, model_keys: Mapping[str, Shape], ckpt_keys: Mapping[str, Shape]) -> _Fit:
    missing, mismatched = [], []
    for key, shape in model_keys.items():
        found = ckpt_keys.get(prefix + key)
        if found is None:
            missing.append(key)
        elif tuple(found) != tuple(shape):
            mismatched.append((key, tuple(shape), tuple(found)))
    return _Fit(prefix, missing, mismatched)


def candidate_prefixes(model_keys: Mapping[str, Shape], ckpt_keys: Mapping[str, Shape]) -> list[str]:
    """Prefixes P such that some checkpoint key is P + a model key, most frequent first, ``""`` always first.

    Splitting every checkpoint key at each ``.`` finds wrapper prefixes generically (``module.``,
    ``_orig_mod.``, ``model.``, ``module._orig_mod.``, ``student.backbone.``...) in time linear in the keys.
    """
    counts: Counter[str] = Counter()
    for ckey in ckpt_keys:
        start = 0
        while True:
            dot = ckey.find(".", start)
            if dot < 0:
                break
            if ckey[dot + 1 :] in model_keys:
                counts[ckey[: dot + 1]] += 1
            start = dot + 1
    return ["", *(p for p, _ in counts.most_common())]


def _describe_fit(fit: _Fit, total: int) -> str:
    parts = []
    if fit.missing:
        shown = ", ".join(fit.missing[:MAX_LISTED]) + (", ..." if len(fit.missing) > MAX_LISTED else "")
        parts.append(f"{len(fit.missing)} of {total} model keys are missing ({shown})")
    if fit.mismatched:
        shown = ", ".join(
            f"{k}: model {list(m)} vs checkpoint {list(c)}" for k, m, c in fit.mismatched[:MAX_LISTED]
        )
        more = ", ..." if len(fit.mismatched) > MAX_LISTED else ""
        parts.append(f"{len(fit.mismatched)} have other shapes ({shown}{more})")
    return " and ".join(parts)


def match_prefix(
    model_keys: Mapping[str, Shape],
    ckpt_keys: Mapping[str, Shape],
    prefix: str | None = None,
    source: str = "the state dict",
) -> PrefixMatch:
    """Find the unique prefix under which every model key is a checkpoint key of the same shape.

    ``""`` wins when it fits; otherwise exactly one candidate (see :func:`candidate_prefixes`) must fit.

    Args:
        model_keys: the model's state-dict keys and shapes (``model.state_dict()``: parameters and persistent
            buffers).
        ckpt_keys: the checkpoint state dict's keys and shapes.
        prefix: a forced prefix (``--prefix``), checked but not searched.
        source: names the state dict in error messages (``ckpt.pt:state_dict_ema``).

    Returns:
        The :class:`PrefixMatch`.

    Raises:
        ModelMismatchError: no prefix fits (the message lists up to 5 missing keys and shape mismatches of the
            closest one), or several do (pass ``--prefix``).
    """
    total = len(model_keys)
    if prefix is not None:
        fit = _fit(prefix, model_keys, ckpt_keys)
        if not fit.ok:
            raise ModelMismatchError(
                f"does not fit the model under --prefix '{prefix}': {_describe_fit(fit, total)}", where=source
            )
        return PrefixMatch(prefix, _unused(prefix, model_keys, ckpt_keys))
    fits = [_fit(p, model_keys, ckpt_keys) for p in candidate_prefixes(model_keys, ckpt_keys)]
    good = [f for f in fits if f.ok]
    if good and good[0].prefix == "":
        return PrefixMatch("", _unused("", model_keys, ckpt_keys))
    if len(good) == 1:
        return PrefixMatch(good[0].prefix, _unused(good[0].prefix, model_keys, ckpt_keys))
    if len(good) > 1:
        shown = ", ".join(f"'{f.prefix}'" for f in good[:MAX_LISTED])
        raise ModelMismatchError(
            f"fits the model under several key prefixes ({shown})",
            where=source,
            fix="choose one with --prefix",
        )
    best = min(fits, key=lambda f: len(f.missing) + len(f.mismatched))
    where = f"under prefix '{best.prefix}'" if best.prefix else "without a prefix"
    raise ModelMismatchError(
        f"does not fit the model {where}: {_describe_fit(best, total)}",
        where=source,
        fix="check --model / --model-arg, or give --prefix",
    )


def _unused(prefix: str, model_keys: Mapping[str, Shape], ckpt_keys: Mapping[str, Shape]) -> tuple[str, ...]:
    used = {prefix + k for k in model_keys}
    return tuple(k for k in ckpt_keys if k not in used)


def model_key_shapes(model: torch.nn.Module) -> dict[str, Shape]:
    """The model's state-dict keys (parameters and persistent buffers) and their shapes."""
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def load_state_dict_into(
    model: torch.nn.Module, sd: StateDictRef, prefix: str | None = None, source: str | None = None
) -> LoadResult:
    """Copy a checkpoint state dict into ``model`` in place, without ``torch.load``.

    Each tensor is read through its lazy reference (``read_tensor``: bf16 arrives as float64),
    converted to the model tensor's dtype and ``copy_``-ed in under ``torch.no_grad()``, onto the model
    tensor's device. Non-persistent buffers are not in ``model.state_dict()`` and are left alone.

    Args:
        model: the model to fill.
        sd: the checkpoint's state dict.
        prefix: a forced key prefix (``--prefix``); None searches (see :func:`match_prefix`).
        source: names the state dict in error messages (default: its name).

    Returns:
        A :class:`LoadResult`.

    Raises:
        ModelMismatchError: the state dict does not fit the model.
        InputError: a tensor cannot be read from the file.
    """
    import torch

    label = source or f"state dict '{sd.display_name}'"
    targets = model.state_dict(keep_vars=True)
    ckpt_shapes = {k: tuple(ref.shape) for k, ref in sd.tensors.items()}
    match = match_prefix({k: tuple(v.shape) for k, v in targets.items()}, ckpt_shapes, prefix, label)
    casts = []
    with torch.no_grad():
        for key, target in targets.items():
            ref = sd.tensors[match.prefix + key]
            values = read_tensor(ref)
            if not values.flags.writeable:
                values = values.copy()
            source_tensor = torch.from_numpy(np.ascontiguousarray(values))
            model_dtype = str(target.dtype).removeprefix("torch.")
            if ref.dtype != model_dtype:
                casts.append((key, ref.dtype, model_dtype))
            target.copy_(source_tensor.to(dtype=target.dtype).reshape(target.shape))
    return LoadResult(match.prefix, len(targets), match.unused_keys, tuple(casts))
