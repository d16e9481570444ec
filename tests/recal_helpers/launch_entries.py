"""Worker functions for the launcher tests; torch is imported inside them, in the workers only."""

from __future__ import annotations

import os
import time

from bnaudit.errors import UsageError


def all_reduce_rank() -> tuple[int, float, str]:
    """Join the group, all-reduce rank + 1, and report what this worker saw."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        value = torch.tensor([dist.get_rank() + 1.0])
        dist.all_reduce(value)
        return dist.get_rank(), float(value), os.environ["OMP_NUM_THREADS"]
    finally:
        dist.destroy_process_group()


def rank1_fails_rank0_hangs() -> int:
    """Rank 1 raises a BnauditError at once; rank 0 would run for a minute."""
    if os.environ["RANK"] == "1":
        raise UsageError("rank 1 gave up on purpose")
    time.sleep(60)
    return 0


def rank1_fails_rank0_hangs_briefly() -> int:
    """Rank 1 raises a BnauditError at once; rank 0 runs two seconds longer and succeeds."""
    if os.environ["RANK"] == "1":
        raise UsageError("rank 1 gave up on purpose")
    time.sleep(2)
    return 0


def rank1_dies() -> int:
    """Rank 1 dies without a word (as a crash or the OOM killer would leave it)."""
    if os.environ["RANK"] == "1":
        os._exit(7)
    return 0
