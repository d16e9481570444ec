"""Scale in ranks: ``bnaudit compare`` (and ``average``) over many synthetic per-rank statistics files.

Writes N files shaped like ``bnaudit.save_rank_stats`` output for a ResNet-50-like layout (50 BatchNorm
layers, 25,664 channels: about 0.2 MB of statistics per rank) and measures, as whole processes, the time
and peak resident memory of ``bnaudit compare --format json`` and ``bnaudit average`` for several N. Memory
must stay flat as N grows (ranks are streamed through mergeable per-layer accumulators); time grows
linearly. ``--jobs`` reads files ahead in threads.

Usage:
    python benchmarks/bench_ranks.py                       # N = 64, 256, 1024
    python benchmarks/bench_ranks.py --ranks 16 1024 --jobs 4
    python benchmarks/bench_ranks.py --smoke               # tiny, for CI
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import bnaudit_argv, python_env, run_process

# (channels, count) of BatchNorm layers, roughly a ResNet-50's.
RESNET50_BN = [(64, 1), (64, 6), (256, 4), (128, 7), (512, 5), (256, 11), (1024, 7), (512, 5), (2048, 4)]


def layer_channels() -> list[int]:
    return [c for c, n in RESNET50_BN for _ in range(n)]


def write_ranks(folder: Path, ranks: int, channels: list[int]) -> list[Path]:
    """One safetensors file of BatchNorm buffers per rank, with the save_rank_stats metadata."""
    rng = np.random.default_rng(0)
    paths = []
    for r in range(ranks):
        tensors: dict[str, np.ndarray] = {}
        for i, c in enumerate(channels):
            tensors[f"bn{i}.running_mean"] = (rng.standard_normal(c) * 0.1).astype(np.float32)
            tensors[f"bn{i}.running_var"] = (1 + rng.random(c) * 0.1).astype(np.float32)
            tensors[f"bn{i}.num_batches_tracked"] = np.array(1000, dtype=np.int64)
        path = folder / f"bn_stats_rank{r}.safetensors"
        meta = {"bnaudit.kind": "rank-bn-stats", "bnaudit.rank": str(r), "bnaudit.world_size": str(ranks)}
        save_file(tensors, str(path), metadata=meta)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="N = 4 and 16 only (for CI)")
    args = parser.parse_args()
    if args.smoke:
        args.ranks = [4, 16]
    channels = layer_channels()
    env = python_env()
    print(f"{len(channels)} BatchNorm layers, {sum(channels)} channels per rank; --jobs {args.jobs}")
    print(f"{'ranks':>6} {'command':8} {'seconds':>8} {'ms/rank':>8} {'peak MiB':>9}")
    for n in args.ranks:
        with tempfile.TemporaryDirectory() as tmp:
            paths = [str(p) for p in write_ranks(Path(tmp), n, channels)]
            runs = {
                "compare": bnaudit_argv("compare", *paths, "--format", "json", "-o", f"{tmp}/r.json",
                                        "--fail-on", "never", "--jobs", str(args.jobs)),
                "average": bnaudit_argv("average", *paths, "-o", f"{tmp}/avg.safetensors",
                                        "--report", f"{tmp}/a.txt"),
            }  # fmt: skip
            for name, argv in runs.items():
                run = run_process(argv, env)
                if run.returncode not in (0, 1):
                    sys.exit(f"{name} on {n} ranks exited {run.returncode}")
                per_rank = 1000 * run.seconds / n
                print(f"{n:6d} {name:8} {run.seconds:8.2f} {per_rank:8.2f} {run.peak_mib:9.1f}")


if __name__ == "__main__":
    main()
