"""The gate's new options: --flat-factor (compare) and --noise-ratio (drift) take effect and refuse bad values."""

from __future__ import annotations

import json

import pytest

from bnaudit.audit.compare import compare_ranks
from bnaudit.audit.options import CompareOptions, DriftThresholds
from bnaudit.errors import UsageError
from tests.conftest import FIXTURES, run_cli

SORTED = str(FIXTURES / "ddp_nosync_sorted" / "ckpt_rank*.pt")
MODEL = ("--model", "fixtures/digits.py:build_model", "--data", "fixtures/digits.py:heldout_data")


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("compare", SORTED, "--flat-factor", "0.5"), "--flat-factor"),
        (("compare", SORTED, "--error-kl", "0"), "--error-kl"),
        (("compare", SORTED, "--warn-kl", "0.01", "--error-kl", "0.005"), "--warn-kl"),
        (("drift", "fixtures/ddp_sync/ckpt_rank0.pt", *MODEL, "--noise-ratio", "0.9"), "--noise-ratio"),
    ],
)
def test_bad_levels_are_usage_errors(args, words):
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr
    assert words in result.stderr and "Traceback" not in result.stderr


def test_the_library_checks_the_same():
    with pytest.raises(UsageError, match="--flat-factor"):
        compare_ranks(SORTED, CompareOptions(flat_factor=0.5))
    with pytest.raises(UsageError, match="--noise-ratio"):
        DriftThresholds(noise_ratio=0.5)


def test_the_flat_factor_moves_only_flat_layers():
    # fc_bn (flat) fails at the default factor; with a factor large enough only block3.bn (spatial) does.
    strict = json.loads(run_cli("compare", SORTED, "--format", "json").stdout)
    lenient = json.loads(run_cli("compare", SORTED, "--format", "json", "--flat-factor", "100").stdout)
    failing = {
        d: {r["name"] for r in doc["layers"] if r["severity"] == "error"}
        for d, doc in (("s", strict), ("l", lenient))
    }
    assert failing == {"s": {"fc_bn", "block3.bn"}, "l": {"block3.bn"}}
    fc = next(r for r in lenient["layers"] if r["name"] == "fc_bn")
    assert fc["metrics"]["threshold_scale"] == 100.0 and fc["metrics"]["gate_kl"] == pytest.approx(
        fc["metrics"]["mean_kl"] / 100
    )


def test_the_noise_ratio_decides_what_counts_as_real():
    # The sorted fixture's block1.bn is ~14x the noise: a warning at the default, nothing at 20x.
    default = json.loads(
        run_cli("drift", SORTED.replace("ckpt_rank*.pt", "ckpt_rank0.pt"), *MODEL, "--format", "json").stdout
    )
    strict = json.loads(
        run_cli(
            "drift",
            SORTED.replace("ckpt_rank*.pt", "ckpt_rank0.pt"),
            *MODEL,
            "--format",
            "json",
            "--noise-ratio",
            "20",
        ).stdout
    )
    severity = {
        d: {r["name"]: r["severity"] for r in doc["layers"]} for d, doc in (("d", default), ("s", strict))
    }
    assert severity["d"]["block1.bn"] == "warn" and severity["s"]["block1.bn"] == "ok"
    assert severity["s"]["fc_bn"] == "error"  # 36x the noise: real at 20x too
    assert strict["settings"]["noise_ratio"] == 20.0
