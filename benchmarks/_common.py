"""Shared helpers for the benchmark scripts: whole-process timing and peak memory of a command."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Run:
    """One whole-process run: wall seconds, peak resident memory (MiB), exit code and CPU seconds.

    CPU seconds (user + system) move less than wall time on a shared host: they do not count waits.
    """

    seconds: float
    peak_mib: float
    returncode: int
    cpu_seconds: float = 0.0


def run_process(argv: Sequence[str], env: dict[str, str] | None = None) -> Run:
    """Run ``argv`` to completion, measuring wall time and the child's own peak RSS (via wait4)."""
    start = time.perf_counter()
    proc = subprocess.Popen(list(argv), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.stderr is not None:
        err = proc.stderr.read().decode(errors="replace")
        proc.stderr.close()
        if proc.returncode not in (0, 1):
            print(err, file=sys.stderr)
    return Run(seconds, usage.ru_maxrss / 1024, proc.returncode, usage.ru_utime + usage.ru_stime)


def alternate(
    sides: dict[str, list[str]], rounds: int, env: dict[str, str] | None = None
) -> dict[str, list[Run]]:
    """Run every side once per round after one warm-up each, rotating the order round by round.

    Drift in the machine's speed (other jobs, frequency changes) then hits every side alike.
    """
    for argv in sides.values():
        run_process(argv, env)  # page cache and .pyc files
    runs: dict[str, list[Run]] = {name: [] for name in sides}
    names = list(sides)
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            runs[name].append(run_process(sides[name], env))
    return runs


def median_run(runs: list[Run]) -> Run:
    """Median seconds, max peak memory and the last exit code of repeated runs."""
    return Run(statistics.median(r.seconds for r in runs), max(r.peak_mib for r in runs), runs[-1].returncode)


def python_env() -> dict[str, str]:
    """The environment for child Pythons: this repo importable, one thread per process for fair timing."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    # Measure what users see: Python caches compiled modules (.pyc) unless told not to, as some sandboxes
    # and CI images do; without the cache every run recompiles bnaudit's modules (~0.1-0.2 s).
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def bnaudit_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "bnaudit", *args]
