"""Benchmark distributed ``bnaudit recalibrate`` at equal total threads, and measure its all-reduce volume.

Uses the model, checkpoint and data of ``bench_recalibrate.py`` (a ResNet-style CNN with 15 BatchNorm2d
layers, synthetic 3x32x32 inputs from a DataLoader) and times, as whole processes, alternating the sides:

- one process with two threads (``OMP_NUM_THREADS=2``, which torch takes as its intra-op thread count);
- ``bnaudit recalibrate --nproc 2``, two processes with one thread each (gloo; bnaudit's own launcher);
- ``torchrun --nproc_per_node 2 -m bnaudit recalibrate``, the same under plain torchrun.

The overhead is (time with 2 processes) / (time with 1 process x 2 threads) - 1. The three outputs must hold
the same statistics (to float32 rounding: the batches are the same, the reduction order differs).

The cross-rank traffic is read from ``bnaudit --debug``'s ``all_gather`` log line (one all-gather of every
layer's packed sufficient statistics, ``LayerSums.packed_size(C) = 2 + 6C`` float64 values per layer plus 2)
for two runs of very different data size and batch count, and checked against the formula.

Usage:
    python benchmarks/bench_distributed.py             # 4,096 samples, batches of 128, 5 rounds
    python benchmarks/bench_distributed.py --smoke     # tiny, for CI: checks the script runs
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, Run, bnaudit_argv, python_env
from bench_recalibrate import make_inputs

ONE = "1 process x 2 threads"
NPROC = "--nproc 2, 1 thread each"
GATHER_LINE = re.compile(r"all_gather: (\d+) float64 values \((\d+) bytes\) per rank, (\d+) bytes gathered")


def expected_volume(folder: Path, width: int) -> None:
    """Print, as JSON, the float64 values per rank the formula predicts (child process: imports torch)."""
    sys.path.insert(0, str(folder))
    import benchmod

    from bnaudit.live.estimators import LayerSums
    from bnaudit.live.recalibrate import find_bn_modules

    layers = find_bn_modules(benchmod.build(width))
    channels = [int(m.running_mean.numel()) for _, m in layers]  # type: ignore[union-attr]
    values = 2 + sum(LayerSums.packed_size(c) for c in channels)  # 2: batch and sample counts
    print(json.dumps({"layers": len(layers), "channels": sum(channels), "values": values}))


def run_capture(argv: list[str], env: dict[str, str]) -> tuple[Run, str]:
    """Run ``argv`` to completion: wall time and exit code (peak memory not measured), and its stderr."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True)
    _, err = proc.communicate()
    seconds = time.perf_counter() - start
    return Run(seconds, 0.0, proc.returncode), err


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one round, no torchrun side (CI)")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--child", choices=["make"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.samples, args.batch_size, args.width, args.repeats = 64, 16, 4, 1
    if args.child == "make":
        make_inputs(args.folder, args.samples, args.width)
        return expected_volume(args.folder, args.width)

    base = python_env()
    two_threads = {**base, "OMP_NUM_THREADS": "2"}
    one_thread = {**base, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        folder = Path(tmp)
        sizes = [
            "--samples",
            str(args.samples),
            "--batch-size",
            str(args.batch_size),
            "--width",
            str(args.width),
        ]
        made = subprocess.run([sys.executable, __file__, *sizes, "--folder", str(folder), "--child", "make"],
                              check=True, env=base, capture_output=True, text=True)  # fmt: skip
        expected = json.loads(made.stdout.strip().splitlines()[-1])
        module = folder / "benchmod.py"
        ckpt = str(folder / "ckpt.pt")

        def command(out: str, batch_size: int, *extra: str) -> list[str]:
            spec = ["--model", f"{module}:build", "--model-arg", f"width={args.width}",
                    "--data", f"{module}:loader", "--batch-size", str(batch_size)]  # fmt: skip
            # --debug everywhere (the same logging cost on every side): the all_gather line gives the volume.
            return ["--debug", "recalibrate", ckpt, *spec, *extra, "-o", str(folder / out), "--force",
                    "--quiet", "--format", "json", "--fail-on", "never"]  # fmt: skip

        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    "-m", "bnaudit"]  # fmt: skip
        single = bnaudit_argv(*command("one.pt", args.batch_size))
        nproc = bnaudit_argv(*command("nproc.pt", args.batch_size, "--nproc", "2"))
        sides: dict[str, tuple[list[str], dict[str, str], str]] = {
            ONE: (single, two_threads, "one.pt"),
            NPROC: (nproc, one_thread, "nproc.pt"),
        }
        if not args.smoke:
            sides["torchrun --nproc_per_node 2, 1 thread"] = (
                [*torchrun, *command("torchrun.pt", args.batch_size)], one_thread, "torchrun.pt")  # fmt: skip
        runs: dict[str, list[Run]] = {name: [] for name in sides}
        logs: dict[str, str] = {}
        names = list(sides)
        if not args.smoke:
            for argv, env, _ in sides.values():  # warm-up: page cache, .pyc files
                run_capture(argv, env)
        for round_index in range(args.repeats):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                argv, env, _ = sides[name]
                run, err = run_capture(argv, env)
                if run.returncode != 0:
                    sys.exit(f"{name} exited {run.returncode}:\n{err[-2000:]}")
                runs[name].append(run)
                logs[name] = err
        # A second, much smaller run (2 batches of half the size) for the volume's independence of the data.
        small_batch = max(1, args.batch_size // 2)
        small = bnaudit_argv(*command("small.pt", small_batch, "--nproc", "2", "--max-batches", "2"))
        small_run, small_log = run_capture(small, one_thread)
        if small_run.returncode != 0:
            sys.exit(f"the small --nproc 2 run exited {small_run.returncode}:\n{small_log[-2000:]}")
        agreement = _agreement(folder, [out for _, _, out in sides.values()])

    _report(args, expected, runs, logs, small_log, small_batch, agreement)


def _agreement(folder: Path, outputs: list[str]) -> float:
    """Largest relative difference of any running_mean / running_var between the outputs (bnaudit's reader:
    no torch in this process)."""
    import numpy as np

    from bnaudit.checkpoint import load_checkpoint, read_tensor

    def stats(name: str) -> dict[str, np.ndarray]:
        sd = load_checkpoint(folder / name).state_dicts[0]
        return {k: read_tensor(t).astype(np.float64) for k, t in sd.tensors.items()
                if k.endswith(("running_mean", "running_var"))}  # fmt: skip

    first, worst = stats(outputs[0]), 0.0
    for other in outputs[1:]:
        values = stats(other)
        for key, ref in first.items():
            scale = np.maximum(np.abs(ref), 1e-12)
            worst = max(worst, float(np.max(np.abs(values[key] - ref) / scale)))
    return worst


def _volume(log: str) -> tuple[int, int] | None:
    found = GATHER_LINE.findall(log)
    return (int(found[0][0]), int(found[0][2])) if found else None


def _report(
    args: argparse.Namespace,
    expected: dict[str, int],
    runs: dict[str, list[Run]],
    logs: dict[str, str],
    small_log: str,
    small_batch: int,
    agreement: float,
) -> None:
    print(f"{args.samples} samples 3x32x32, batches of {args.batch_size}, {expected['layers']} BatchNorm "
          f"layers ({expected['channels']} channels), {os.cpu_count()} cores, "
          f"{args.repeats} rounds")  # fmt: skip
    print(f"{'run':40} {'median s':>9} {'min s':>8}")
    summary = {}
    for name, rs in runs.items():
        summary[name] = (statistics.median(r.seconds for r in rs), min(r.seconds for r in rs))
        print(f"{name:40} {summary[name][0]:9.3f} {summary[name][1]:8.3f}")
    one = summary[ONE]
    for name, (med, low) in summary.items():
        if name != ONE:
            print(f"ratio {name} / {ONE}: median {med / one[0]:.3f} (min {low / one[1]:.3f}); "
                  f"overhead {med / one[0] - 1:+.1%}")  # fmt: skip
    # Both sides of a round run moments apart: the median of the per-round ratios cancels slow drift.
    for name, rs in runs.items():
        if name != ONE:
            paired = statistics.median(r.seconds / o.seconds for r, o in zip(rs, runs[ONE], strict=True))
            print(f"per-round ratio {name} / {ONE}: median {paired:.3f}; overhead {paired - 1:+.1%}")
    print(f"outputs agree: max relative difference of the statistics {agreement:.2e}")
    big, little = _volume(logs[NPROC]), _volume(small_log)
    if big is None or little is None:
        sys.exit("no all_gather line in the --debug log of the --nproc runs")
    batches = -(-args.samples // args.batch_size)
    print(f"all-gather, {args.samples} samples in {batches} batches of {args.batch_size}: {big[0]} float64 "
          f"values per rank, {big[1]} bytes gathered per rank")  # fmt: skip
    print(f"all-gather, {2 * small_batch} samples in 2 batches of {small_batch}: {little[0]} float64 values "
          f"per rank, {little[1]} bytes gathered per rank")  # fmt: skip
    print(f"expected from LayerSums.packed_size: 2 + sum(2 + 6C) = {expected['values']} values per rank; "
          f"volume independent of data: {big == little and big[0] == expected['values']}")  # fmt: skip


if __name__ == "__main__":
    os.chdir(REPO)
    main()
