"""torch.distributed helpers for recalibration: groups, batch sharding, failure sharing, local launch."""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from bnaudit.errors import BnauditError, InputError, InternalError, UsageError
from bnaudit.live.launch import env_world_size as env_world_size  # re-exported, as launch_local
from bnaudit.live.launch import launch_local as launch_local

log = logging.getLogger(__name__)

# How long a failing rank waits for the others to read its error before it exits. Rank 0 may host the store
# (plain init without torchrun's agent): leaving at once would cut the others off from the message.
ACK_TIMEOUT_S = 5.0
# How long a rank that finished its pass waits for the slowest rank to finish its own.
DEFAULT_STATUS_TIMEOUT_S = 1800.0
_POLL_S = 0.02

_run_counter = itertools.count()


class RankFailedError(InputError):
    """A rank failed; every rank raises this same error, with the failing rank's exit code."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


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
            raise UsageError(f"WORLD_SIZE is set but {', '.join(missing)} is not: launch with torchrun")
        dev = torch.device(device) if device is not None else torch.device("cpu")
        backend = "gloo"
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise UsageError(f"--device {device} asked for but CUDA is not available on this machine")
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            backend = "nccl"
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return current_context()


def local_device(device: str | None) -> torch.device:
    """The device this rank should run on: ``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun."""
    dev = torch.device(device or "cpu")
    if dev.type == "cuda" and dev.index is None and env_world_size() > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return dev


# ----------------------------------------------------------------------------------------------- sharding


class ShardedBatchSampler:
    """Rank ``rank``'s share of a batch sampler: batches rank, rank + N, ... below ``max_batches``.

    Iterating the wrapped sampler only produces index lists, so no rank loads data it does not use.
    """

    def __init__(self, inner: Iterable[Any], rank: int, world_size: int, max_batches: int | None) -> None:
        self.inner = inner
        self.rank = rank
        self.world_size = world_size
        self.max_batches = max_batches

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(self.inner, self.rank, self.max_batches, self.world_size)

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
            "and miss or repeat samples; use shuffle=False or generator=torch.Generator().manual_seed(0)"
        )


def _shard_dataloader(loader: Any, rank: int, world_size: int, max_batches: int | None) -> Any:
    from torch.utils.data import DataLoader, IterableDataset

    if isinstance(loader.dataset, IterableDataset):
        # No sampler to shard: every rank reads the stream and keeps its own batches.
        log.info("the DataLoader wraps an IterableDataset; every rank reads it and keeps its share")
        return itertools.islice(loader, rank, max_batches, world_size)
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
    return itertools.islice(batches, rank, max_batches, world_size)


def local_max_batches(max_batches: int | None, rank: int, world_size: int) -> int | None:
    """The per-rank limit for a self-sharded loader whose k-th batch is global batch rank + k * world_size."""
    return None if max_batches is None else shard_length(max_batches, rank, world_size)


# ------------------------------------------------------------------------------------- failure sharing


class RunChannel:
    """Status exchange for one distributed pass through the group's store, so no rank enters a collective
    while another has failed.

    Protocol (keys under a per-run prefix): a failing rank increments ``nfail``; the first to do so stores
    ``failure`` = ``code|rank|line``, waits briefly for the others' acks, and raises. Every other rank notices
    ``nfail`` between batches or while waiting for the others to finish, acks, and raises the same error.
    A rank that finished posts ``ok/<rank>`` = its layout signature and waits for all.
    """

    def __init__(self, ctx: DistContext, timeout_s: float = DEFAULT_STATUS_TIMEOUT_S) -> None:
        self.ctx = ctx
        self.timeout_s = timeout_s
        self.prefix = f"bnaudit/recalibrate/{next(_run_counter)}/"

    def _key(self, name: str) -> str:
        return self.prefix + name

    def _failure(self) -> RankFailedError:
        store = self.ctx.store
        store.wait([self._key("failure")], timedelta(seconds=30))
        code, rank, line = store.get(self._key("failure")).decode("utf-8").split("|", 2)
        return RankFailedError(f"rank {rank} failed: {line}", int(code))

    def _peer_failed(self) -> bool:
        return bool(self.ctx.store.check([self._key("nfail")]))

    def check_peers(self) -> None:
        """Raise the shared error when another rank has failed (cheap: one store round trip)."""
        if self._peer_failed():
            err = self._failure()
            self.ctx.store.add(self._key("acks"), 1)
            self._leave_together()
            raise err

    def post_failure(self, exc: BaseException) -> RankFailedError:
        """Record this rank's failure (unless another rank's, already shared); return the shared error."""
        if isinstance(exc, RankFailedError):
            return exc
        store = self.ctx.store
        code = exc.exit_code if isinstance(exc, BnauditError) else InternalError.exit_code
        line = " ".join(str(exc).split()) or type(exc).__name__
        if not isinstance(exc, BnauditError):
            line = f"{type(exc).__name__}: {line}"
        try:
            if store.add(self._key("nfail"), 1) == 1:
                store.set(self._key("failure"), f"{code}|{self.ctx.rank}|{line}")
            shared = self._failure()
            self._wait_acks()
            self._leave_together()
        except Exception as store_exc:  # the store itself is gone: keep the local error
            log.debug("could not share the failure through the store: %s", store_exc)
            return RankFailedError(f"rank {self.ctx.rank} failed: {line}", code)
        return shared

    def _wait_acks(self) -> None:
        deadline = time.monotonic() + ACK_TIMEOUT_S
        others = self.ctx.world_size - 1
        while time.monotonic() < deadline:
            # add(key, 0) reads a counter without changing it (and creates it when absent).
            acks = self.ctx.store.add(self._key("acks"), 0)
            failed = self.ctx.store.add(self._key("nfail"), 0)
            if acks + failed - 1 >= others:
                return
            time.sleep(_POLL_S)

    def _leave_together(self) -> None:
        """Wait until every rank is about to raise the shared error, so that all of them print it.

        torchrun's agent stops every worker as soon as one exits: a rank still sleeping or waiting then
        would be killed before its error line is printed. Leaving together narrows that to the moment
        between raising and printing. A rank that died never arrives: the wait is bounded.
        """
        store = self.ctx.store
        store.add(self._key("leaving"), 1)
        deadline = time.monotonic() + ACK_TIMEOUT_S
        while time.monotonic() < deadline and store.add(self._key("leaving"), 0) < self.ctx.world_size:
            time.sleep(_POLL_S)

    def finish_ok(self, signature: str) -> None:
        """Post success and wait for every rank's status.

        Raises:
            RankFailedError: a rank failed, or did not report within the timeout.
            ModelMismatchError: ranks hold different models (layout signatures differ).
        """
        from bnaudit.errors import ModelMismatchError

        store = self.ctx.store
        store.set(self._key(f"ok/{self.ctx.rank}"), signature)
        keys = [self._key(f"ok/{r}") for r in range(self.ctx.world_size)]
        deadline = time.monotonic() + self.timeout_s
        while not store.check(keys):
            self.check_peers()
            if time.monotonic() > deadline:
                late = [r for r, k in enumerate(keys) if not store.check([k])]
                raise RankFailedError(f"rank(s) {late} did not finish within {self.timeout_s:.0f} s")
            time.sleep(_POLL_S)
        signatures = [store.get(k).decode("utf-8") for k in keys]
        if len(set(signatures)) != 1:
            bad = [r for r, s in enumerate(signatures) if s != signatures[0]]
            raise ModelMismatchError(
                f"rank(s) {bad} hold a different model (BatchNorm layers differ from rank 0's)"
            )


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
