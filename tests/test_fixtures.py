"""Checks on the committed digits fixtures: data splits, loaders, model, per-rank DDP checkpoints."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
SCENARIOS = ("ddp_sync", "ddp_nosync_shuffled", "ddp_nosync_sorted")
WORLD_SIZE = 4
RANKS = range(WORLD_SIZE)


def _load_digits_module() -> ModuleType:
    """Import fixtures/digits.py by path, the way `fixtures/digits.py:fn` specs reach it."""
    spec = importlib.util.spec_from_file_location("bnaudit_fixture_digits", FIXTURES / "digits.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


digits = _load_digits_module()


def _checkpoint(scenario: str, rank: int) -> dict:
    return torch.load(FIXTURES / scenario / f"ckpt_rank{rank}.pt", weights_only=True)


def _bn_spread(scenario: str) -> float:
    """Largest per-channel spread of running_mean across ranks, in units of the rank-averaged running std.

    Computed here in float64 NumPy, independently of bnaudit: std over ranks (ddof=0) of running_mean divided
    by sqrt(mean over ranks of running_var), maximised over channels, then averaged over BN layers.
    """
    states = [_checkpoint(scenario, rank)["model"] for rank in RANKS]
    per_layer = []
    for key in states[0]:
        if not key.endswith("running_mean"):
            continue
        var_key = key.removesuffix("mean") + "var"
        means = np.stack([state[key].numpy().astype(np.float64) for state in states])
        variances = np.stack([state[var_key].numpy().astype(np.float64) for state in states])
        per_layer.append(float(np.max(means.std(axis=0) / np.sqrt(variances.mean(axis=0)))))
    assert len(per_layer) == 4, "expected 3 BatchNorm2d + 1 BatchNorm1d layers"
    return float(np.mean(per_layer))


# ------------------------------------------------------------------------------------------ model


def test_build_model_has_2d_and_1d_batchnorm_and_few_parameters() -> None:
    model = digits.build_model()
    kinds = [type(module) for module in model.modules()]
    assert kinds.count(nn.BatchNorm2d) == 3
    assert kinds.count(nn.BatchNorm1d) == 1
    assert nn.Dropout in kinds
    assert sum(p.numel() for p in model.parameters()) < 40_000
    assert model.eval()(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


# ------------------------------------------------------------------------------------------ data


def test_splits_are_disjoint_and_calibration_is_inside_train() -> None:
    with np.load(FIXTURES / "data" / "digits.npz") as data:
        train, calib, heldout = (set(data[f"{split}_index"].tolist()) for split in digits.SPLITS)
        images = data["train_x"]
        assert images.dtype == np.uint8 and images.shape == (1400, 8, 8) and int(images.max()) <= 16
    assert (len(train), len(calib), len(heldout)) == (1400, 1000, 397)
    assert calib <= train
    assert not train & heldout
    assert train | heldout == set(range(1797))


@pytest.mark.parametrize("name", ["train", "calib", "heldout"])
def test_load_split_returns_scaled_float_images_and_int_labels(name: str) -> None:
    x, y = digits.load_split(name)
    assert x.dtype == torch.float32 and x.shape[1:] == (1, 8, 8)
    assert y.dtype == torch.int64 and y.shape == (x.shape[0],)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert set(y.tolist()) == set(range(10))


def test_load_split_rejects_unknown_name() -> None:
    with pytest.raises(ValueError, match="unknown split"):
        digits.load_split("test")


def test_calibration_data_yields_the_calib_split_in_order() -> None:
    x, y = digits.load_split("calib")
    batches = list(digits.calibration_data(batch_size=64))
    assert all(isinstance(batch, (tuple, list)) and len(batch) == 2 for batch in batches)
    assert [len(b[0]) for b in batches] == [64] * 15 + [40]
    assert torch.equal(torch.cat([b[0] for b in batches]), x)
    assert torch.equal(torch.cat([b[1] for b in batches]), y)


def test_calibration_shards_are_whole_batches_of_the_single_process_loader() -> None:
    single = [b[0] for b in digits.calibration_data(64)]
    shards = [[b[0] for b in digits.calibration_data(64, rank, 3)] for rank in range(3)]
    assert [len(s) for s in shards] == [6, 5, 5]
    for rank, shard in enumerate(shards):
        for got, expected in zip(shard, single[rank::3], strict=True):
            assert torch.equal(got, expected)


@pytest.mark.parametrize(("rank", "world_size"), [(0, None), (None, 2), (2, 2), (-1, 2)])
def test_calibration_data_rejects_bad_rank_arguments(rank: int | None, world_size: int | None) -> None:
    with pytest.raises(ValueError):
        digits.calibration_data(rank=rank, world_size=world_size)


def test_heldout_data_yields_the_heldout_split() -> None:
    batches = list(digits.heldout_data())
    assert [len(b[0]) for b in batches] == [256, 141]
    assert torch.equal(torch.cat([b[1] for b in batches]), digits.load_split("heldout")[1])


def test_tensor_files_hold_the_calibration_inputs() -> None:
    x, _ = digits.load_split("calib")
    from_pt = torch.load(FIXTURES / "data" / "calib_inputs.pt", weights_only=True)
    from_npy = np.load(FIXTURES / "data" / "calib_inputs.npy")
    assert from_pt.dtype == torch.float32 and torch.equal(from_pt, x)
    assert from_npy.dtype == np.float32 and np.array_equal(from_npy, x.numpy())


@pytest.mark.parametrize("training", [True, False])
def test_evaluate_restores_mode_and_leaves_statistics_alone(training: bool) -> None:
    model = digits.build_model()
    model.load_state_dict(_checkpoint("ddp_sync", 0)["model"])
    model.train(training)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = digits.evaluate(model)
    assert set(result) == {"accuracy", "loss"}
    assert 0.0 <= result["accuracy"] <= 1.0 and np.isfinite(result["loss"])
    assert all(m.training is training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ------------------------------------------------------------------------------------------ checkpoints


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_each_scenario_has_one_file_pair_per_rank(scenario: str) -> None:
    folder = FIXTURES / scenario
    assert sorted(p.name for p in folder.glob("ckpt_rank*.pt")) == [f"ckpt_rank{r}.pt" for r in RANKS]
    assert sorted(p.name for p in folder.glob("model_rank*.safetensors")) == [
        f"model_rank{r}.safetensors" for r in RANKS
    ]
    assert (folder / "train_log.json").is_file()


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("rank", RANKS)
def test_checkpoint_loads_safely_into_build_model(scenario: str, rank: int) -> None:
    checkpoint = _checkpoint(scenario, rank)
    assert set(checkpoint) == {"model", "optimizer", "epoch", "args"}
    assert checkpoint["args"]["scenario"] == scenario and checkpoint["args"]["world_size"] == WORLD_SIZE
    digits.build_model().load_state_dict(checkpoint["model"], strict=True)
    tensors = load_file(FIXTURES / scenario / f"model_rank{rank}.safetensors")
    assert tensors.keys() == checkpoint["model"].keys()
    assert all(torch.equal(tensors[k], v) for k, v in checkpoint["model"].items())
    with safe_open(FIXTURES / scenario / f"model_rank{rank}.safetensors", framework="pt") as handle:
        assert handle.metadata() == {"rank": str(rank), "world_size": "4", "scenario": scenario}


def test_ranks_share_weights_within_a_scenario() -> None:
    # Gradients are all-reduced, so only BN buffers may differ between ranks; weights must be equal.
    for scenario in SCENARIOS:
        states = [_checkpoint(scenario, rank)["model"] for rank in RANKS]
        for key in states[0]:
            if "running_" not in key and "num_batches" not in key:
                assert all(torch.equal(states[0][key], s[key]) for s in states), (scenario, key)


def test_buffer_sync_shows_only_on_ranks_other_than_zero() -> None:
    # Train-mode BN normalises with batch statistics, so running buffers never feed back into training:
    # ddp_sync and ddp_nosync_shuffled share seeds and samplers and end with identical weights. Rank 0 only
    # ever sends buffers, so its whole state is identical too; ranks 1..3 differ only in BN buffers.
    for rank in RANKS:
        synced = _checkpoint("ddp_sync", rank)["model"]
        unsynced = _checkpoint("ddp_nosync_shuffled", rank)["model"]
        differing = {key for key in synced if not torch.equal(synced[key], unsynced[key])}
        if rank == 0:
            assert not differing
        else:
            assert differing and all(".running_" in key for key in differing)


def test_sorted_ranks_diverge_far_more_than_synced_ranks() -> None:
    sync, shuffled, sorted_ = (_bn_spread(s) for s in SCENARIOS)
    assert sync < 0.02
    assert sync < shuffled < sorted_
    assert sorted_ > 0.1 and sorted_ > 10 * sync


def test_sorted_rank0_statistics_cost_accuracy_and_logs_tell_the_truth() -> None:
    accuracy: dict[str, list[float]] = {}
    for scenario in SCENARIOS:
        log = json.loads((FIXTURES / scenario / "train_log.json").read_text())
        assert log["world_size"] == WORLD_SIZE
        accuracy[scenario] = []
        for rank in RANKS:
            model = digits.build_model()
            model.load_state_dict(_checkpoint(scenario, rank)["model"])
            measured = digits.evaluate(model)["accuracy"]
            assert measured == pytest.approx(log["heldout_by_rank"][rank]["accuracy"], abs=1e-9)
            accuracy[scenario].append(measured)
    assert min(accuracy["ddp_sync"]) > 0.95
    assert accuracy["ddp_nosync_sorted"][0] < accuracy["ddp_sync"][0] - 0.05


# ------------------------------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_make_fixtures_runs_end_to_end_under_torchrun(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    command = [
        sys.executable, str(FIXTURES / "make_fixtures.py"), "--out", str(tmp_path),
        "--scenarios", "ddp_nosync_sorted", "--nproc", "2", "--epochs", "1",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    folder = tmp_path / "ddp_nosync_sorted"
    expected = ["ckpt_rank0.pt", "ckpt_rank1.pt", "model_rank0.safetensors", "model_rank1.safetensors"]
    assert sorted(p.name for p in folder.iterdir()) == [*expected, "train_log.json"]
    log = json.loads((folder / "train_log.json").read_text())
    assert log["world_size"] == 2 and len(log["epochs"]) == 1 and len(log["heldout_by_rank"]) == 2
    assert (tmp_path / "data" / "digits.npz").read_bytes() == (FIXTURES / "data" / "digits.npz").read_bytes()
    for rank in range(2):
        checkpoint = torch.load(folder / f"ckpt_rank{rank}.pt", weights_only=True)
        assert checkpoint["args"]["world_size"] == 2 and checkpoint["epoch"] == 0
        digits.build_model().load_state_dict(checkpoint["model"])


@pytest.mark.slow
def test_regenerating_a_scenario_reproduces_it(tmp_path: Path) -> None:
    """fixtures/README.md's claim: the script rebuilds the committed files — bit for bit in every tensor on
    the torch and CPU kind that made them (float kernels differ between AVX2, AVX-512 and AMX, and 20 epochs
    of training amplify the last bits), and on any machine the same files, counters and the same story:
    rank 0's accuracy loss and compare's divergence verdict."""
    done = subprocess.run(
        [
            sys.executable,
            str(FIXTURES / "make_fixtures.py"),
            "--out",
            str(tmp_path),
            "--scenarios",
            "ddp_nosync_sorted",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    committed_log = json.loads((FIXTURES / "ddp_nosync_sorted" / "train_log.json").read_text())
    rebuilt_log = json.loads((tmp_path / "ddp_nosync_sorted" / "train_log.json").read_text())
    same_kind = committed_log.get("cpu_capability") == rebuilt_log["cpu_capability"]
    for rank in RANKS:
        committed = _checkpoint("ddp_nosync_sorted", rank)
        rebuilt = torch.load(tmp_path / "ddp_nosync_sorted" / f"ckpt_rank{rank}.pt", weights_only=True)
        assert _same(committed, rebuilt, exact=same_kind), rank
        st_a = load_file(str(FIXTURES / "ddp_nosync_sorted" / f"model_rank{rank}.safetensors"))
        st_b = load_file(str(tmp_path / "ddp_nosync_sorted" / f"model_rank{rank}.safetensors"))
        assert st_a.keys() == st_b.keys() and all(_same(st_a[k], st_b[k], exact=same_kind) for k in st_a)
    accuracy = [r["accuracy"] for r in rebuilt_log["heldout_by_rank"]]
    assert accuracy[0] < max(accuracy) - 0.03  # rank 0's label slice still costs it accuracy
    ranks = [str(tmp_path / "ddp_nosync_sorted" / f"ckpt_rank{r}.pt") for r in RANKS]
    verdict = subprocess.run(
        [sys.executable, "-m", "bnaudit", "compare", *ranks, "--format", "json"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert verdict.returncode == 1 and '"kind": "divergence"' in verdict.stdout, verdict.stderr


def _same(a: object, b: object, exact: bool = True) -> bool:
    """Equal to the bit (``exact``): tensors with torch.equal, containers element by element, the rest with
    ==. Not ``exact``: floating tensors need only the same dtype and shape, and finite values; integer
    tensors (counters) and every other value still compare exactly."""
    if isinstance(a, torch.Tensor):
        if not (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape):
            return False
        if not exact and a.is_floating_point():
            return bool(torch.isfinite(b).all())
        return torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k], exact) for k in a)
    if isinstance(a, list | tuple):
        return (
            isinstance(b, list | tuple)
            and len(a) == len(b)
            and all(_same(x, y, exact) for x, y in zip(a, b, strict=True))
        )
    if not exact and isinstance(a, float):
        return isinstance(b, float)  # optimizer state scalars and losses follow the float kernels too
    return a == b
