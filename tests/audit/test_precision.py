"""Deploy precision: statistics and folded scale/shift that do not survive fp16 / bf16 (inspect)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from bnaudit.audit.inspect import InspectOptions, inspect_checkpoint
from bnaudit.bn.deploy_dtype import DeployDtype
from bnaudit.bn.precision import cast
from bnaudit.report.model import FindingKind, Severity
from tests.conftest import REPORT_SCHEMA, call_main

REPO = Path(__file__).resolve().parents[2]
FEATURES = 6
LOUD = 2  # the input feature whose activations are large


def _model() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(FEATURES, FEATURES), torch.nn.BatchNorm1d(FEATURES))


def _large_activation_run(tmp_path: Path) -> tuple[Path, torch.nn.Sequential, torch.Tensor, np.ndarray]:
    """A real train-mode pass over data whose feature LOUD has activations in the thousands (var > 65504).

    momentum=None makes running_var the cumulative average of the batches' unbiased variances: one batch,
    so the expected value is that batch's variance, computed here in float64 from the Linear's output.
    """
    model = _model()
    model[1].momentum = None
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(256, FEATURES, generator=gen)
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].weight.fill_diagonal_(1.0)
        model[0].weight[LOUD, LOUD] = 30000.0
        model.train()
        model(x)
        activations = model[0](x).double().numpy()
    expected_var = activations.var(axis=0, ddof=1)
    path = tmp_path / "loud.pt"
    torch.save({"model": model.state_dict()}, path)
    return path, model, x, expected_var


def test_fp16_deployment_of_large_activations_overflows(tmp_path):
    path, model, x, expected_var = _large_activation_run(tmp_path)
    assert expected_var[LOUD] > 65504 and (np.delete(expected_var, LOUD) < 65504).all()
    # The real failure: the model cast to half gives inf/NaN where float32 gives finite output.
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()
        half = model.half()(x.half())
    assert torch.isinf(model[1].running_var[LOUD])
    loud = half[:, LOUD]
    # Samples whose activation overflows become NaN ((inf - mean) / inf); the rest are divided by inf and
    # collapse to the bias: the channel's output no longer depends on the input.
    assert torch.isnan(loud).any()
    assert (loud[~torch.isnan(loud)] == model[1].bias[LOUD]).all()
    assert torch.isfinite(half[:, [c for c in range(FEATURES) if c != LOUD]]).all()

    default = inspect_checkpoint(path)
    overflow = [f for f in default.findings if f.kind is FindingKind.PRECISION_OVERFLOW]
    assert [(f.severity, f.layer, f.channel) for f in overflow] == [(Severity.WARN, "1", LOUD)]
    # The stored float32 variance is torch's kernel's; the float64 value here agrees to float32 precision.
    shown = re.search(rf"running_var of channel {LOUD} = ([0-9.e+]+)", overflow[0].message)
    assert shown and float(shown.group(1)) == pytest.approx(expected_var[LOUD], rel=1e-5)
    assert "float16" in overflow[0].message and "--deploy-dtype" in overflow[0].message

    chosen = inspect_checkpoint(path, InspectOptions(deploy_dtype=DeployDtype.FP16))
    assert {f.severity for f in chosen.findings if f.kind is FindingKind.PRECISION_OVERFLOW} == {
        Severity.ERROR
    }
    assert chosen.settings["deploy_dtype"] == "fp16"
    # bf16 keeps float32's exponent range: the same model deploys in bf16.
    bf16 = inspect_checkpoint(path, InspectOptions(deploy_dtype="bf16"))
    assert not [f for f in bf16.findings if f.kind.value.startswith("precision")]


def test_underflow_of_a_quiet_channel_with_eps_zero(tmp_path):
    # A channel whose spread is 3e-5, deployed with eps 0 (torchvision's FrozenBatchNorm2d takes its eps
    # from the config; eps 0 is common): var 9e-10 is below fp16's smallest subnormal (6e-8) and flushes to
    # zero, so eval divides by zero. (Training needs eps > 0; the running statistics do not depend on it.)
    bn = torch.nn.BatchNorm1d(3, momentum=None)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(512, 3, generator=gen, dtype=torch.float64)
    x[:, 1] *= 3e-5
    bn.train()
    bn(x.float())
    expected = x.numpy().var(axis=0, ddof=1)
    assert np.float16(np.float32(expected[1])) == 0  # independent: numpy's own cast
    path = tmp_path / "quiet.pt"
    torch.save(bn.state_dict(), path)
    report = inspect_checkpoint(path, InspectOptions(eps=0.0))
    under = {f.message.split(" of channel")[0].split(": ")[1]: f for f in report.findings}
    assert under["running_var"].kind is FindingKind.PRECISION_UNDERFLOW
    assert under["running_var"].channel == 1 and under["running_var"].severity is Severity.WARN
    assert "becomes 0" in under["running_var"].message
    # With the default eps 1e-5, var + eps is in fp16's normal range: nothing to report for it.
    assert not [f for f in inspect_checkpoint(path).findings if "running_var + eps" in f.message]


@pytest.mark.parametrize("dtype,torch_dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_cast_equals_torch(dtype, torch_dtype):
    rng = np.random.default_rng(5)
    values = np.concatenate(
        [rng.normal(size=200) * 10.0 ** rng.integers(-45, 40, size=200), [65504.0, 65519.0, 65520.0, 0.0]]
    )
    f32 = torch.tensor(values, dtype=torch.float64).float()
    expected = f32.to(torch_dtype).double().numpy()
    np.testing.assert_array_equal(cast(values, DeployDtype(dtype)), expected)


NEW_KINDS = {"precision-overflow", "precision-underflow", "counter-anomaly", "stale-copy"}


def test_clean_fixtures_and_study_runs_get_no_new_finding():
    """The false-positive rate of the precision, counter and copy checks on every committed clean file: 0."""
    files = sorted(REPO.glob("fixtures/*/*_rank*.*")) + sorted(
        REPO.glob("benchmarks/results/gate_calibration/runs/*/*.pt")
    )
    assert len(files) >= 40
    for path in files:
        for dtype in (None, "fp16", "bf16", "fp32"):
            report = inspect_checkpoint(path, InspectOptions(deploy_dtype=dtype))
            assert not [f for f in report.findings if f.kind.value in NEW_KINDS], (path, dtype)


def test_cli_exit_codes_and_config(tmp_path, capsys, monkeypatch):
    path, *_ = _large_activation_run(tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".git").mkdir()
    assert call_main(capsys, "inspect", str(path))[0] == 0  # warnings only
    code, out, _ = call_main(capsys, "inspect", str(path), "--deploy-dtype", "fp16", "--format", "json")
    assert code == 1
    doc = json.loads(out)
    assert {f["kind"] for f in doc["findings"]} >= {"precision-overflow"}
    assert set(REPORT_SCHEMA["properties"]["findings"]["items"]["properties"]["kind"]["enum"]) >= {
        "precision-overflow",
        "precision-underflow",
    }
    code, _, err = call_main(capsys, "inspect", str(path), "--deploy-dtype", "fp8")
    assert code == 2 and "fp8" in err
    (tmp_path / "pyproject.toml").write_text('[tool.bnaudit]\ndeploy-dtype = "fp16"\n')
    assert call_main(capsys, "inspect", str(path))[0] == 1
    (tmp_path / "pyproject.toml").write_text('[tool.bnaudit]\ndeploy-dtype = "int8"\n')
    code, _, err = call_main(capsys, "inspect", str(path))
    assert code == 2 and "deploy-dtype" in err


def test_bf16_overflow_near_float32_max(tmp_path):
    bn = torch.nn.BatchNorm1d(2)
    bn.running_var[1] = 3.3999e38  # a float32 that bfloat16 rounds up to inf
    assert torch.isinf(bn.running_var.to(torch.bfloat16)[1]) and torch.isfinite(bn.running_var[1])
    path = tmp_path / "big.pt"
    torch.save(bn.state_dict(), path)
    bf16 = inspect_checkpoint(path, InspectOptions(deploy_dtype="bf16"))
    (finding,) = [f for f in bf16.findings if f.kind is FindingKind.PRECISION_OVERFLOW]
    assert (finding.severity, finding.channel) == (Severity.ERROR, 1) and "bfloat16" in finding.message
    fp32 = inspect_checkpoint(path, InspectOptions(deploy_dtype="fp32"))
    assert not [f for f in fp32.findings if f.kind is FindingKind.PRECISION_OVERFLOW]
