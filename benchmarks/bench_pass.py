"""The pass alone, in one process: ``bnaudit.recalibrate`` (both modes) against ``update_bn``, per model.

No process start, checkpoint reading or writing: what is left is the engine's own per-call and per-layer
cost. Eight batches of 32 synthetic 3x32x32 images, the models of ``benchmarks/archs.py`` (width 16), two
threads; the sides alternate (order reversed every other round), five rounds, medians.

Usage:
    python benchmarks/bench_pass.py            # prints one line per architecture with the ratios
    python benchmarks/bench_pass.py --batches 64   # the same with 64 batches per pass
    python benchmarks/bench_pass.py --smoke    # one round, one batch (for CI)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.optim.swa_utils import update_bn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.archs import build
from bnaudit.live.options import RecalibrationOptions
from bnaudit.live.recalibrate import recalibrate

SIDES = ("update_bn", "population", "sequential")


def _run(name: str, model: torch.nn.Module, data: list[torch.Tensor]) -> float:
    # A pause first: the OpenMP workers of the side before (sequential mode's forwards run in threads of
    # their own) spin for a while after their last task and would take cores from this side.
    time.sleep(0.5)
    start = time.perf_counter()
    if name == "update_bn":
        update_bn(data, model)
    else:
        recalibrate(model, data, RecalibrationOptions(mode=name))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--batches", type=int, default=8, help="batches per pass (more: less per-pass setup)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rounds, batches = (1, 1) if args.smoke else (5, args.batches)
    gen = torch.Generator().manual_seed(0)
    data = [torch.randn(32, 3, 32, 32, generator=gen) for _ in range(batches)]
    for arch in ("plain", "resnet", "mobilenet", "head"):
        base = build(arch, width=16)
        times: dict[str, list[float]] = {name: [] for name in SIDES}
        for r in range(rounds):
            for name in SIDES if r % 2 == 0 else SIDES[::-1]:
                times[name].append(_run(name, copy.deepcopy(base), data))
        med = {name: statistics.median(v) for name, v in times.items()}
        ub = med["update_bn"]
        ratios = "  ".join(f"{n}/update_bn {med[n] / ub:.2f}" for n in SIDES[1:])
        print(f"{arch:<10} " + " ".join(f"{n} {v:.3f} s" for n, v in med.items()) + "  " + ratios)
    print("pass ratios: done")


if __name__ == "__main__":
    main()
