"""``channels_last`` and ``amp`` on the recalibration pass: same statistics (within a stated tolerance), state put back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from bnaudit.errors import UsageError
from bnaudit.live.accumulate import moments
from bnaudit.live.batches import to_channels_last
from bnaudit.live.options import RecalibrationOptions
from bnaudit.live.recalibrate import recalibrate
from bnaudit.live.results import RecalibrationResult
from tests.conftest import FIXTURES, run_cli
from tests.live.test_recalibrate import reference
from tests.recal_helpers.models import make_batches, make_convnet

# bfloat16 keeps 8 significant bits (relative rounding 2**-9 ~ 0.2%) and float16 11 bits; the layer inputs
# computed under autocast carry that rounding, which is what moves the statistics (the moments themselves
# are taken from the widened values). Measured on the test model: bf16 <= 3.4e-3, fp16 <= 4.8e-4.
AMP_TOLERANCE = {"bfloat16": 2e-2, "float16": 5e-3}
# channels_last changes only the order of float32 operations in the convolutions.
FLOAT_TOLERANCE = 1e-5


def max_errors(result: RecalibrationResult, ref: dict[str, tuple[np.ndarray, ...]]) -> tuple[float, float]:
    """Largest |mean - ref mean| / ref std and |var - ref var| / ref var over every layer and channel."""
    mean_err = var_err = 0.0
    for layer in result.layers:
        ref_mean, ref_var = ref[layer.name][0], ref[layer.name][1]
        mean_err = max(mean_err, float(np.max(np.abs(layer.after_mean - ref_mean) / np.sqrt(ref_var))))
        var_err = max(var_err, float(np.max(np.abs(layer.after_var - ref_var) / ref_var)))
    return mean_err, var_err


def state_of(model: nn.Module) -> dict[str, tuple[torch.Tensor, tuple[int, ...], torch.dtype]]:
    """Every parameter and buffer: a copy of its values, its strides and its dtype."""
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    return {k: (t.detach().clone(), t.stride(), t.dtype) for k, t in tensors.items()}


def test_channels_last_equals_default_within_float_tolerance() -> None:
    model, batches = make_convnet(8), make_batches(6, 16)
    ref = reference(model, batches)
    default = recalibrate(model, batches, RecalibrationOptions(write=False))
    fast = recalibrate(model, batches, RecalibrationOptions(write=False, channels_last=True))
    for a, b in zip(default.layers, fast.layers, strict=True):
        std = np.sqrt(a.after_var)
        assert np.all(np.abs(a.after_mean - b.after_mean) <= FLOAT_TOLERANCE * std), a.name
        assert np.all(np.abs(a.after_var - b.after_var) <= FLOAT_TOLERANCE * a.after_var), a.name
    assert max(max_errors(fast, ref)) <= FLOAT_TOLERANCE


def test_channels_last_restores_memory_format_and_values() -> None:
    model, batches = make_convnet(8), make_batches(3, 4)
    before = state_of(model)
    result = recalibrate(model, batches, RecalibrationOptions(channels_last=True, write=False))
    after = state_of(model)
    assert result.layers[0].reached
    for key, (values, stride, dtype) in before.items():
        assert after[key][1] == stride, key  # contiguous again: the same strides as before
        assert after[key][2] == dtype
        assert torch.equal(after[key][0], values), key
    assert model.conv1.weight.is_contiguous()


def test_channels_last_keeps_a_model_already_channels_last_and_handles_5d() -> None:
    model = make_convnet(8).to(memory_format=torch.channels_last)
    recalibrate(model, make_batches(2, 4), RecalibrationOptions(channels_last=True))
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert not model.conv1.weight.is_contiguous()

    torch.manual_seed(0)
    net3d = nn.Sequential(nn.Conv3d(2, 3, 3, padding=1), nn.BatchNorm3d(3))
    batches = [torch.randn(4, 2, 3, 5, 5) for _ in range(3)]
    result = recalibrate(net3d, batches, RecalibrationOptions(channels_last=True, write=False))
    plain = recalibrate(net3d, batches, RecalibrationOptions(write=False))
    np.testing.assert_allclose(result.layers[0].after_mean, plain.layers[0].after_mean, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(result.layers[0].after_var, plain.layers[0].after_var, rtol=1e-5)
    assert net3d[0].weight.is_contiguous()


def test_to_channels_last_converts_nested_4d_tensors_only() -> None:
    batch = {"image": torch.randn(2, 3, 4, 5), "label": torch.arange(2), "pair": (torch.randn(2, 3, 4, 5), 7)}
    out = to_channels_last(batch)
    assert out["image"].is_contiguous(memory_format=torch.channels_last)
    assert not out["image"].is_contiguous()
    assert out["label"] is batch["label"] and out["pair"][1] == 7
    assert out["pair"][0].is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out["image"], batch["image"])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_amp_within_documented_tolerance_and_state_restored(dtype: str) -> None:
    model, batches = make_convnet(8), make_batches(6, 16)
    ref = reference(model, batches)
    before = state_of(model)
    training = {name: m.training for name, m in model.named_modules()}
    result = recalibrate(model, batches, RecalibrationOptions(write=False, amp=True, amp_dtype=dtype))
    mean_err, var_err = max_errors(result, ref)
    assert mean_err <= AMP_TOLERANCE[dtype] and var_err <= AMP_TOLERANCE[dtype], (mean_err, var_err)
    assert mean_err > 0  # the pass really ran in low precision
    assert not torch.is_autocast_enabled("cpu")
    for key, (values, stride, dt) in state_of(model).items():
        assert dt == before[key][2] and stride == before[key][1] and torch.equal(values, before[key][0]), key
    assert {name: m.training for name, m in model.named_modules()} == training


def test_amp_takes_exact_moments_of_the_low_precision_inputs() -> None:
    """The first layer's input (conv1 under autocast) is the same in the pass and here: exact to 1e-6."""
    model, batches = make_convnet(8), make_batches(4, 8)
    result = recalibrate(model, batches, RecalibrationOptions(write=False, amp=True))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        inputs = [model.conv1(x) for x in batches]
    assert inputs[0].dtype == torch.bfloat16
    flat = torch.cat([x.double().permute(1, 0, 2, 3).reshape(x.shape[1], -1) for x in inputs], dim=1)
    ref_mean, ref_var = flat.mean(1).numpy(), flat.var(1).numpy()
    bn1 = result.layer("bn1")
    assert np.all(np.abs(bn1.after_mean - ref_mean) <= 1e-6 * np.sqrt(ref_var))
    assert np.all(np.abs(bn1.after_var - ref_var) <= 1e-6 * ref_var)


