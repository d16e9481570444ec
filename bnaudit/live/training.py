"""In-training API: all-reduce BatchNorm buffers across ranks, and save each rank's buffers for auditing."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from bnaudit.atomic_output import AtomicOutput, disk_error
from bnaudit.bn.stats import MergeMethod
from bnaudit.checkpoint.provenance import rank_stats_metadata
from bnaudit.errors import InternalError, UsageError
from bnaudit.live.finite import check_finite

RANK_FILE_PATTERN = "bn_stats_rank{rank}.safetensors"


def bn_modules(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every submodule holding ``running_mean`` and ``running_var`` tensors (BatchNorm, SyncBatchNorm, ...).

    Args:
        module: the model (DDP-wrapped or not).

    Returns:
        (qualified name, module) pairs in ``named_modules`` order.
    """
    found = []
    for name, sub in module.named_modules():
        mean, var = getattr(sub, "running_mean", None), getattr(sub, "running_var", None)
        if isinstance(mean, torch.Tensor) and isinstance(var, torch.Tensor):
            found.append((name, sub))
    return found


def _stats(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    mean, var = getattr(module, "running_mean", None), getattr(module, "running_var", None)
    if not (isinstance(mean, torch.Tensor) and isinstance(var, torch.Tensor)):
        raise InternalError("lost its running statistics", where=f"module {type(module).__name__}")
    return mean, var


def _collective_device(group: Any) -> torch.device:
    # nccl reduces CUDA tensors only; gloo and the others reduce CPU tensors.
    if "nccl" in str(dist.get_backend(group)).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _check_same_layout(sizes: list[int], group: Any, device: torch.device) -> None:
    """Fail on every rank alike when the ranks hold different BatchNorm layouts (a reduce would hang)."""
    probe = torch.tensor(
        [len(sizes), sum(sizes), -len(sizes), -sum(sizes)], dtype=torch.float64, device=device
    )
    dist.all_reduce(probe, op=dist.ReduceOp.MAX, group=group)
    if probe[0] != -probe[2] or probe[1] != -probe[3]:
        raise UsageError(
            "the ranks hold different BatchNorm layers "
            f"(this rank: {len(sizes)} layers, {sum(sizes)} channels)",
            where="sync_bn_stats",
            fix="call it on the same model on every rank",
        )


def sync_bn_stats(
    module: nn.Module,
    method: MergeMethod | str = MergeMethod.POOLED,
    group: Any = None,
    *,
    samples: float | None = None,
) -> list[str]:
    """All-reduce the BatchNorm running statistics of a live model across a process group, in place.

    Every rank ends with the same buffers: ``running_mean`` = sum w_r m_r / W and, for ``pooled`` (the
    default), ``running_var`` = sum w_r (v_r + (m_r - mean)^2) / W — the law of total variance, i.e. the
    variance of all ranks' data when each rank's statistics describe its own shard; for ``mean``,
    ``running_var`` = sum w_r v_r / W (what timm's ``distribute_bn`` computes). The variances are whatever
    BatchNorm stores (unbiased batch variances averaged with momentum). The arithmetic is float64; the
    buffers are updated with ``copy_`` in their own dtype and device. ``num_batches_tracked`` is left alone.
    Call it on every rank (it is a collective), e.g. before saving or evaluating.

    Args:
        module: the model (plain or DDP-wrapped); every submodule with running statistics is synced.
        method: ``pooled`` or ``mean``.
        group: the process group (None: the default group). Works with gloo (CPU) and nccl (CUDA).
        samples: this rank's sample count w_r, for uneven shards; None gives every rank weight 1. Pass it on
            every rank or on none.

    Returns:
        The names of the synced modules.

    Raises:
        UsageError: torch.distributed is not initialised, ``method`` or ``samples`` is invalid, or the ranks
            hold different layers.
        NonFiniteStatisticsError: a merged statistic is NaN / Inf (a rank's buffers hold NaN); no buffer
            was changed, on any rank.
    """
    merge = _check_sync_args(method, samples)
    layers = bn_modules(module)
    device = _collective_device(group)
    buffers = [_stats(m) for _, m in layers]
    sizes = [int(mean.numel()) for mean, _ in buffers]
    _check_same_layout(sizes, group, device)
    if not layers:
        return []
    mean, var = _reduced_stats(buffers, merge, group, (device, samples))
    _check_finite(layers, sizes, mean, var)  # the same merged values on every rank: all raise alike
    offset = 0
    with torch.no_grad():
        for (running_mean, running_var), size in zip(buffers, sizes, strict=True):
            running_mean.copy_(mean[offset : offset + size].reshape(running_mean.shape))
            running_var.copy_(var[offset : offset + size].reshape(running_var.shape))
            offset += size
    return [name for name, _ in layers]


_SYNC_FIX = (
    "no buffer was changed; a rank's statistics hold NaN / Inf (find it: save_rank_stats, then bnaudit "
    "compare), recalibrate that model"
)


def _check_finite(
    layers: list[tuple[str, nn.Module]], sizes: list[int], mean: torch.Tensor, var: torch.Tensor
) -> None:
    if bool(torch.isfinite(mean).all()) and bool(torch.isfinite(var).all()):
        return  # one host sync; the per-layer search below only runs to name the culprit
    offset = 0
    for (name, _), size in zip(layers, sizes, strict=True):
        for statistic, merged in (("running_mean", mean), ("running_var", var)):
            check_finite(name, statistic, merged[offset : offset + size].cpu().numpy(), fix=_SYNC_FIX)
        offset += size


def _check_sync_args(method: MergeMethod | str, samples: float | None) -> MergeMethod:
    try:
        merge = MergeMethod(method)
    except ValueError:
        raise UsageError(f"method {method!r} is not one of: pooled, mean", where="sync_bn_stats") from None
    if not (dist.is_available() and dist.is_initialized()):
        raise UsageError(
            "torch.distributed is not initialised",
            where="sync_bn_stats",
            fix="call torch.distributed.init_process_group first "
            "(or skip the call when training on one process)",
        )
    if samples is not None and not samples > 0:
        raise UsageError("samples must be a positive count", where="sync_bn_stats", found=repr(samples))
    return merge


def _reduced_stats(
    buffers: list[tuple[torch.Tensor, torch.Tensor]],
    merge: MergeMethod,
    group: Any,
    place: tuple[torch.device, float | None],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The merged (mean, variance) of every channel, concatenated, identical on every rank (float64)."""
    device, samples = place
    weight = torch.tensor([1.0 if samples is None else float(samples)], dtype=torch.float64, device=device)
    dist.all_reduce(weight, group=group)
    w = 1.0 if samples is None else float(samples)
    means = torch.cat([m.detach().reshape(-1).to(device, torch.float64) for m, _ in buffers])
    variances = torch.cat([v.detach().reshape(-1).to(device, torch.float64) for _, v in buffers])
    mean = means * (w / weight)
    dist.all_reduce(mean, group=group)
    # Second reduce around the global mean: no cancellation, unlike E[v + m^2] - mean^2.
    spread = variances + (means - mean) ** 2 if merge is MergeMethod.POOLED else variances.clone()
    var = spread * (w / weight)
    dist.all_reduce(var, group=group)
    return mean, var


def rank_stats_path(path: str | Path, rank: int) -> Path:
    """Where ``save_rank_stats`` writes rank ``rank``'s file for ``path``.

    A directory (existing, or written with a trailing ``/``) gets ``bn_stats_rank{rank}.safetensors``; a path
    containing ``{rank}`` is formatted; any other file name gets ``_rank{rank}`` before its suffix.
    """
    text = str(path)
    if "{rank}" in text:
        return Path(text.replace("{rank}", str(rank)))
    p = Path(path)
    if p.is_dir() or text.endswith(("/", os.sep)):
        return p / RANK_FILE_PATTERN.format(rank=rank)
    suffix = p.suffix or ".safetensors"
    return p.with_name(f"{p.stem if p.suffix else p.name}_rank{rank}{suffix}")


def save_rank_stats(
    module: nn.Module, path: str | Path, *, rank: int | None = None, samples: float | None = None
) -> Path:
    """Write this rank's BatchNorm buffers to a small safetensors file for ``bnaudit compare`` / ``average``.

    Each rank calls it (no collective): the file holds ``running_mean``, ``running_var`` and
    ``num_batches_tracked`` of every BatchNorm layer under the model's own keys, and its metadata the rank,
    the world size and, when given, the sample count that ``bnaudit average`` uses as the rank's weight.
    Audit with ``bnaudit compare "DIR/bn_stats_rank*.safetensors"``; repair rank 0's full checkpoint with
    ``bnaudit average "DIR/bn_stats_rank*.safetensors" --reference ckpt.pt -o fixed.pt``.

    Args:
        module: the model (plain or DDP-wrapped).
        path: a directory, a name containing ``{rank}``, or a file name (``_rank{r}`` is added).
        rank: this process's rank (default: torch.distributed's rank, else 0).
        samples: how many samples this rank's statistics describe (e.g. its shard size).

    Returns:
        The file written (atomically: a temporary file and a rename); a missing folder is created.

    Raises:
        UsageError: the model has no BatchNorm layers or ``samples`` is not positive.
        OutputError: the folder cannot be created or written.
    """
    from safetensors.torch import save_file

    initialised = dist.is_available() and dist.is_initialized()
    rank = rank if rank is not None else (dist.get_rank() if initialised else 0)
    world = dist.get_world_size() if initialised else 1
    if samples is not None and not samples > 0:
        raise UsageError("samples must be a positive count", where="save_rank_stats", found=repr(samples))
    tensors = _buffers(module)
    if not tensors:
        raise UsageError("the model has no BatchNorm layers with running statistics", where="save_rank_stats")
    target = rank_stats_path(path, rank)
    # Every rank may be first to reach a fresh run folder: create it (exist_ok makes the race harmless).
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise disk_error(target, exc) from None
    with AtomicOutput(target) as staged:
        save_file(tensors, str(staged.tmp), metadata=rank_stats_metadata(rank, world, samples))
        staged.commit()
    return target


def _buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, sub in bn_modules(module):
        prefix = f"{name}." if name else ""
        for leaf in ("running_mean", "running_var", "num_batches_tracked"):
            value = getattr(sub, leaf, None)
            if isinstance(value, torch.Tensor):
                out[prefix + leaf] = value.detach().to("cpu").contiguous().clone()
    return out
