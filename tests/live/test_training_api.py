"""bnaudit.sync_bn_stats and bnaudit.save_rank_stats under a real torchrun (3 CPU processes, gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

import bnaudit
from tests.conftest import REPO, run_cli
from tests.training_helpers.worker import METHODS, build_model, rank_buffers, samples_of

WORLD = 3
LAYERS = ("bn", "fc_bn")


def expected(method: str, weights: list[float]) -> dict[str, np.ndarray]:
    """Independent float64 merge, written out from the formulas."""
    w = np.asarray(weights, dtype=np.float64)
    out = {}
    for layer in LAYERS:
        m = np.stack([rank_buffers(r)[f"{layer}.running_mean"].numpy() for r in range(WORLD)])
        v = np.stack([rank_buffers(r)[f"{layer}.running_var"].numpy() for r in range(WORLD)])
        mean = (w[:, None] * m).sum(0) / w.sum()
        if method == "pooled":
            var = (w[:, None] * (v + (m - mean) ** 2)).sum(0) / w.sum()
        else:
            var = (w[:, None] * v).sum(0) / w.sum()
        out[f"{layer}.running_mean"], out[f"{layer}.running_var"] = mean, var
    return out


@pytest.fixture(scope="module")
def torchrun_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("torchrun")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}"]
    result = subprocess.run(
        [*cmd, str(REPO / "tests" / "training_helpers" / "worker.py"), str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize(("method", "weighted"), METHODS)
def test_sync_bn_stats_matches_float64_reference(torchrun_out, method, weighted):
    weights = [float(samples_of(r)) if weighted else 1.0 for r in range(WORLD)]
    want = expected(method, weights)
    for rank in range(WORLD):
        got = torch.load(torchrun_out / f"synced_rank{rank}.pt")["results"][
            f"{method}-{'weighted' if weighted else 'equal'}"
        ]
        for key, value in want.items():
            # the buffers are float32: the float64 reduce is rounded once when copied back
            np.testing.assert_allclose(got[key].numpy(), value.astype(np.float32), rtol=1e-6, atol=1e-7)
            assert got[key].dtype == torch.float32
        for layer in LAYERS:  # untouched: each rank keeps its own counter
            assert int(got[f"{layer}.num_batches_tracked"]) == 10 + rank


@pytest.mark.slow
def test_save_rank_stats_files_and_metadata(torchrun_out):
    for rank in range(WORLD):
        path = torchrun_out / f"bn_stats_rank{rank}.safetensors"
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            assert set(f.keys()) == {
                f"{layer}.{leaf}"
                for layer in LAYERS
                for leaf in ("running_mean", "running_var", "num_batches_tracked")
            }
            np.testing.assert_array_equal(
                f.get_tensor("bn.running_mean").numpy(), rank_buffers(rank)["bn.running_mean"].float().numpy()
            )
        assert meta["bnaudit.rank"] == str(rank) and meta["bnaudit.world_size"] == str(WORLD)
        assert meta["bnaudit.samples"] == str(samples_of(rank))


@pytest.mark.slow
def test_rank_stats_files_feed_compare_and_average(torchrun_out, tmp_path):
    pattern = str(torchrun_out / "bn_stats_rank*.safetensors")
    compared = run_cli("compare", pattern, "--format", "json")
    assert compared.returncode == 1, compared.stderr  # the ranks were made to differ
    assert len(json.loads(compared.stdout)["inputs"]) == WORLD
    out = tmp_path / "fixed.pt"
    averaged = run_cli("average", pattern, "--reference", str(torchrun_out / "full_rank0.pt"), "-o", str(out))
    assert averaged.returncode == 0, averaged.stderr
    sidecar = json.loads((tmp_path / "fixed.pt.bnaudit.json").read_text())
    assert sidecar["weights"] == [float(samples_of(r)) for r in range(WORLD)]
    assert sidecar["weights_source"] == "metadata"
    fixed = torch.load(out, weights_only=True)
    assert fixed["epoch"] == 7
    for key, value in expected("pooled", sidecar["weights"]).items():
        np.testing.assert_allclose(fixed["model"][key].numpy(), value.astype(np.float32), rtol=1e-6)
    model = build_model()
    model.load_state_dict(fixed["model"])  # the repaired checkpoint loads into the model


def test_rank_stats_path_naming(tmp_path):
    from bnaudit.live.training import rank_stats_path

    assert rank_stats_path(tmp_path, 3) == tmp_path / "bn_stats_rank3.safetensors"
    assert rank_stats_path(tmp_path / "s_{rank}.safetensors", 2) == tmp_path / "s_2.safetensors"
    assert rank_stats_path(tmp_path / "stats.safetensors", 1) == tmp_path / "stats_rank1.safetensors"


def test_sync_without_process_group_is_a_usage_error():
    with pytest.raises(bnaudit.BnauditError, match="not initialised"):
        bnaudit.sync_bn_stats(build_model())


def test_save_rank_stats_single_process(tmp_path):
    model = build_model()
    path = bnaudit.save_rank_stats(model, tmp_path, samples=12)
    assert path == tmp_path / "bn_stats_rank0.safetensors"
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["bnaudit.samples"] == "12"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_save_rank_stats_creates_a_missing_folder_and_refuses_an_unwritable_one(tmp_path):
    model = build_model()
    path = bnaudit.save_rank_stats(model, f"{tmp_path}/run/ckpts/", rank=3)
    assert path == tmp_path / "run" / "ckpts" / "bn_stats_rank3.safetensors" and path.is_file()
    (tmp_path / "blocked").write_text("a file where a folder should be")
    with pytest.raises(bnaudit.BnauditError) as info:
        bnaudit.save_rank_stats(model, f"{tmp_path}/blocked/ckpts/")
    assert "blocked" in str(info.value)
