"""The calibration batches named by ``--data``: a user callable or a tensor file, and the input in a batch."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bnaudit.errors import InputError, UsageError
from bnaudit.live.specs import call_spec, load_callable, one_line

if TYPE_CHECKING:
    import torch

TENSOR_FILE_SUFFIXES = (".pt", ".pth", ".safetensors", ".npy")


@dataclass
class BatchSource:
    """The batches named by a ``--data`` spec.

    Attributes:
        batches: an iterable of batches (a DataLoader, a list, :class:`TensorFileBatches`, ...).
        sharded: True when the loader was built with ``rank`` / ``world_size`` and yields only this rank's
            batches (rank r's k-th batch is taken to be batch r + k * world_size of the single-process run).
        description: a short text for logs (``data.py:make_loader`` or ``inputs.npy (1000 samples)``).
    """

    batches: Iterable[Any]
    sharded: bool
    description: str


class TensorFileBatches:
    """A tensor of inputs cut in order into batches of ``batch_size`` rows (the last one may be short)."""

    def __init__(self, data: torch.Tensor, batch_size: int) -> None:
        self.data = data
        self.batch_size = batch_size

    def __len__(self) -> int:
        return (len(self.data) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[torch.Tensor]:
        for start in range(0, len(self.data), self.batch_size):
            yield self.data[start : start + self.batch_size]


def _pick_tensor(found: Mapping[str, Any], path: Path) -> Any:
    if "inputs" in found:
        return found["inputs"]
    if len(found) == 1:
        return next(iter(found.values()))
    keys = ", ".join(sorted(map(str, found)))[:200]
    raise InputError(
        f"holds several tensors ({keys})", path=path, fix="name the inputs 'inputs' or keep one tensor"
    )


def load_tensor_file(path: str | Path) -> torch.Tensor:
    """Read a tensor of inputs from ``.pt``/``.pth`` (``weights_only``), ``.safetensors`` or ``.npy``.

    A file holding a dict must hold one tensor or an ``inputs`` key.

    Raises:
        InputError: the file is missing, unreadable, or holds no single input tensor.
    """
    import numpy as np
    import torch

    p = Path(path)
    if not p.is_file():
        raise InputError("does not exist", path=p, where="--data file")
    try:
        if p.suffix == ".npy":
            value: Any = torch.from_numpy(np.load(p, allow_pickle=False))
        elif p.suffix == ".safetensors":
            from safetensors.torch import load_file

            value = _pick_tensor(load_file(str(p)), p)
        else:
            value = torch.load(p, map_location="cpu", weights_only=True)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"cannot be read: {one_line(exc)}", path=p, where="--data file") from None
    if isinstance(value, Mapping):
        value = _pick_tensor(value, p)
    if not isinstance(value, torch.Tensor):
        raise InputError(
            f"holds a {type(value).__name__}, expected a tensor of inputs", path=p, where="--data file"
        )
    if value.dim() == 0:
        raise InputError(
            "holds a scalar, expected a tensor of inputs (samples first)", path=p, where="--data file"
        )
    return value


def _accepts_sharding(fn: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "rank" in params and "world_size" in params


def build_batches(
    spec: str,
    kwargs: Mapping[str, Any] | None = None,
    batch_size: int | None = None,
    rank: int | None = None,
    world_size: int | None = None,
) -> BatchSource:
    """Build the calibration batches named by a ``--data`` spec.

    Args:
        spec: a tensor file (``.pt``, ``.pth``, ``.safetensors``, ``.npy``) or a callable spec returning any
            iterable of batches.
        kwargs: keyword arguments from ``--data-arg`` (callables only).
        batch_size: rows per batch for a tensor file (required then); ignored for callables unless the
            callable takes a ``batch_size`` argument that ``kwargs`` does not already set.
        rank, world_size: this process's place in a distributed run; passed to a callable that accepts both
            ``rank`` and ``world_size`` keyword arguments when ``world_size > 1``, which marks the loader as
            already sharded.

    Returns:
        A :class:`BatchSource`.

    Raises:
        UsageError: a tensor file without a positive ``batch_size``, or ``--data-arg`` with a tensor file.
        InputError: the file or callable cannot be read, imported or called.
    """
    kwargs = dict(kwargs or {})
    if spec.lower().endswith(TENSOR_FILE_SUFFIXES) and ":" not in Path(spec).name:
        if kwargs:
            raise UsageError(
                "is a tensor file, not a callable: it takes no --data-arg",
                where=f"--data '{spec}'",
                fix="drop --data-arg",
            )
        if batch_size is None or batch_size <= 0:
            raise UsageError(
                "is a tensor file", where=f"--data '{spec}'", fix="give --batch-size N (a positive integer)"
            )
        data = load_tensor_file(spec)
        return BatchSource(TensorFileBatches(data, batch_size), False, f"{spec} ({len(data)} samples)")
    fn = load_callable(spec, "--data")
    sharded = world_size is not None and world_size > 1 and _accepts_sharding(fn)
    if sharded:
        kwargs.update(rank=rank, world_size=world_size)
    if batch_size is not None and "batch_size" not in kwargs and _has_param(fn, "batch_size"):
        kwargs["batch_size"] = batch_size
    batches = call_spec(fn, kwargs, "--data", spec)
    if isinstance(batches, str | bytes) or not isinstance(batches, Iterable):
        raise InputError(
            f"returned a {type(batches).__name__}, expected an iterable of batches",
            where=f"--data spec '{spec}'",
        )
    return BatchSource(batches, sharded, spec)


def _has_param(fn: Callable[..., Any], name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def batch_input(batch: Any, input_index: int = 0, input_key: str | None = None) -> Any:
    """The model input inside one batch.

    Args:
        batch: a tensor (the input itself), a tuple/list (input at ``input_index``) or a dict (input at
            ``input_key``).
        input_index: position of the input in a tuple/list batch (``--input-index``).
        input_key: key of the input in a dict batch (``--input-key``).

    Returns:
        The input to call the model with.

    Raises:
        UsageError: a dict batch without ``input_key``, a missing key or index, or a batch of another type.
    """
    import torch

    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, Mapping):
        keys = ", ".join(map(str, batch.keys()))[:200]
        if input_key is None:
            raise UsageError(f"batches are dicts (keys: {keys})", fix="name the input with --input-key")
        if input_key not in batch:
            raise UsageError(f"is not in the batch (keys: {keys})", where=f"--input-key '{input_key}'")
        return batch[input_key]
    if isinstance(batch, tuple | list):
        if not -len(batch) <= input_index < len(batch):
            raise UsageError(
                f"is out of range for batches of {len(batch)} items", where=f"--input-index {input_index}"
            )
        return batch[input_index]
    raise UsageError(
        f"batches are of type {type(batch).__name__}; bnaudit takes tensors, tuples/lists and dicts",
        fix="name a callable(model, batch) with --forward for anything else",
    )
