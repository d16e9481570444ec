"""The pass over the batches: device and memory format of each batch, autocast, limits, progress, errors."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bnaudit.errors import BnauditError, InputError, UsageError
from bnaudit.live.accumulate import LOW_PRECISION
from bnaudit.live.batch_source import batch_input
from bnaudit.live.devices import checked_device
from bnaudit.live.kernel_rows import CHANNELS_LAST
from bnaudit.live.measure import PassState, StopForward
from bnaudit.live.options import ForwardFn, ProgressCallback


def _map_tensors(batch: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``fn`` applied to every tensor of a tensor / tuple / list / dict batch (other values unchanged)."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return {k: _map_tensors(v, fn) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_map_tensors(v, fn) for v in batch))
    if isinstance(batch, list | tuple):
        return type(batch)(_map_tensors(v, fn) for v in batch)
    return batch


def _channels_last_tensor(tensor: torch.Tensor) -> torch.Tensor:
    fmt = CHANNELS_LAST.get(tensor.dim())
    return tensor if fmt is None else tensor.contiguous(memory_format=fmt)


def to_channels_last(batch: Any) -> Any:
    """Every 4-D (5-D) tensor of a tensor / tuple / list / dict batch in channels_last(_3d) memory format."""
    return _map_tensors(batch, _channels_last_tensor)


def to_device(batch: Any, device: torch.device | None) -> Any:
    """Move every tensor in a tensor / tuple / list / dict batch to ``device`` (other values unchanged)."""
    if device is None:
        return batch
    return _map_tensors(batch, lambda tensor: tensor.to(device))


def _batch_len(batch: Any, input_index: int, input_key: str | None) -> int | None:
    try:
        x = batch_input(batch, input_index, input_key)
    except BnauditError:
        return None
    return int(x.shape[0]) if isinstance(x, torch.Tensor) and x.dim() > 0 else None


def resolve_device(model: nn.Module, device: str | torch.device | None) -> torch.device | None:
    """``device`` as a torch.device; None: the device of the model's first parameter or buffer (if any).

    Raises:
        UsageError: ``device`` is not one this machine has (see :func:`bnaudit.live.devices.checked_device`).
    """
    if device is not None:
        return checked_device(device)
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return None


_AMP_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
               "fp16": torch.float16, "half": torch.float16}  # fmt: skip


def _amp_dtype(kind: str, amp_dtype: str | torch.dtype | None) -> torch.dtype:
    if isinstance(amp_dtype, str):
        if amp_dtype.lower() not in _AMP_DTYPES:
            raise UsageError("must be bfloat16 or float16", where="--amp-dtype", found=repr(amp_dtype))
        return _AMP_DTYPES[amp_dtype.lower()]
    if amp_dtype is None:
        return torch.bfloat16 if kind == "cpu" else torch.float16
    if amp_dtype not in LOW_PRECISION:
        raise UsageError("must be bfloat16 or float16", where="--amp-dtype", found=str(amp_dtype))
    return amp_dtype


def autocast_target(
    device: torch.device | None, amp_dtype: str | torch.dtype | None
) -> tuple[str, torch.dtype]:
    """The (device type, dtype) for ``torch.autocast``, checked here: autocast itself only warns and disables
    itself for an unsupported combination, which would silently run in full precision.

    Raises:
        UsageError: a dtype other than bfloat16 / float16, or one the device cannot autocast to.
    """
    kind = device.type if device is not None else "cpu"
    dtype = _amp_dtype(kind, amp_dtype)
    if not torch.amp.is_autocast_available(kind):
        raise UsageError(f"torch cannot autocast on device type '{kind}'", where="--amp", fix="drop --amp")
    if kind == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise UsageError(
            "this GPU does not support bfloat16", where="--amp-dtype bfloat16", fix="use --amp-dtype float16"
        )
    return kind, dtype


@dataclass
class PassSettings:
    """What the loop over the batches needs, resolved for this rank."""

    forward: ForwardFn | None
    input_index: int
    input_key: str | None
    max_batches: int | None
    max_samples: int | None
    device: torch.device | None
    progress: ProgressCallback | None
    check_peers: Callable[[], None] | None
    # local batch k is global batch offset + k * stride (distributed sharding), for error messages
    batch_offset: int = 0
    batch_stride: int = 1
    # (device type, dtype) for torch.autocast, None: full precision
    autocast: tuple[str, torch.dtype] | None = None
    channels_last: bool = False

    def batch_number(self, index: int) -> int:
        """The global number of this rank's ``index``-th batch."""
        return self.batch_offset + index * self.batch_stride


