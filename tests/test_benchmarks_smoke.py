"""Every benchmark script runs end to end in its ``--smoke`` mode."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.slow
@pytest.mark.parametrize(
    ("script", "expected"),
    [
        ("bench_recalibrate.py", "ratio bnaudit / update_bn: median"),
        ("bench_average.py", "ratio average / torch.load+save: median"),
        ("bench_distributed.py", "ratio --nproc 2, 1 thread each / 1 process x 2 threads: median"),
        ("bench_compare.py", "ratio compare / torch.load full: median"),
        ("bench_ranks.py", "16 average"),
        ("bench_remote.py", "ratio compare over HTTP / download"),
        ("bench_s3_copy.py", "s3 copy: done"),
        ("bench_before_after.py", "per-round ratio average after / before: median"),
        ("bench_scanners.py", "## Scanners on the red-team corpus"),
        ("bench_architectures.py", "ratio bnaudit / update_bn: see the columns"),
        ("study_batch_size.py", "study smoke: ok"),
        ("bench_pass.py", "pass ratios: done"),
        ("exactness_timm.py", "exactness: done"),
    ],
)
def test_benchmark_smoke(script: str, expected: str) -> None:
    done = subprocess.run(
        # bench_before_after compares two source trees: here the repository with itself.
        [
            sys.executable,
            str(REPO / "benchmarks" / script),
            "--smoke",
            *(["--before", str(REPO)] if script == "bench_before_after.py" else []),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert expected in done.stdout, done.stdout
    if script == "bench_distributed.py":
        assert "volume independent of data: True" in done.stdout, done.stdout
