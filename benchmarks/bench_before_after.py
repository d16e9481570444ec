"""Benchmark two source trees of bnaudit against each other: ``compare`` and ``average`` on the same ranks.

A restructuring must not make anything slower. This runs the same commands with ``PYTHONPATH`` set to an
earlier tree (e.g. a ``git worktree`` of an older commit) and to this one, alternating round by round on
the same per-rank checkpoints (those of ``bench_compare.py``: 120 conv+BN layers of 512 channels, ~460 MB
per rank), and prints medians, peak memory and the per-round ratio after / before. ``average`` is timed
twice: writing (a kernel copy, two SHA-256 digests and an fsync of 460 MB, dominated by the disk) and
``--dry-run`` (the rank scan alone).

Usage:
    git worktree add /tmp/before <commit>
    python benchmarks/bench_before_after.py --before /tmp/before            # 4 ranks x 460 MB, 7 rounds
    python benchmarks/bench_before_after.py --before /tmp/before --smoke    # tiny, one round
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, Run, alternate, median_run, python_env


def _sides(files: list[str], out_dir: Path, trees: dict[str, Path]) -> dict[str, list[str]]:
    sides = {}
    for label, tree in trees.items():
        # env(1) execs the command in its own process, so timing and peak memory are the command's.
        bnaudit = ["env", f"PYTHONPATH={tree}", sys.executable, "-m", "bnaudit"]
        sides[f"compare ({label})"] = [*bnaudit, "compare", *files, "--format", "json", "--fail-on", "never"]
        # --force: every round replaces the previous round's output of the same side.
        out = str(out_dir / f"averaged_{label}.pt")
        write = ["-o", out, "--force"]
        sides[f"average ({label})"] = [*bnaudit, "average", *files, *write, "--fail-on", "never"]
        # The scan alone: what the shared rank scan changed, without the write's copy and fsync.
        sides[f"average --dry-run ({label})"] = [
            *bnaudit,
            "average",
            *files,
            "--dry-run",
            "--fail-on",
            "never",
        ]
    return sides


def _report(runs: dict[str, list[Run]], rounds: int) -> None:
    print(f"{'run':36} {'median s':>9} {'min s':>8} {'CPU s':>7} {'peak MiB':>9}   ({rounds} rounds)")
    for name, side_runs in runs.items():
        mid, cpu = median_run(side_runs), statistics.median(r.cpu_seconds for r in side_runs)
        low = min(r.seconds for r in side_runs)
        print(f"{name:36} {mid.seconds:9.3f} {low:8.3f} {cpu:7.3f} {mid.peak_mib:9.1f}")
    for command in ("compare", "average", "average --dry-run"):
        before, after = runs[f"{command} (before)"], runs[f"{command} (after)"]
        wall = statistics.median(a.seconds / b.seconds for a, b in zip(after, before, strict=True))
        cpu = statistics.median(a.cpu_seconds / b.cpu_seconds for a, b in zip(after, before, strict=True))
        print(f"per-round ratio {command} after / before: median {wall:.3f} (CPU time {cpu:.3f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="the earlier source tree")
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--layers", type=int, default=120)
    parser.add_argument("--channels", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one round (for CI)")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    if args.smoke:
        args.layers, args.channels, args.repeats = 6, 32, 1
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        paths = [Path(tmp) / f"ckpt_rank{r}.pt" for r in range(args.ranks)]
        for r, path in enumerate(paths):
            make = [sys.executable, str(Path(__file__).parent / "bench_compare.py"), "--make", str(path)]
            sizes = ["--rank", str(r), "--layers", str(args.layers), "--channels", str(args.channels)]
            subprocess.run([*make, *sizes], check=True, env=python_env())
        print(f"{args.ranks} ranks x {paths[0].stat().st_size / 1e6:.0f} MB; before: {args.before}")
        trees = {"before": args.before.resolve(), "after": REPO}
        runs = alternate(_sides([str(p) for p in paths], Path(tmp), trees), args.repeats, python_env())
    _report(runs, args.repeats)


if __name__ == "__main__":
    main()
