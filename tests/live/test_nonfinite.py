"""Repairs never write NaN / Inf statistics: batch-mean skips calls with one value per channel, and every
writer (recalibrate, the library's recalibrate(write=True), sync_bn_stats) refuses non-finite values."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from bnaudit.errors import NonFiniteStatisticsError
from bnaudit.live.estimators import LayerSums
from bnaudit.live.finite import check_finite
from bnaudit.live.options import RecalibrationOptions
from bnaudit.live.recalibrate import recalibrate
from tests.conftest import run_cli

# The last BatchNorm sees a 1x1 map: a batch of one image gives it one value per channel.
MODEL_FILE = """
import torch
from torch import nn


def model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Conv2d(4, 5, 1), nn.BatchNorm2d(5), nn.Flatten(), nn.Linear(5, 2),
    )
"""
IMAGES, BATCH = 9, 4  # batches of 4, 4 and 1


def build_model() -> nn.Module:
    namespace: dict = {}
    exec(MODEL_FILE, namespace)
    return namespace["model"]()


def images() -> torch.Tensor:
    return torch.randn(IMAGES, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 + 0.5


def reference_batch_mean(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
    """Independent float64 batch-mean statistics: each batch normalised by its own (biased) statistics, the
    per-call mean and unbiased variance averaged over the calls with more than one value per channel.

    Returns:
        layer name -> (mean, variance, calls skipped, population mean, population unbiased variance).
    """
    m = {name: module.double() for name, module in model.named_children()}
    calls: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"1": [], "5": []}
    skipped = {"1": 0, "5": 0}
    seen: dict[str, list[torch.Tensor]] = {"1": [], "5": []}

    def bn(name: str, y: torch.Tensor) -> torch.Tensor:
        values = y.transpose(0, 1).reshape(y.shape[1], -1)
        mean, biased = values.mean(1), values.var(1, unbiased=False)
        seen[name].append(values)
        if values.shape[1] > 1:
            calls[name].append((mean.numpy(), values.var(1, unbiased=True).numpy()))
        else:
            skipped[name] += 1
        shape = (1, -1, 1, 1)
        layer = m[name]
        return (y - mean.view(shape)) / torch.sqrt(biased.view(shape) + layer.eps) * layer.weight.view(
            shape
        ) + layer.bias.view(shape)

    with torch.no_grad():
        for start in range(0, IMAGES, BATCH):
            y = bn("1", m["0"](x[start : start + BATCH].double()))
            bn("5", m["4"](m["3"](m["2"](y))))
    out = {}
    for name, kept in calls.items():
        everything = torch.cat(seen[name], dim=1)
        out[name] = (
            np.mean([c[0] for c in kept], 0),
            np.mean([c[1] for c in kept], 0),
            skipped[name],
            everything.mean(1).numpy(),
            everything.var(1, unbiased=True).numpy(),
        )
    return out


@pytest.fixture
def files(tmp_path):
    (tmp_path / "m.py").write_text(MODEL_FILE)
    torch.save({"model": build_model().state_dict()}, tmp_path / "ckpt.pt")
    torch.save(images(), tmp_path / "images.pt")
    return tmp_path


def _recalibrate_cli(folder, *extra):
    args = ["recalibrate", "ckpt.pt", "--model", "m.py:model", "--batch-size", str(BATCH), "--format", "json"]
    return run_cli(*args, *extra, cwd=folder)


def test_batch_mean_skips_single_value_calls_and_writes_finite_statistics(files):
    result = _recalibrate_cli(files, "--data", "images.pt", "--method", "batch-mean", "-o", "out.pt")
    assert result.returncode == 0, result.stderr
    written = torch.load(files / "out.pt", weights_only=True)["model"]
    expected = reference_batch_mean(build_model(), images())
    for name, (mean, var, *_) in expected.items():
        got_mean = written[f"{name}.running_mean"].double().numpy()
        got_var = written[f"{name}.running_var"].double().numpy()
        np.testing.assert_allclose(got_mean, mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got_var, var, rtol=1e-4, atol=1e-7)
    assert expected["5"][2] == 1 and expected["1"][2] == 0  # the case the test is about happened
    notes = [f for f in json.loads(result.stdout)["findings"] if f["kind"] == "skipped-calls"]
    assert [(f["severity"], f["layer"]) for f in notes] == [("info", "5")]
    assert "1 of 3 call(s) had one value per channel" in notes[0]["message"]
    model = build_model()
    model.load_state_dict(written)
    with torch.no_grad():
        assert torch.isfinite(model.eval()(images())).all()


def test_population_keeps_the_single_value_calls(files):
    result = _recalibrate_cli(files, "--data", "images.pt", "-o", "out.pt")
    assert result.returncode == 0, result.stderr
    assert not [f for f in json.loads(result.stdout)["findings"] if f["kind"] == "skipped-calls"]
    written = torch.load(files / "out.pt", weights_only=True)["model"]
    for name, (*_, mean, var) in reference_batch_mean(build_model(), images()).items():
        np.testing.assert_allclose(
            written[f"{name}.running_mean"].double().numpy(), mean, rtol=1e-5, atol=1e-6
        )
        np.testing.assert_allclose(written[f"{name}.running_var"].double().numpy(), var, rtol=1e-4, atol=1e-7)


def test_nan_in_the_data_is_refused_naming_layer_and_channel(files):
    x = images()
    x[2, 1, 3, 3] = float("nan")
    torch.save(x, files / "nan.pt")
    result = _recalibrate_cli(files, "--data", "nan.pt", "-o", "out.pt")
    assert result.returncode == 1, result.stderr
    assert "refused: the new statistics are not finite; nothing was written" in result.stderr
    doc = json.loads(result.stdout)
    errors = [f for f in doc["findings"] if f["severity"] == "error"]
    assert [(f["kind"], f["layer"], f["channel"], f["state_dict"]) for f in errors] == [
        ("nonfinite", "1", 0, "model")
    ]
    assert "running_mean is NaN or Inf in 4 channel(s)" in errors[0]["message"]
    assert doc["verdict"] == "fail" and doc["refused"] is True
    assert sorted(p.name for p in files.iterdir()) == ["ckpt.pt", "images.pt", "m.py", "nan.pt"]


def test_library_recalibrate_refuses_and_leaves_the_buffers_unchanged():
    model = build_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # One image: the last layer has one value per channel in its only call, so batch-mean has nothing.
    with pytest.raises(NonFiniteStatisticsError) as exc:
        recalibrate(model, [images()[:1]], RecalibrationOptions(method="batch-mean"))
    assert (exc.value.layer, exc.value.channel) == ("5", 0)
    assert exc.value.fields.where == "layer '5'" and "running_mean[0] = nan" in str(exc.value)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    measured = recalibrate(model, [images()[:1]], RecalibrationOptions(method="batch-mean", write=False))
    assert measured.layer("5").single_calls == 1 and np.isnan(measured.layer("5").after_var).all()
    assert measured.layer("1").single_calls == 0 and np.isfinite(measured.layer("1").after_var).all()


def test_library_batch_mean_matches_the_reference_and_counts_skips():
    model = build_model()
    x = images()
    expected = reference_batch_mean(build_model(), x)
    result = recalibrate(model, list(x.split(BATCH)), RecalibrationOptions(method="batch-mean"))
    layer = result.layer("5")
    assert (layer.calls, layer.single_calls) == (3, 1) and layer.noise is not None
    np.testing.assert_allclose(layer.after_var, expected["5"][1], rtol=1e-4)
    np.testing.assert_allclose(model[5].running_var.double().numpy(), expected["5"][1], rtol=1e-4)


def test_layer_sums_keep_the_skipped_count_through_pack_and_merge():
    rng = np.random.default_rng(0)
    a, b = LayerSums.empty(3), LayerSums.empty(3)
    a.calls, a.single_calls, b.calls, b.single_calls = 4, 1, 2, 2
    a.sum_means = rng.normal(size=3)
    merged = LayerSums.unpack(a.pack(), 3).merge(LayerSums.unpack(b.pack(), 3))
    assert (merged.calls, merged.single_calls, merged.variance_calls) == (6, 3, 3)
    np.testing.assert_array_equal(merged.sum_means, a.sum_means)


def test_check_finite_refuses_values_beyond_the_dtype():
    check_finite("bn", "running_var", np.array([1.0, 65504.0]), dtype_max=65504.0)
    with pytest.raises(NonFiniteStatisticsError) as exc:
        check_finite("bn", "running_var", np.array([1.0, 7e4, 8e4]), dtype_max=65504.0)
    assert exc.value.channel == 1 and "too large for the buffer's dtype" in str(exc.value)
    assert "in 2 channel(s)" in str(exc.value)


def test_sync_bn_stats_refuses_nan_and_changes_nothing(tmp_path):
    from bnaudit.live.training import sync_bn_stats

    model = build_model()
    model[5].running_var[3] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with pytest.raises(NonFiniteStatisticsError) as exc:
            sync_bn_stats(model)
    finally:
        dist.destroy_process_group()
    assert (exc.value.layer, exc.value.channel) == ("5", 3) and "running_var" in str(exc.value)
    for key, value in model.state_dict().items():
        assert _same(value, before[key]), key


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(((a == b) | (a.isnan() & b.isnan())).all()) if a.is_floating_point() else torch.equal(a, b)
