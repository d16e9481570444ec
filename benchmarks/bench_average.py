"""Benchmark ``bnaudit average`` against torch.load/average/torch.save and against a plain file copy.

Creates per-rank checkpoints shaped like ``bench_compare.py``'s (120 conv layers of 512 channels, a third 3x3,
each with BatchNorm, ``{"model": state_dict, "epoch": 7}``, fp32: about 460 MB per rank), then times, as
whole processes on a warm page cache:

- ``bnaudit average RANKS -o OUT`` (pooled merge; the byte-patching writer copies the reference, patches the
  statistics' bytes and verifies the result, no torch);
- a script that ``torch.load``s every rank (all held at once, as the usual snippet does), averages the
  BatchNorm buffers (the same pooled formulas) and ``torch.save``s the reference with the new values;
- ``shutil.copyfile`` of the reference: the physical limit of any method that writes a whole checkpoint;
  and the same followed by ``fsync``, the limit for one that writes it durably (as bnaudit does).

A last child process checks that both merged outputs hold the same statistics (to float32 rounding).

Usage:
    python benchmarks/bench_average.py                 # 4 ranks of ~460 MB (needs ~3.5 GB of disk)
    python benchmarks/bench_average.py --smoke         # tiny, for CI: checks the script runs
Prints absolute times (median and min), peak resident memory and the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Run, bnaudit_argv, python_env, run_process
from bench_compare import make_rank

TORCH_AVERAGE = """
import sys, torch
out, paths = sys.argv[1], sys.argv[2:]
ckpts = [torch.load(p, map_location="cpu", weights_only=True) for p in paths]
merged = ckpts[0]
for key, value in merged["model"].items():
    if key.endswith("running_mean"):
        var_key = key[: -len("running_mean")] + "running_var"
        means = torch.stack([c["model"][key].double() for c in ckpts])
        variances = torch.stack([c["model"][var_key].double() for c in ckpts])
        mean = means.mean(0)
        # Pooled (law of total variance), as bnaudit average's default method.
        merged["model"][var_key].copy_((variances + (means - mean) ** 2).mean(0))
        value.copy_(mean)
torch.save(merged, out)
"""

COPY = "import shutil, sys; shutil.copyfile(sys.argv[1], sys.argv[2])"
# The same copy made durable, as bnaudit's writer makes its output (fsync before the rename).
DURABLE_COPY = """
import os, shutil, sys
shutil.copyfile(sys.argv[1], sys.argv[2])
fd = os.open(sys.argv[2], os.O_RDONLY)
os.fsync(fd)
os.close(fd)
"""

CHECK = """
import sys, torch
a, b = (torch.load(p, weights_only=True)["model"] for p in sys.argv[1:3])
worst = max(float(((a[k].double() - b[k].double()).abs() / b[k].double().abs().clamp_min(1e-12)).max())
            for k in a if k.endswith(("running_mean", "running_var")))
same = all(torch.equal(a[k], b[k]) for k in a if not k.endswith(("running_mean", "running_var")))
print(f"outputs agree: max relative difference of the statistics {worst:.2e}; other tensors equal: {same}")
"""


def make_ranks(folder: Path, ranks: int, layers: int, channels: int) -> None:
    """All ranks' checkpoints, in this (child) process: the measuring parent never imports torch."""
    for rank in range(ranks):
        make_rank(folder / f"ckpt_rank{rank}.pt", layers, channels, rank)


def _timed(
    sides: dict[str, list[str]], repeats: int, env: dict[str, str], warm: bool
) -> dict[str, list[Run]]:
    """Every side ``repeats`` times, the order rotated each round; first one warm-up run each if ``warm``."""
    runs: dict[str, list[Run]] = {name: [] for name in sides}
    names = list(sides)
    if warm:
        for argv in sides.values():
            run_process(argv, env)
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            run = run_process(sides[name], env)
            if run.returncode != 0:
                sys.exit(f"{name} exited {run.returncode}")
            runs[name].append(run)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--layers", type=int, default=120)
    parser.add_argument("--channels", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one round (for CI)")
    parser.add_argument("--workdir", type=Path, default=None, help="where to write the checkpoints")
    parser.add_argument("--make", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.layers, args.channels, args.repeats = 6, 32, 1
    if args.make is not None:
        return make_ranks(args.make, args.ranks, args.layers, args.channels)
    env = python_env()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        folder = Path(tmp)
        sizes = ["--ranks", str(args.ranks), "--layers", str(args.layers), "--channels", str(args.channels)]
        subprocess.run([sys.executable, __file__, *sizes, "--make", str(folder)], check=True, env=env)
        paths = [str(folder / f"ckpt_rank{r}.pt") for r in range(args.ranks)]
        size_mb = Path(paths[0]).stat().st_size / 1e6
        print(
            f"{args.ranks} ranks x {size_mb:.1f} MB ({args.layers} conv+BN layers, {args.channels} channels)"
        )
        ours_out, torch_out, copy_out = (str(folder / name) for name in ("avg.pt", "torch_avg.pt", "copy.pt"))
        sides = {
            "bnaudit average": bnaudit_argv(
                "average", *paths, "-o", ours_out, "--force", "--fail-on", "never"
            ),
            "torch.load all + average + torch.save": [sys.executable, "-c", TORCH_AVERAGE, torch_out, *paths],
            "shutil.copyfile of the reference": [sys.executable, "-c", COPY, paths[0], copy_out],
            "shutil.copyfile + fsync": [sys.executable, "-c", DURABLE_COPY, paths[0], copy_out],
        }
        runs = _timed(sides, args.repeats, env, warm=not args.smoke)
        check = subprocess.run([sys.executable, "-c", CHECK, ours_out, torch_out], env=env, check=True,
                               capture_output=True, text=True)  # fmt: skip
    print(f"{'run':40} {'median s':>9} {'min s':>8} {'peak MiB':>9}")
    summary = {}
    for name, rs in runs.items():
        summary[name] = (statistics.median(r.seconds for r in rs), min(r.seconds for r in rs))
        print(f"{name:40} {summary[name][0]:9.3f} {summary[name][1]:8.3f} {max(r.peak_mib for r in rs):9.1f}")
    ours, torch_side, copy, durable = (summary[name] for name in sides)
    others = (("torch.load+save", torch_side), ("file copy", copy), ("durable file copy", durable))
    for label, other in others:
        print(f"ratio average / {label}: median {ours[0] / other[0]:.3f} (min {ours[1] / other[1]:.3f})")
    print(check.stdout.strip())


if __name__ == "__main__":
    main()