def test_moments_of_half_inputs_are_widened_exactly() -> None:
    x = (torch.randn(64, 5, 6, 6) * 3 + 100).to(torch.bfloat16)  # mean >> std: the float64 path too
    for tensor in (x, x.to(torch.float16)):
        var, mean = moments(tensor, [0, 2, 3])
        exact_var, exact_mean = torch.var_mean(tensor.double(), dim=[0, 2, 3], correction=0)
        torch.testing.assert_close(mean.double(), exact_mean, rtol=1e-7, atol=0)
        torch.testing.assert_close(var.double(), exact_var, rtol=1e-6, atol=0)


def test_amp_option_errors() -> None:
    model, batches = make_convnet(), make_batches(2)
    with pytest.raises(UsageError, match="needs --amp"):
        recalibrate(model, batches, RecalibrationOptions(amp_dtype="float16"))
    with pytest.raises(UsageError, match="bfloat16 or float16"):
        recalibrate(model, batches, RecalibrationOptions(amp=True, amp_dtype="float64"))
    with pytest.raises(UsageError, match="bfloat16 or float16"):
        recalibrate(model, batches, RecalibrationOptions(amp=True, amp_dtype=torch.float32))


def _stats(path: Path) -> dict[str, torch.Tensor]:
    sd = torch.load(path, weights_only=True)["model"]
    return {k: v for k, v in sd.items() if k.endswith(("running_mean", "running_var"))}


def test_cli_channels_last_and_amp(tmp_path: Path) -> None:
    folder = tmp_path
    ckpt = FIXTURES / "ddp_nosync_sorted" / "ckpt_rank0.pt"
    common = ["--model", "fixtures/digits.py:build_model", "--data", "fixtures/digits.py:calibration_data"]
    outs = {}
    for name, extra in (
        ("plain", []),
        ("cl", ["--channels-last"]),
        ("amp", ["--amp", "--amp-dtype", "bfloat16"]),
    ):
        outs[name] = folder / f"{name}.pt"
        done = run_cli("recalibrate", str(ckpt), *common, *extra, "-o", str(outs[name]), "--format", "json")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["command"] == "recalibrate"
    plain, cl, amp = (_stats(outs[k]) for k in ("plain", "cl", "amp"))
    for key, value in plain.items():
        # Means relative to the channel's std, variances relative to themselves.
        scale = value.abs() if key.endswith("running_var") else plain[key.replace("mean", "var")].sqrt()
        assert torch.all((cl[key] - value).abs() <= FLOAT_TOLERANCE * scale), key
        assert torch.all((amp[key] - value).abs() <= AMP_TOLERANCE["bfloat16"] * scale), key
    bad = run_cli("recalibrate", str(ckpt), *common, "--amp-dtype", "float16", "--dry-run")
    assert bad.returncode == 2 and "needs --amp" in bad.stderr and "Traceback" not in bad.stderr
