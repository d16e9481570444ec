"""One rank of the study's DDP runs (started by ``torchrun``): trains every run of a plan, saves its own file.

Usage (by gate_calibration.py): ``torchrun --nproc-per-node N worker.py PLAN.json``; the plan lists runs of
one world size and the folder each run writes to (``ckpt_rank{r}.pt`` per rank, ``run.json`` from rank 0).
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.join import Join
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from calibration import data, models, syncbn
from calibration.matrix import RunConfig

LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 5e-4


def ddp_kwargs(sync: str) -> dict[str, Any]:
    """DDP's buffer-sync switch: ``forward_sync_buffers`` where torch has it, ``broadcast_buffers`` before."""
    on = sync != "none" and sync != "epoch_allreduce"
    name = (
        "forward_sync_buffers"
        if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
        else "broadcast_buffers"
    )
    return {name: on}


def _batch_size(run: RunConfig, shards: list[np.ndarray]) -> int:
    # A batch never exceeds half the smallest shard, so every rank takes at least two steps an epoch.
    return max(2, min(run.batch_size, min(len(s) for s in shards) // 2))


def train(run: RunConfig, folder: Path) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(run.seed)
    model = models.build(run.arch, run.dataset)
    if run.sync == "syncbn":
        syncbn.convert(model)
    ddp = DistributedDataParallel(model, **ddp_kwargs(run.sync))
    labels = data.split(run.dataset, "train").y.numpy()
    shards = data.shard_indices(labels, run.shards, run.world_size, seed=1000 + run.seed)
    batch = _batch_size(run, shards)
    steps = None if run.shards == "uneven" else min(len(s) // batch for s in shards)
    train_split = data.split(run.dataset, "train")
    mine = shards[rank]
    x = train_split.x[mine]
    if run.shift != "none":
        x = data.apply_domain(x, data.domains_for(run.shift, world)[rank])
    y = train_split.y[mine]
    my_steps = steps if steps is not None else len(mine) // batch
    total_steps = run.epochs * (steps if steps is not None else max(len(s) // batch for s in shards))
    optimizer = torch.optim.SGD(
        ddp.parameters(), lr=LR, momentum=MOMENTUM, nesterov=True, weight_decay=WEIGHT_DECAY
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps))
    )
    generator = torch.Generator().manual_seed(2000 + 97 * run.seed + rank)
    losses = []
    for _ in range(run.epochs):
        order = torch.randperm(len(mine), generator=generator)
        ddp.train()
        with Join([ddp], enable=steps is None):
            for step in range(my_steps):
                rows = order[step * batch : (step + 1) * batch]
                loss = nn.functional.cross_entropy(ddp(x[rows]), y[rows])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
        losses.append(float(loss.detach()))
        if run.sync == "epoch_allreduce":
            _average_buffers(model, world)
    _save(run, folder, model, optimizer, rank, world)
    if rank == 0:
        _write_log(run, folder, shards, batch, steps, losses)


def _average_buffers(model: nn.Module, world: int) -> None:
    """What timm's ``distribute_bn(reduce=True)`` does at each epoch's end: average the running stats."""
    for name, buffer in model.named_buffers():
        if name.endswith(("running_mean", "running_var")):
            dist.all_reduce(buffer)
            buffer /= world


def _save(
    run: RunConfig, folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, rank: int, world: int
) -> None:
    state = model.state_dict()
    if run.layout == "timm":
        args = argparse.Namespace(
            model=run.arch,
            batch_size=run.batch_size,
            lr=LR,
            epochs=run.epochs,
            sync_bn=run.sync == "syncbn",
            dist_bn="reduce" if run.sync == "epoch_allreduce" else "",
            no_ddp_bb=run.sync != "broadcast",
            grad_accum_steps=1,
            distributed=True,
            world_size=world,
            rank=rank,
        )
        payload = {
            "epoch": run.epochs - 1,
            "arch": run.arch,
            "state_dict": state,
            "optimizer": optimizer.state_dict(),
            "version": 2,
            "args": args,
        }
    else:
        payload = {"model": state, "optimizer": optimizer.state_dict(), "epoch": run.epochs - 1}
    torch.save(payload, folder / f"ckpt_rank{rank}.pt")


def _write_log(
    run: RunConfig, folder: Path, shards: list[np.ndarray], batch: int, steps: int | None, losses: list[float]
) -> None:
    labels = data.split(run.dataset, "train").y.numpy()
    log = {
        "config": run.to_json(),
        "batch_size_used": batch,
        "steps_per_epoch": steps,
        "shard_sizes": [len(s) for s in shards],
        "shard_labels": [np.bincount(labels[s], minlength=int(labels.max()) + 1).tolist() for s in shards],
        "last_loss_per_epoch_rank0": losses,
        "torch": torch.__version__,
    }
    (folder / "run.json").write_text(json.dumps(log, indent=1) + "\n")


def main() -> None:
    plan = json.loads(Path(sys.argv[1]).read_text())
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    dist.init_process_group("gloo")
    try:
        for item in plan:
            run = RunConfig(**item["config"])
            folder = Path(item["folder"])
            if dist.get_rank() == 0:
                folder.mkdir(parents=True, exist_ok=True)
            dist.barrier()
            train(run, folder)
            dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
