"""The acceptance checks on the committed DDP fixtures, and the memory bound of the audit commands."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from collections import OrderedDict

import numpy as np
import pytest
import torch

from bnaudit.audit.compare import compare_ranks
from bnaudit.defaults import DEFAULT_ERROR_KL, DEFAULT_FLAT_FACTOR, DEFAULT_WARN_KL
from bnaudit.report.model import FailOn, FindingKind
from tests.conftest import FIXTURES, REPO, run_cli

MARGIN = 3.0


# What feeds each layer of fixtures/digits.py:build_model: fc_bn follows a Linear (flat), the rest convs.
FLAT_LAYERS = {"fc_bn"}


def _gate_float64(scenario: str) -> tuple[float, str, float]:
    """The gated value of the worst layer, its name and the worst channel KL there, in float64 with torch.

    Per layer and rank: the mean over channels of KL(pooled || rank), worst rank; flat layers divided by
    the flat factor (their levels are that much higher).
    """
    states = [
        torch.load(FIXTURES / scenario / f"ckpt_rank{r}.pt", weights_only=True)["model"] for r in range(4)
    ]
    worst, worst_layer, worst_channel_kl = -1.0, "", 0.0
    for key in states[0]:
        if not key.endswith("running_mean"):
            continue
        prefix = key[: -len("running_mean")]
        m = torch.stack([s[key].double() for s in states])
        v = torch.stack([s[prefix + "running_var"].double() for s in states])
        mean = m.mean(0)
        var = (v + (m - mean) ** 2).mean(0) + 1e-5
        vr = v + 1e-5
        kl = 0.5 * (var / vr - 1 - torch.log(var / vr) + (mean - m) ** 2 / vr)  # ranks x channels
        gate = float(kl.mean(1).max()) / (DEFAULT_FLAT_FACTOR if prefix[:-1] in FLAT_LAYERS else 1.0)
        if gate > worst:
            worst, worst_layer, worst_channel_kl = gate, prefix[:-1], float(kl.max())
    return worst, worst_layer, worst_channel_kl


def test_thresholds_have_the_documented_margins():
    sync, _, _ = _gate_float64("ddp_sync")
    shuffled, _, _ = _gate_float64("ddp_nosync_shuffled")
    sorted_, _, _ = _gate_float64("ddp_nosync_sorted")
    assert sync * MARGIN <= DEFAULT_WARN_KL  # the default DDP run passes without even a warning, 3x margin
    assert shuffled < DEFAULT_WARN_KL  # the shuffled unsynchronised run passes too
    assert sorted_ >= MARGIN * DEFAULT_ERROR_KL  # label-sorted shards fail with 3x margin


def test_sorted_fixture_fails_and_names_worst_layer_first():
    expected, expected_layer, channel_kl = _gate_float64("ddp_nosync_sorted")
    result = run_cli("compare", str(FIXTURES / "ddp_nosync_sorted" / "ckpt_rank*.pt"), "--format", "json")
    assert result.returncode == 1, result.stderr
    doc = json.loads(result.stdout)
    assert doc["layers"][0]["name"] == expected_layer
    assert doc["layers"][0]["metrics"]["gate_kl"] == pytest.approx(expected, rel=1e-9)
    assert doc["layers"][0]["metrics"]["max_kl"] == pytest.approx(channel_kl, rel=1e-9)
    assert {r["name"]: r["input"] for r in doc["layers"]} == {
        "block1.bn": "spatial",
        "block2.bn": "spatial",
        "block3.bn": "spatial",
        "fc_bn": "flat",
    }
    assert doc["findings"][0]["kind"] == "divergence" and doc["findings"][0]["layer"] == expected_layer
    table = run_cli("compare", str(FIXTURES / "ddp_nosync_sorted" / "ckpt_rank*.pt"))
    assert table.returncode == 1 and f"layer '{expected_layer}'" in table.stdout


@pytest.mark.parametrize("scenario", ["ddp_sync", "ddp_nosync_shuffled"])
def test_sync_and_shuffled_fixtures_pass(scenario):
    result = run_cli("compare", str(FIXTURES / scenario / "ckpt_rank*.pt"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PASS" in result.stdout


def test_safetensors_ranks_agree_with_torch_files():
    pt = compare_ranks([FIXTURES / "ddp_nosync_sorted" / f"ckpt_rank{r}.pt" for r in range(4)])
    st = compare_ranks([FIXTURES / "ddp_nosync_sorted" / f"model_rank{r}.safetensors" for r in range(4)])
    assert [(r.name, r.metrics["mean_kl"], r.input) for r in pt.layers] == [
        (r.name, r.metrics["mean_kl"], r.input) for r in st.layers
    ]
    assert pt.verdict(FailOn.ERROR) == st.verdict(FailOn.ERROR) == "fail"
    assert {f.kind for f in st.findings} == {FindingKind.DIVERGENCE}
    assert DEFAULT_WARN_KL < DEFAULT_ERROR_KL


def _peak_rss_mib(args: list[str]) -> float:
    code = (
        "import resource, sys\n"
        "from bnaudit.cli import main\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, file=sys.stderr)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env)
    return float(result.stderr.strip().splitlines()[-1])


def _big_checkpoint(path, filler_mib: int) -> None:
    sd = OrderedDict()
    for i in range(4):
        sd[f"conv{i}.weight"] = torch.zeros(filler_mib * 1024 * 1024 // 16)  # filler_mib/4 MiB each, fp32
        sd[f"bn{i}.running_mean"] = torch.zeros(16)
        sd[f"bn{i}.running_var"] = torch.ones(16) + i
    torch.save({"model": sd, "epoch": 1}, path)


def test_memory_does_not_grow_with_checkpoint_size(tmp_path):
    small, big = tmp_path / "small_rank0.pt", tmp_path / "big_rank0.pt"
    _big_checkpoint(small, 1)
    _big_checkpoint(big, 400)
    for name in ("small", "big"):
        (tmp_path / f"{name}_rank1.pt").write_bytes((tmp_path / f"{name}_rank0.pt").read_bytes())
    assert big.stat().st_size > 400 * 2**20
    for command in (["inspect", "{}_rank0.pt"], ["compare", "{}_rank0.pt", "{}_rank1.pt"]):
        rss = {
            name: _peak_rss_mib([command[0], *(str(tmp_path / a.format(name)) for a in command[1:])])
            for name in ("small", "big")
        }
        assert rss["big"] - rss["small"] < 20, (command[0], rss)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss > 0
    assert np.isfinite(rss["big"])
