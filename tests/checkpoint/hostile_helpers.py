"""Run the CLI on a hostile file in a subprocess and measure its exit code, wall time and peak memory."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass

from tests.conftest import REPO

# A hang guard, not a speed test (timings are measured in benchmarks/, never asserted tightly): the
# documented bound is 10 s on a quiet machine (SECURITY.md); a loaded CI machine gets 6x the room. What the
# unbounded reader did was hang or take minutes, which this still catches.
MAX_SECONDS = 60.0
MAX_RSS_MIB = 512.0

# The peak is the child's own VmHWM: ru_maxrss survives fork and exec on Linux, so a child of a large
# pytest process would report the parent's peak; a new address space starts its high-water mark afresh.
_CODE = (
    "import resource, sys\n"
    "from bnaudit.cli import main\n"
    "code = 0\n"
    "try:\n    main(sys.argv[1:])\nexcept SystemExit as exc:\n    code = exc.code\n"
    "try:\n"
    "    hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]\n"
    "    peak = int(hwm.split()[1]) / 1024\n"
    "except (OSError, IndexError):\n"
    "    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024\n"
    "print('peak-rss-mib', peak, file=sys.stderr)\n"
    "sys.exit(code)\n"
)


@dataclass(frozen=True)
class Bounded:
    """What the CLI did with a hostile file."""

    returncode: int
    stderr: str
    seconds: float
    peak_rss_mib: float

    def assert_bounded(self) -> None:
        assert "Traceback" not in self.stderr, self.stderr
        assert self.seconds < MAX_SECONDS, self.seconds
        assert self.peak_rss_mib < MAX_RSS_MIB, self.peak_rss_mib


def run_bounded(*args: str) -> Bounded:
    """``bnaudit ARGS`` in a fresh interpreter, killed at twice the time bound (so a hang fails, not stalls)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", _CODE, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=2 * MAX_SECONDS,
    )
    seconds = time.monotonic() - start
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("peak-rss-mib "), result.stderr
    stderr = "\n".join(lines[:-1])
    return Bounded(result.returncode, stderr, seconds, float(lines[-1].split()[1]))
