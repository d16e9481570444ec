"""torch.distributed helpers for recalibration: joining the group, batch sharding, gathering statistics."""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from bnaudit.errors import UsageError
from bnaudit.live.devices import checked_device
from bnaudit.live.launch import env_world_size, is_worker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    """This process's place in a process group.

    Attributes:
        rank, world_size: within ``group``.
        group: the process group (None: the default group).
        device: where collectives run: ``cpu`` for gloo, ``cuda:<local rank>`` for nccl.
        store: the key-value store shared by the group (the default group's store).
    """

    rank: int
    world_size: int
    group: Any
    device: torch.device
    store: Any


def _backend_device(group: Any) -> torch.device:
    backend = dist.get_backend(group)
    if "nccl" in str(backend):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def current_context(process_group: Any = None) -> DistContext | None:
    """The distributed context when torch.distributed is initialised with more than one process, else None."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    world = dist.get_world_size(process_group)
    if world <= 1:
        return None
    return DistContext(
        rank=dist.get_rank(process_group),
        world_size=world,
        group=process_group,
        device=_backend_device(process_group),
        store=dist.distributed_c10d._get_default_store(),
    )


def init_from_env(device: str | torch.device | None = None, timeout_s: float = 1800.0) -> DistContext | None:
    """Join the process group described by torchrun's environment (``RANK``, ``WORLD_SIZE``, ...).

    Uses gloo for CPU devices and nccl for CUDA (then binds this process to ``cuda:LOCAL_RANK``). Does nothing
    and returns None when ``WORLD_SIZE`` is absent or 1; reuses an already initialised default group.

    Args:
        device: the device the model runs on (``--device``); None means CPU.
        timeout_s: the process group's timeout for collectives.

    Returns:
        The context, or None for a single process.

    Raises:
        UsageError: ``RANK`` / ``MASTER_ADDR`` are missing, or a CUDA device was asked without CUDA.
    """
    if env_world_size() <= 1:
        return None
    if not dist.is_initialized():
        missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise UsageError(
                f"WORLD_SIZE is set but {', '.join(missing)} is not",
                where="environment",
                fix="launch with torchrun",
            )
        dev = checked_device(device or "cpu")
        backend = "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            backend = "nccl"
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return current_context()


def local_device(device: str | torch.device | None) -> torch.device:
    """The device this rank should run on: ``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun.

    Raises:
        UsageError: the device is not one this machine has (the message lists those it has).
    """
    dev = checked_device(device or "cpu")
    if dev.type == "cuda" and dev.index is None and env_world_size() > 1:
        return checked_device(torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))))
    return dev


# ----------------------------------------------------------------------------------------------- sharding


class SlicedBatches:
    """Rank ``rank``'s batches of any iterable: rank, rank + N, ... below ``max_batches``, read again on every
    iteration (``--mode sequential`` reads them once per pass)."""

    def __init__(self, inner: Iterable[Any], rank: int, world_size: int, max_batches: int | None) -> None:
        self.inner = inner
        self.rank = rank
        self.world_size = world_size
        self.max_batches = max_batches

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(self.inner, self.rank, self.max_batches, self.world_size)


class ShardedBatchSampler(SlicedBatches):
    """Rank ``rank``'s share of a batch sampler: batches rank, rank + N, ... below ``max_batches``.

    Iterating the wrapped sampler only produces index lists, so no rank loads data it does not use.
    """

    def __len__(self) -> int:
        total = len(self.inner)  # type: ignore[arg-type]
        if self.max_batches is not None:
            total = min(total, self.max_batches)
        return shard_length(total, self.rank, self.world_size)


def shard_length(total: int, rank: int, world_size: int) -> int:
    """How many of ``total`` batches rank ``rank`` takes: those with index i = rank (mod world_size)."""
    return max(0, math.ceil((total - rank) / world_size))


def _check_deterministic(loader: Any) -> None:
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, torch.utils.data.RandomSampler) and sampler.generator is None:
        raise UsageError(
            "the --data DataLoader shuffles without a seeded generator, so ranks would draw different orders "
            "and miss or repeat samples",
            fix="use shuffle=False or generator=torch.Generator().manual_seed(0)",
        )


def _shard_dataloader(loader: Any, rank: int, world_size: int, max_batches: int | None) -> Iterable[Any]:
    from torch.utils.data import DataLoader, IterableDataset

    if isinstance(loader.dataset, IterableDataset):
        # No sampler to shard: every rank reads the stream and keeps its own batches.
        log.info("the DataLoader wraps an IterableDataset; every rank reads it and keeps its share")
        return SlicedBatches(loader, rank, world_size, max_batches)
    _check_deterministic(loader)
    options: dict[str, Any] = {
        "num_workers": loader.num_workers,
        "collate_fn": loader.collate_fn,
        "pin_memory": loader.pin_memory,
        "timeout": loader.timeout,
        "worker_init_fn": loader.worker_init_fn,
        "multiprocessing_context": loader.multiprocessing_context,
        "generator": loader.generator,
        "persistent_workers": loader.persistent_workers,
        "pin_memory_device": loader.pin_memory_device,
    }
    if loader.num_workers > 0:
        options["prefetch_factor"] = loader.prefetch_factor
    if loader.batch_sampler is not None:
        sampler = ShardedBatchSampler(loader.batch_sampler, rank, world_size, max_batches)
        return DataLoader(loader.dataset, batch_sampler=sampler, **options)
    # batch_size=None: each dataset item is a batch; shard the item sampler instead.
    items = ShardedBatchSampler(loader.sampler, rank, world_size, max_batches)
    return DataLoader(loader.dataset, batch_size=None, sampler=items, **options)


def shard_batches(
    batches: Iterable[Any], rank: int, world_size: int, max_batches: int | None = None
) -> Iterable[Any]:
    """Rank ``rank``'s share of the single-process batch sequence: global batches i = rank (mod world_size).

    Every batch a rank sees is exactly the batch the single-process run sees at the same global index, so
    train-mode BatchNorm statistics (which depend on batch composition) agree with a single process.

    Args:
        batches: a ``torch.utils.data.DataLoader`` (rebuilt over the same dataset, collate function and
            workers with a sharded batch sampler, so no rank loads batches it does not use) or any iterable
            (sliced with ``itertools.islice``).
        rank, world_size: this process's place.
        max_batches: global limit: batch i is used iff i < max_batches.

    Returns:
        An iterable over this rank's batches, in order.

    Raises:
        UsageError: a DataLoader that shuffles without a seeded generator.
    """
    from torch.utils.data import DataLoader

    if isinstance(batches, DataLoader):
        return _shard_dataloader(batches, rank, world_size, max_batches)
    return SlicedBatches(batches, rank, world_size, max_batches)


def local_max_batches(max_batches: int | None, rank: int, world_size: int) -> int | None:
    """The per-rank limit for a self-sharded loader whose k-th batch is global batch rank + k * world_size."""
    return None if max_batches is None else shard_length(max_batches, rank, world_size)


def all_gather_array(ctx: DistContext, values: np.ndarray) -> list[np.ndarray]:
    """Gather one float64 vector (same length on every rank) from every rank, in rank order."""
    local = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64)).to(ctx.device)
    gathered = [torch.empty_like(local) for _ in range(ctx.world_size)]
    # The whole cross-rank traffic of a pass (benchmarks/bench_distributed.py reads this line).
    log.debug(
        "all_gather: %d float64 values (%d bytes) per rank, %d bytes gathered on each of %d ranks",
        local.numel(), local.numel() * 8, local.numel() * 8 * ctx.world_size, ctx.world_size,
    )  # fmt: skip
    dist.all_gather(gathered, local, group=ctx.group)
    return [t.cpu().numpy() for t in gathered]


# -------------------------------------------------------------------------------------------- launching


@contextlib.contextmanager
def destroy_on_exit(ctx: DistContext | None) -> Iterator[None]:
    """Destroy the default process group when leaving (workers call this around their whole job)."""
    try:
        yield
    finally:
        if ctx is not None and dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


@contextlib.contextmanager
def joined_process_group(device: str | torch.device | None) -> Iterator[DistContext | None]:
    """Join torchrun's process group for the duration of a job (nothing for a single process); leave it after.

    Yields:
        The context inside a worker of a group with several processes, else None.
    """
    ctx = init_from_env(device) if is_worker() else None
    with destroy_on_exit(ctx):
        yield ctx
