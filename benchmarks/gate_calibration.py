"""The gate calibration study: train a matrix of real DDP runs, measure every checkpoint, choose the rule.

Usage:
    .venv/bin/python benchmarks/gate_calibration.py            # the full study (about 15-25 min on 2 cores)
    .venv/bin/python benchmarks/gate_calibration.py --smoke    # three 2-rank runs, for CI (under a minute)
    .venv/bin/python benchmarks/gate_calibration.py --analyse  # re-derive the rule and tables from runs.json

Training runs under ``python -m torch.distributed.run`` (gloo, CPU, one launch per world size and framework);
every run writes one checkpoint per rank. The results (``runs.json``, ``runs.csv``, ``rule.json``,
``table.md``, ``plot.png``) go to ``benchmarks/results/gate_calibration/`` (``--out``); the README quotes
them.
The Lightning runs need ``lightning`` installed and are skipped (and said so) without it.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from calibration import analyse, matrix, measure, report_files

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results" / "gate_calibration"
WORKERS = {
    "ddp": BENCH / "calibration" / "worker.py",
    "lightning": BENCH / "calibration" / "lightning_worker.py",
}


def launch(runs: list[matrix.RunConfig], work: Path) -> None:
    """Train ``runs`` (one world size, one framework) in one torchrun launch."""
    plan = [{"config": dataclasses.asdict(r), "folder": str(work / r.name)} for r in runs]
    plan_file = work / f"plan-{runs[0].framework}-w{runs[0].world_size}.json"
    plan_file.write_text(json.dumps(plan))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(BENCH)}
    argv = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={runs[0].world_size}",
    ]
    started = time.perf_counter()
    subprocess.run([*argv, str(WORKERS[runs[0].framework]), str(plan_file)], env=env, check=True)
    print(
        f"trained {len(runs)} run(s) of {runs[0].world_size} ranks in {time.perf_counter() - started:.0f} s",
        flush=True,
    )


def train_all(runs: list[matrix.RunConfig], work: Path) -> None:
    groups: dict[tuple[str, int], list[matrix.RunConfig]] = {}
    for run in runs:
        groups.setdefault((run.framework, run.world_size), []).append(run)
    for key in sorted(groups):
        launch(groups[key], work)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="three short 2-rank runs (CI)")
    parser.add_argument(
        "--analyse", action="store_true", help="only re-derive the rule and tables from runs.json"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help=f"results folder (default {RESULTS}; smoke: a temp dir)"
    )
    parser.add_argument(
        "--work", type=Path, default=None, help="where the checkpoints go (default: a temp dir)"
    )
    parser.add_argument("--only", nargs="*", default=None, help="train and measure only these run names")
    parser.add_argument("--remeasure", action="store_true", help="measure the runs already in --work again")
    args = parser.parse_args(argv)
    out = args.out or (Path(tempfile.mkdtemp(prefix="bnaudit-smoke-")) if args.smoke else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    if not args.analyse:
        runs = matrix.smoke_matrix() if args.smoke else matrix.full_matrix()
        if args.only:
            runs = [r for r in runs if r.name in args.only]
        if importlib.util.find_spec("lightning") is None:
            skipped = [r.name for r in runs if r.framework == "lightning"]
            runs = [r for r in runs if r.framework != "lightning"]
            if skipped:
                print(f"lightning is not installed: skipping {', '.join(skipped)}", file=sys.stderr)
        work = args.work or Path(tempfile.mkdtemp(prefix="bnaudit-study-"))
        work.mkdir(parents=True, exist_ok=True)
        if not args.remeasure:
            train_all(runs, work)
        records = []
        for run in runs:
            records.append(measure.measure(run, work / run.name))
            print(f"measured {run.name}", flush=True)
        (out / "runs.json").write_text(json.dumps(records, indent=1) + "\n")
    records = json.loads((out / "runs.json").read_text())
    study = analyse.analyse(records)
    report_files.write(out, records, study)
    for gate in ("compare", "drift"):
        judged = study[gate]
        print(
            f"{gate}: {judged['metric']} {judged['rule']}; right on {judged['tuning']['right']}/"
            f"{judged['tuning']['total']} tuning and "
            f"{judged['heldout']['right']}/{judged['heldout']['total']} "
            f"held-out points; bnaudit agrees on {study['bnaudit_agrees'][gate]['same']}/"
            f"{study['bnaudit_agrees'][gate]['total']}"
        )
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
