"""Distributed recalibration with real torchrun processes on CPU (gloo), and the helpers it builds on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bnaudit.errors import BnauditError, InternalError, UsageError
from bnaudit.live.distributed import shard_batches, shard_length
from bnaudit.live.launch import launch_local
from tests.recal_helpers import dist_worker, launch_entries

ROOT = Path(__file__).resolve().parents[2]


def _torchrun(mode: str, out: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "tests.recal_helpers.dist_worker", mode, str(out)]  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_shard_plain_iterable_and_lengths() -> None:
    seq = list(range(5))
    assert list(shard_batches(seq, 0, 2)) == [0, 2, 4]
    assert list(shard_batches(seq, 1, 2)) == [1, 3]
    assert list(shard_batches(seq, 1, 2, max_batches=3)) == [1]
    assert [shard_length(5, r, 2) for r in (0, 1)] == [3, 2]
    assert shard_length(1, 1, 2) == 0


def test_shard_dataloader_rebuilds_batch_sampler() -> None:
    data = torch.arange(20.0)
    loader = torch.utils.data.DataLoader(data, batch_size=3)
    batches = list(loader)
    shard = shard_batches(loader, 1, 3, max_batches=6)
    assert isinstance(shard, torch.utils.data.DataLoader) and len(shard) == 2
    got = list(shard)
    assert [b.tolist() for b in got] == [batches[1].tolist(), batches[4].tolist()]
    shuffled = torch.utils.data.DataLoader(data, batch_size=3, shuffle=True)
    with pytest.raises(UsageError, match="seeded generator"):
        shard_batches(shuffled, 0, 2)


@pytest.mark.slow
def test_torchrun_two_ranks_equals_single_process(tmp_path: Path) -> None:
    proc = _torchrun("ok", tmp_path / "res")
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = dist_worker.cases()
    for rank in (0, 1):
        dist = torch.load(tmp_path / f"res.rank{rank}", weights_only=False)
        for case, layers in single.items():
            assert dist[case]["_world"] == 2 and layers["_world"] == 1
            assert dist[case]["_batches"] == layers["_batches"], case
            assert dist[case]["_samples"] == layers["_samples"], case
            assert dist[case]["_passes"] == layers["_passes"], case
            # Sequential passes normalise with float32 buffers: a last-bit rounding of the merged float64
            # statistics (merged in another order) may flip one, and moves the next pass by ~1e-8.
            rtol = 1e-6 if case.startswith("sequential") else 1e-9
            for name, value in layers.items():
                if name.startswith("_"):
                    continue
                np.testing.assert_allclose(dist[case][name][0], value[0], rtol=rtol, atol=1e-12, err_msg=case)
                np.testing.assert_allclose(dist[case][name][1], value[1], rtol=rtol, err_msg=case)
                assert dist[case][name][2] == value[2]
    assert single["uneven"]["_batches"] == 5 and single["loader_max7"]["_batches"] == 7
    assert single["sequential"]["_passes"] == 1 and single["even"]["_passes"] == 1  # lockstep: one pass
    assert single["sequential_refine"]["_passes"] > 2


@pytest.mark.slow
def test_torchrun_failing_rank_stops_every_rank_with_the_same_error(tmp_path: Path) -> None:
    start = time.monotonic()
    proc = _torchrun("fail", tmp_path / "res")
    assert proc.returncode != 0
    # Both ranks write to one stderr: count the error lines by their prefix, not by newlines.
    lines = ["bnaudit: error:" + part.split("\n", 1)[0] for part in proc.stderr.split("bnaudit: error:")[1:]]
    assert len(lines) == 2 and lines[0] == lines[1], proc.stderr[-3000:]
    assert lines[0].startswith("bnaudit: error: rank 1 failed: batch 3: raised RuntimeError: Given groups=1")
    assert time.monotonic() - start < 60


@pytest.mark.slow
def test_launch_local_keeps_exit_code_and_line() -> None:
    with pytest.raises(BnauditError) as info:
        launch_local(2, dist_worker.failing_entry, (2,))
    assert info.value.exit_code == 2
    assert str(info.value).startswith("rank 0 failed: batch 2: raised RuntimeError: Given groups=1")
    assert launch_local(2, dist_worker.ok_entry) == {0: 10, 1: 10}


LAUNCH_PROBE = """
import json, sys
from bnaudit.errors import BnauditError
from bnaudit.live.launch import launch_local, start_method
from tests.recal_helpers import launch_entries
method = sys.argv[2] if len(sys.argv) > 2 else None
chosen = method or start_method()
try:
    results = launch_local(2, getattr(launch_entries, sys.argv[1]), method=method)
except BnauditError as exc:
    results = {"error": [exc.exit_code, str(exc)]}
print(json.dumps({"results": results, "torch": "torch" in sys.modules, "method": chosen}))
"""


def _probe(entry: str, method: str | None) -> dict[str, object]:
    """Run the launcher in a fresh process that has not imported torch (where it forks by default)."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["PYTHONPATH"] = str(ROOT)
    argv = [sys.executable, "-c", LAUNCH_PROBE, entry, *([method] if method else [])]
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


@pytest.mark.slow
@pytest.mark.parametrize("method", [None, "spawn"])
def test_launcher_forms_a_group_without_importing_torch(method: str | None) -> None:
    report = _probe("all_reduce_rank", method)
    # Both ranks joined one group (1 + 2 = 3), each with one thread; the launcher never imported torch.
    # Without torch and threads, on Linux, it forks by default.
    expected_method = method or ("fork" if sys.platform == "linux" else "spawn")
    assert report == {"results": {"0": [0, 3.0, "1"], "1": [1, 3.0, "1"]}, "torch": False,
                      "method": expected_method}  # fmt: skip


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="the launcher forks only on Linux")
def test_forked_launcher_reports_errors_and_silent_deaths() -> None:
    assert _probe("rank1_fails_rank0_hangs_briefly", None)["results"] == {
        "error": [2, "rank 1 gave up on purpose"]
    }
    assert _probe("rank1_dies", None)["results"] == {
        "error": [3, "worker rank 1: died (exit code 7) without reporting an error"]
    }


def test_launcher_spawns_once_torch_is_loaded() -> None:
    from bnaudit.live.launch import start_method

    # This test process has imported torch: its threads and OpenMP state would not survive a fork.
    assert "torch" in sys.modules and start_method() == "spawn"


@pytest.mark.slow
def test_launcher_stops_a_hanging_rank_after_another_failed(monkeypatch: pytest.MonkeyPatch) -> None:
    from bnaudit.live import launch

    monkeypatch.setattr(launch, "FAILURE_GRACE_S", 1.0)
    start = time.monotonic()
    with pytest.raises(BnauditError) as info:
        launch_local(2, launch_entries.rank1_fails_rank0_hangs)
    assert str(info.value) == "rank 1 gave up on purpose" and info.value.exit_code == 2
    assert time.monotonic() - start < 30


@pytest.mark.slow
def test_launcher_reports_a_rank_that_died_silently() -> None:
    with pytest.raises(
        InternalError, match=r"worker rank 1: died \(exit code 7\) without reporting an error"
    ):
        launch_local(2, launch_entries.rank1_dies)
