"""Benchmark ``bnaudit compare`` against loading the same checkpoints with torch.load.

Creates per-rank checkpoints shaped like a real CNN — 120 conv layers of 512 channels (a third 3x3, the rest
1x1), each followed by BatchNorm, saved as ``{"model": state_dict, "epoch": 7}`` in fp32 (about 460 MB per
rank) — then times, as whole processes on a warm page cache:

- ``bnaudit compare --format json`` on the ranks;
- a script that ``torch.load``s every rank fully (the baseline), and one with ``mmap=True``.

Usage:
    python benchmarks/bench_compare.py                 # 4 ranks of ~460 MB (needs ~2 GB of disk)
    python benchmarks/bench_compare.py --smoke         # tiny, for CI: checks the script runs
Prints absolute times, peak resident memory and the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from collections import OrderedDict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import alternate, bnaudit_argv, median_run, python_env

LOAD_SCRIPT = """
import sys, torch
for path in sys.argv[2:]:
    sd = torch.load(path, map_location="cpu", weights_only=True, mmap=sys.argv[1] == "mmap")
    # Touch the BatchNorm statistics, as an audit would.
    total = sum(float(v.double().sum()) for k, v in sd["model"].items() if k.endswith("running_var"))
"""


COMPARE = "bnaudit compare --format json"
FULL = "torch.load (full) of every rank"
MMAP = "torch.load(mmap=True) of every rank"
HELP = "bnaudit --help"


def make_rank(path: Path, layers: int, channels: int, rank: int) -> None:
    """One rank's checkpoint: conv weights shared in value across ranks, BN statistics per rank.

    Runs in a child process (``--make``) so that the measuring parent never imports torch: a forked child
    would otherwise start with the parent's resident memory counted in its peak.
    """
    import torch

    gen = torch.Generator().manual_seed(0)
    stats_gen = torch.Generator().manual_seed(1000 + rank)
    sd: OrderedDict[str, torch.Tensor] = OrderedDict()
    for i in range(layers):
        k = 3 if i % 3 == 0 else 1
        sd[f"layer{i}.conv.weight"] = torch.randn(channels, channels, k, k, generator=gen)
        sd[f"layer{i}.bn.weight"] = torch.ones(channels)
        sd[f"layer{i}.bn.bias"] = torch.zeros(channels)
        sd[f"layer{i}.bn.running_mean"] = torch.randn(channels, generator=stats_gen) * 0.1
        sd[f"layer{i}.bn.running_var"] = 1 + torch.rand(channels, generator=stats_gen) * 0.1
        sd[f"layer{i}.bn.num_batches_tracked"] = torch.tensor(1000)
    torch.save({"model": sd, "epoch": 7}, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--layers", type=int, default=120)
    parser.add_argument("--channels", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5, help="rounds; each round runs every side once")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one round (for CI)")
    parser.add_argument("--workdir", type=Path, default=None, help="where to write the checkpoints")
    parser.add_argument("--make", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make is not None:
        make_rank(args.make, args.layers, args.channels, args.rank)
        return
    if args.smoke:
        args.layers, args.channels, args.repeats = 6, 32, 1
    env = python_env()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        paths = [Path(tmp) / f"ckpt_rank{r}.pt" for r in range(args.ranks)]
        for r, path in enumerate(paths):
            make = [sys.executable, __file__, "--make", str(path), "--rank", str(r)]
            sizes = ["--layers", str(args.layers), "--channels", str(args.channels)]
            subprocess.run([*make, *sizes], check=True)
        size_mb = paths[0].stat().st_size / 1e6
        shape = f"{args.layers} conv+BN layers, {args.channels} channels"
        print(f"{args.ranks} ranks x {size_mb:.0f} MB ({shape})")
        files = [str(p) for p in paths]
        sides = {
            COMPARE: bnaudit_argv("compare", *files, "--format", "json", "--fail-on", "never"),
            FULL: [sys.executable, "-c", LOAD_SCRIPT, "full", *files],
            MMAP: [sys.executable, "-c", LOAD_SCRIPT, "mmap", *files],
            HELP: bnaudit_argv("--help"),
        }
        runs = alternate(sides, args.repeats, env)
    print(f"{'run':38} {'median s':>9} {'min s':>8} {'peak MiB':>9}   ({args.repeats} rounds)")
    for name, side_runs in runs.items():
        mid, low = median_run(side_runs), min(r.seconds for r in side_runs)
        print(f"{name:38} {mid.seconds:9.3f} {low:8.3f} {mid.peak_mib:9.1f}")
    ours, full, mmap = (median_run(runs[name]) for name in (COMPARE, FULL, MMAP))
    low = {name: min(r.seconds for r in runs[name]) for name in (COMPARE, FULL, MMAP)}
    print(f"ratio compare / torch.load full: median {ours.seconds / full.seconds:.3f} "
          f"(min {low[COMPARE] / low[FULL]:.3f})")  # fmt: skip
    print(f"ratio compare / torch.load mmap: median {ours.seconds / mmap.seconds:.3f} "
          f"(min {low[COMPARE] / low[MMAP]:.3f})")  # fmt: skip
    # Each round runs both sides moments apart: the median of the per-round ratios cancels slow drift.
    paired = statistics.median(c.seconds / f.seconds for c, f in zip(runs[COMPARE], runs[FULL], strict=True))
    print(f"per-round ratio compare / torch.load full: median {paired:.3f}")
    if ours.returncode not in (0, 1):
        sys.exit(f"bnaudit compare exited {ours.returncode}")


if __name__ == "__main__":
    main()
