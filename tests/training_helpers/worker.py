"""torchrun worker for tests/live/test_training_api.py: sync_bn_stats and save_rank_stats on real gloo ranks."""

from __future__ import annotations

import sys
from collections import OrderedDict
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import bnaudit

METHODS = [("pooled", False), ("mean", False), ("pooled", True), ("mean", True)]


def build_model() -> nn.Module:
    """A conv + BatchNorm2d + linear + BatchNorm1d model, DDP-style key prefixes left to the caller."""
    torch.manual_seed(0)
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(1, 3, 1, bias=False),
            bn=nn.BatchNorm2d(3),
            flat=nn.Flatten(),
            fc=nn.Linear(3, 5, bias=False),
            fc_bn=nn.BatchNorm1d(5),
        )
    )


def rank_buffers(rank: int) -> dict[str, torch.Tensor]:
    """Deterministic, rank-specific statistics (the test recomputes them)."""
    g = torch.Generator().manual_seed(100 + rank)
    out = {}
    for name, c in (("bn", 3), ("fc_bn", 5)):
        out[f"{name}.running_mean"] = torch.randn(c, generator=g, dtype=torch.float64) * 2 + rank
        out[f"{name}.running_var"] = torch.rand(c, generator=g, dtype=torch.float64) * 3 + 0.1
        out[f"{name}.num_batches_tracked"] = torch.tensor(10 + rank)
    return out


def samples_of(rank: int) -> int:
    return 2 * rank + 1


def load_into(model: nn.Module, rank: int) -> None:
    with torch.no_grad():
        for key, value in rank_buffers(rank).items():
            module_name, leaf = key.rsplit(".", 1)
            getattr(getattr(model, module_name), leaf).copy_(value)


def main(out_dir: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = build_model()
    load_into(model, rank)
    saved = bnaudit.save_rank_stats(model, out_dir, samples=samples_of(rank))
    if rank == 0:
        torch.save({"model": model.state_dict(), "epoch": 7}, out_dir / "full_rank0.pt")
    results = {}
    for method, weighted in METHODS:
        load_into(model, rank)
        names = bnaudit.sync_bn_stats(model, method=method, samples=samples_of(rank) if weighted else None)
        assert names == ["bn", "fc_bn"], names
        results[f"{method}-{'weighted' if weighted else 'equal'}"] = {
            k: v.clone() for k, v in model.state_dict().items() if "bn" in k
        }
    torch.save({"results": results, "saved": str(saved)}, out_dir / f"synced_rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