def _run_one(model: nn.Module, batch: Any, opts: PassSettings) -> None:
    amp: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if opts.autocast is not None:
        amp = torch.autocast(opts.autocast[0], dtype=opts.autocast[1])
    with amp:
        if opts.forward is not None:
            opts.forward(model, batch)
        else:
            model(batch_input(batch, opts.input_index, opts.input_key))


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]


def _iterate(batches: Iterable[Any], opts: PassSettings) -> Iterator[tuple[int, Any]]:
    it = iter(batches)
    index = 0
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except BnauditError:
            raise
        except Exception as exc:
            raise InputError(
                f"raised {type(exc).__name__}: {_one_line(exc)}",
                where=f"loading batch {opts.batch_number(index)}",
            ) from None
        yield index, batch
        index += 1


def _prepared_batch(raw: Any, opts: PassSettings) -> tuple[Any, int | None]:
    """The batch on its device and in its memory format, and its number of samples (None: unknown)."""
    batch = to_device(raw, opts.device)
    if opts.channels_last:
        batch = to_channels_last(batch)
    size = _batch_len(batch, opts.input_index, opts.input_key)
    if size is None and opts.max_samples is not None:
        raise UsageError(
            "needs batches whose input bnaudit can read", where="--max-samples", fix="use --max-batches"
        )
    return batch, size


def limited_batches(batches: Iterable[Any], opts: PassSettings) -> Iterator[tuple[int, Any, int | None]]:
    """(index, batch on its device and in its memory format, its size or None) within the pass's limits.

    Raises:
        InputError: loading a batch raised (the message names the global batch number).
        UsageError: ``max_samples`` with batches whose size cannot be read.
    """
    samples = 0
    for used, (index, raw) in enumerate(_iterate(batches, opts)):
        if opts.max_batches is not None and used >= opts.max_batches:
            break
        if opts.max_samples is not None and samples >= opts.max_samples:
            break
        if opts.check_peers is not None:
            opts.check_peers()
        batch, size = _prepared_batch(raw, opts)
        yield index, batch, size
        samples += size or 0


def run_one_batch(model: nn.Module, batch: Any, index: int, opts: PassSettings) -> None:
    """One forward; a model's exception becomes an InputError naming the global batch number.

    StopForward (the early stop) and bnaudit's own errors pass through.
    """
    try:
        _run_one(model, batch, opts)
    except (StopForward, BnauditError):
        raise
    except Exception as exc:
        number = opts.batch_number(index)
        raise InputError(f"raised {type(exc).__name__}: {_one_line(exc)}", where=f"batch {number}") from None


def run_pass(
    model: nn.Module, batches: Iterable[Any], state: PassState, opts: PassSettings
) -> tuple[int, int | None]:
    """Feed batches through the model; returns (batches used, samples used or None when unknown).

    Raises:
        InputError: loading a batch or running it raised (the message names the global batch number).
        UsageError: ``max_samples`` with batches whose size cannot be read, or an input that is not found.
    """
    used, samples = 0, 0
    sizes_known = True
    total = _length(batches, opts.max_batches)
    for index, batch, size in limited_batches(batches, opts):
        sizes_known = sizes_known and size is not None
        state.start_batch(index)
        with contextlib.suppress(StopForward):
            run_one_batch(model, batch, index, opts)
        state.end_batch()
        used += 1
        samples += size or 0
        if opts.progress is not None:
            opts.progress(used, total)
    return used, samples if sizes_known else None


def _length(batches: Iterable[Any], max_batches: int | None) -> int | None:
    try:
        n = len(batches)  # type: ignore[arg-type]
    except TypeError:
        return max_batches
    return n if max_batches is None else min(n, max_batches)
