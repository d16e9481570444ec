"""The training settings a checkpoint stores about BatchNorm synchronisation, read from the inert pickle.

Training scripts often save their arguments next to the weights: timm an ``argparse.Namespace`` under
``args`` (``sync_bn``, ``dist_bn``, ``no_ddp_bb``, ``grad_accum_steps``), Lightning ``hyper_parameters``,
others a plain dict (``args``, ``config``, ``cfg``, ``hparams``). Only those containers are searched, a few
levels deep, for the flags that decide whether the saved BatchNorm buffers agree across ranks.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from bnaudit.checkpoint.types import Placeholder

CONTAINERS = ("args", "hyper_parameters", "hparams", "config", "cfg", "train_args", "training_args", "opt")
FLAGS = (
    "sync_bn",
    "sync_batchnorm",
    "syncbn",
    "dist_bn",
    "no_ddp_bb",
    "broadcast_buffers",
    "forward_sync_buffers",
    "grad_accum_steps",
    "accumulate_grad_batches",
)
_MAX_DEPTH = 3


@dataclass(frozen=True)
class StoredSetting:
    """One flag found: where (``args.no_ddp_bb``) and its value (plain Python)."""

    where: str
    value: Any

    def text(self) -> str:
        return f"{self.where}={self.value!r}"


@dataclass(frozen=True)
class StoredTraining:
    """What the stored settings say: ``synchronised`` True / False / None (they do not say), and why."""

    settings: tuple[StoredSetting, ...]
    synchronised: bool | None
    meaning: str

    @property
    def evidence(self) -> tuple[str, ...]:
        return tuple(s.text() for s in self.settings)


def _fields(value: Any) -> Mapping[Any, Any] | None:
    """The named fields of a dict, a namespace (BUILD state) or a dict subclass (AttributeDict)."""
    if isinstance(value, Mapping):
        return value
    if isinstance(value, Placeholder):
        if isinstance(value.state, Mapping):
            return value.state
        if value.dict_items:
            return value.dict_items
        if value.kwargs:
            return value.kwargs
    return None


def _walk(fields: Mapping[Any, Any], where: str, depth: int) -> Iterator[StoredSetting]:
    for key, value in fields.items():
        if not isinstance(key, str):
            continue
        if key in FLAGS and (value is None or isinstance(value, bool | int | float | str)):
            yield StoredSetting(f"{where}.{key}", value)
            continue
        nested = _fields(value)
        if nested is not None and depth < _MAX_DEPTH:
            yield from _walk(nested, f"{where}.{key}", depth + 1)


def stored_training(root: Any) -> StoredTraining | None:
    """The synchronisation settings stored in a checkpoint's top-level containers (None: there are none)."""
    top = _fields(root)
    if top is None:
        return None
    found: list[StoredSetting] = []
    for name in CONTAINERS:
        fields = _fields(top.get(name))
        if fields is not None:
            found.extend(_walk(fields, name, 1))
    if not found:
        return None
    synchronised, meaning = _interpret({s.where.rpartition(".")[2]: s.value for s in found})
    return StoredTraining(tuple(found), synchronised, meaning)


def _interpret(flags: Mapping[str, Any]) -> tuple[bool | None, str]:
    accumulation = max(
        (
            int(flags[k])
            for k in ("grad_accum_steps", "accumulate_grad_batches")
            if isinstance(flags.get(k), int)
        ),
        default=1,
    )
    note = f"; gradient accumulation over {accumulation} micro-batches" if accumulation > 1 else ""
    if any(flags.get(k) is True for k in ("sync_bn", "sync_batchnorm", "syncbn")):
        return True, "SyncBatchNorm was on: every rank normalised with the global batch" + note
    if flags.get("dist_bn") in ("reduce", "broadcast"):
        return (
            True,
            f"buffers were {flags['dist_bn']}d across ranks at each epoch's end (timm --dist-bn)" + note,
        )
    off = [k for k in ("broadcast_buffers", "forward_sync_buffers") if flags.get(k) is False]
    if flags.get("no_ddp_bb") is True or off:
        how = "timm --no-ddp-bb" if flags.get("no_ddp_bb") is True else f"{off[0]}=False"
        return (
            False,
            f"DDP's buffer broadcast was off ({how}) and neither SyncBatchNorm nor --dist-bn was on" + note,
        )
    if flags.get("no_ddp_bb") is False or any(
        flags.get(k) is True for k in ("broadcast_buffers", "forward_sync_buffers")
    ):
        return (
            True,
            "DDP broadcast rank 0's buffers before every forward: the copies differ by the last step only"
            + note,
        )
    return None, "the stored settings do not say how buffers were synchronised" + note
