"""A torchrun worker for the distributed tests: recalibrates and saves the result, or fails on purpose."""

from __future__ import annotations

import sys
from typing import Any

import torch

from bnaudit.errors import BnauditError
from bnaudit.live.distributed import destroy_on_exit, init_from_env
from bnaudit.live.options import RecalibrationOptions
from bnaudit.live.recalibrate import recalibrate
from tests.recal_helpers.models import FailingBatches, make_batches, make_convnet, make_uneven


def _after(result: Any) -> dict[str, Any]:
    return {layer.name: (layer.after_mean, layer.after_var, layer.calls) for layer in result.layers} | {
        "_batches": result.batches, "_samples": result.samples, "_world": result.world_size,
        "_passes": result.passes,
    }  # fmt: skip


def cases() -> dict[str, Any]:
    """The same recalibrations, run by the single-process test and by each rank."""
    out = {}
    out["even"] = _after(recalibrate(make_convnet(), make_batches()))
    out["uneven"] = _after(recalibrate(make_convnet(), make_uneven()))
    small = make_batches(n=12, batch_size=2)
    out["sequential"] = _after(recalibrate(make_convnet(), small, RecalibrationOptions(mode="sequential")))
    refine = RecalibrationOptions(mode="sequential", resident_batches=0)
    out["sequential_refine"] = _after(recalibrate(make_convnet(), small, refine))
    loader = torch.utils.data.DataLoader(torch.cat(make_batches()), batch_size=7)
    out["loader_max7"] = _after(recalibrate(make_convnet(), loader, RecalibrationOptions(max_batches=7)))
    rank, world = (
        (torch.distributed.get_rank(), torch.distributed.get_world_size())
        if torch.distributed.is_initialized()
        else (None, None)
    )
    sharded = make_batches(rank=rank, world_size=world)
    out["self_sharded"] = _after(
        recalibrate(make_convnet(), sharded, RecalibrationOptions(sharded=rank is not None))
    )
    return out


def failing_entry(bad: int) -> int:
    """launch_local entry: rank bad % world's loader raises on global batch ``bad``."""
    ctx = init_from_env()
    with destroy_on_exit(ctx):
        recalibrate(make_convnet(), FailingBatches(bad))
    return 0


def ok_entry() -> int:
    ctx = init_from_env()
    with destroy_on_exit(ctx):
        result = recalibrate(make_convnet(), make_batches())
    return result.batches


def main() -> None:
    mode, out = sys.argv[1], sys.argv[2]
    ctx = init_from_env()
    assert ctx is not None
    try:
        with destroy_on_exit(ctx):
            if mode == "fail":
                recalibrate(make_convnet(), FailingBatches(3))
            else:
                torch.save(cases(), f"{out}.rank{ctx.rank}")
    except BnauditError as exc:
        # One write per line: two ranks share stderr, and print() may split text and newline.
        sys.stderr.write(f"bnaudit: error: {exc}\n")
        sys.stderr.flush()
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
