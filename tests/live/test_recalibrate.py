"""The recalibration estimator against an independent float64 reference computed with the test's own hooks."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from bnaudit.errors import InputError, NoBatchNormError, UsageError
from bnaudit.live.options import RecalibrationOptions
from bnaudit.live.recalibrate import recalibrate
from bnaudit.live.results import RecalibrationResult
from tests.recal_helpers.models import make_batches, make_convnet, make_uneven

Forward = Callable[[nn.Module, Any], Any]


def reference(
    model: nn.Module, batches: Iterable[Any], run: Forward | None = None
) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Per BN layer: (population mean, unbiased var, mean of per-call means, mean of per-call unbiased vars).

    Captures every BN input with plain hooks, lets the layers normalise with batch statistics (train mode,
    momentum untouched on a deep copy), other modules in eval mode, and reduces in float64 with NumPy.
    """
    model = __import__("copy").deepcopy(model)
    model.eval()
    captured: dict[str, list[np.ndarray]] = {}
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()

            def hook(mod: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
                x = args[0].detach().double().numpy()
                flat = np.moveaxis(x, 1, 0).reshape(x.shape[1], -1)  # (C, elements)
                captured.setdefault(name, []).append(flat)

            handles.append(m.register_forward_pre_hook(hook))
    with torch.no_grad():
        for batch in batches:
            if run is None:
                model(batch)
            else:
                run(model, batch)
    out = {}
    for name, calls in captured.items():
        allx = np.concatenate(calls, axis=1)
        out[name] = (
            allx.mean(axis=1),
            allx.var(axis=1, ddof=1),
            np.mean([c.mean(axis=1) for c in calls], axis=0),
            np.mean([c.var(axis=1, ddof=1) for c in calls], axis=0),
        )
    return out


def assert_close(
    result: RecalibrationResult, ref: dict[str, Any], method: str = "population", rel: float = 1e-6
) -> None:
    assert {layer.name for layer in result.layers if layer.reached} == set(ref)
    for layer in result.layers:
        if not layer.reached:
            continue
        pm, pv, bm, bv = ref[layer.name]
        mean, var = (pm, pv) if method == "population" else (bm, bv)
        std = np.sqrt(pv)
        assert np.all(np.abs(layer.after_mean - mean) <= rel * std + 1e-12), layer.name
        assert np.all(np.abs(layer.after_var - var) <= rel * var + 1e-12), layer.name


def assert_written(model: nn.Module, result: RecalibrationResult) -> None:
    modules = dict(model.named_modules())
    for layer in result.layers:
        bn = modules[layer.name]
        np.testing.assert_allclose(bn.running_mean.double().numpy(), layer.after_mean, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(bn.running_var.double().numpy(), layer.after_var, rtol=1e-6, atol=1e-7)


def test_convnet_bn2d_and_bn1d_nc_with_dropout_and_momentum_none() -> None:
    model, batches = make_convnet(), make_batches()
    ref = reference(model, batches)
    nbt = model.bn1.num_batches_tracked.clone()
    result = recalibrate(model, batches)
    assert_close(result, ref)
    assert_written(model, result)
    assert result.batches == 10 and result.samples == 80
    assert model.bn2.momentum is None and model.training and model.drop.training  # flags restored
    assert torch.equal(model.bn1.num_batches_tracked, nbt)
    assert result.layer("bn1").samples == 80 * 36 and result.layer("bn3").samples == 80


def test_uneven_batches() -> None:
    model, batches = make_convnet(), make_uneven()
    result = recalibrate(model, batches, RecalibrationOptions(write=False))
    assert_close(result, reference(model, batches))


@pytest.mark.parametrize("method", ["population", "batch-mean"])
def test_bn1d_ncl_and_bn3d(method: str) -> None:
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv1d(2, 3, 3), nn.BatchNorm1d(3), nn.Unflatten(2, (7, 1, 1)), nn.BatchNorm3d(3)
    )
    batches = [torch.randn(n, 2, 9) * 3 - 2 for n in (4, 7, 1)]
    result = recalibrate(model, batches, RecalibrationOptions(method=method))
    assert_close(result, reference(model, batches), method)
    assert result.layer("1").samples == 12 * 7


def test_batch_mean_differs_from_population() -> None:
    model, batches = make_convnet(), make_uneven()
    ref = reference(model, batches)
    result = recalibrate(model, batches, RecalibrationOptions(method="batch-mean"))
    assert_close(result, ref, "batch-mean")
    layer = result.layer("bn1")
    assert layer.population_var is not None
    assert not np.allclose(layer.population_var, layer.after_var)


def test_large_mean_to_std_ratio_stays_exact() -> None:
    bn = nn.BatchNorm1d(2)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(300, 2, generator=g) * torch.tensor([1e-3, 1.0]) + 50 for _ in range(3)]
    model = nn.Sequential(bn)
    assert_close(recalibrate(model, batches), reference(model, batches))


def test_batchnorm_kernel_path_exact_on_a_million_values_per_channel() -> None:
    """The CPU fast path takes the statistics from BatchNorm's own kernel: it must stay float64-exact on long
    reductions (a float32-accumulating kernel would be off by far more than 1e-6 std here), and a channel whose
    mean dwarfs its spread (x100 std) must still fall back to float64."""
    from bnaudit.live.kernel_rows import kernel_is_exact

    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([1.0, 0.01, 3.0]).view(1, 3, 1, 1)
    shift = torch.tensor([5.0, 1.0, -7.0]).view(1, 3, 1, 1)
    batches = [torch.randn(64, 3, 128, 128, generator=g) * scale + shift for _ in range(2)]
    model = nn.Sequential(nn.BatchNorm2d(3))
    assert kernel_is_exact(batches[0], model[0].weight, model[0].bias)
    assert not kernel_is_exact(
        batches[0].contiguous(memory_format=torch.channels_last), model[0].weight, model[0].bias
    )
    assert_close(recalibrate(model, batches), reference(model, batches))


def test_dict_batches_with_input_key_and_device() -> None:
    model = make_convnet()
    batches = [{"image": b, "label": torch.zeros(len(b))} for b in make_batches(4)]
    result = recalibrate(model, batches, RecalibrationOptions(input_key="image", device="cpu"))
    assert_close(result, reference(model, [b["image"] for b in batches]))


def test_tuple_batches_input_index_and_forward_fn() -> None:
    model = make_convnet()
    tuples = [(torch.zeros(1), b) for b in make_batches(3)]
    assert_close(
        recalibrate(model, tuples, RecalibrationOptions(input_index=1)),
        reference(model, [t[1] for t in tuples]),
    )

    def fwd(m: nn.Module, batch: Any) -> Any:
        return m(batch["x"] * 2)

    dicts = [{"x": b} for b in make_batches(3)]
    assert_close(recalibrate(model, dicts, RecalibrationOptions(forward=fwd)), reference(model, dicts, fwd))


class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 3, 1)
        self.unused = nn.BatchNorm2d(3)
        self.tail = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(x)
        y = self.bn(self.conv(y) * 3 + 1)  # the same layer, called twice per forward
        return self.tail(y)


def test_shared_layer_called_twice_and_unreached_layer() -> None:
    torch.manual_seed(0)
    model = Shared()
    model.unused.running_mean.fill_(0.25)
    before = model.unused.running_var.clone()
    batches = make_batches(4)
    result = recalibrate(model, batches)
    assert_close(result, reference(model, batches))
    assert result.layer("bn").calls == 8
    unreached = result.unreached()
    assert [layer.name for layer in unreached] == ["unused"]
    assert torch.all(model.unused.running_mean == 0.25) and torch.equal(model.unused.running_var, before)
    assert unreached[0].metrics()["max_kl"] is None


@pytest.mark.parametrize("stop", [True, False])
def test_stop_after_last_bn_same_result_and_skips_the_tail(stop: bool) -> None:
    model, batches = make_convnet(), make_batches(5)
    seen: list[int] = []
    handle = model.fc.register_forward_pre_hook(lambda m, a: seen.append(1))
    try:
        result = recalibrate(model, batches, RecalibrationOptions(stop_after_last_bn=stop))
    finally:
        handle.remove()
    assert_close(result, reference(model, batches))
    # The first batch runs whole (to learn the order); later ones stop at the last BatchNorm.
    assert len(seen) == (1 if stop else 5)


class Explodes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(2, momentum=0.3)
        self.drop = nn.Dropout()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == 3:
            raise RuntimeError("shape mismatch\nsecond line")
        return self.drop(self.bn(x))


def test_failure_in_a_batch_restores_state() -> None:
    model = Explodes()
    model.train()
    model.bn.running_mean.fill_(0.5)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InputError, match=r"^batch 2: raised RuntimeError: shape mismatch second line$"):
        recalibrate(model, [torch.randn(4, 2) for _ in range(5)])
    assert model.training and model.drop.training and model.bn.momentum == 0.3
    assert "forward" not in vars(model.bn)
    assert not model.bn._forward_pre_hooks
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k]), k


def test_loader_failure_is_named() -> None:
    def gen() -> Iterable[torch.Tensor]:
        yield torch.randn(3, 2)
        raise OSError("disk gone")

    with pytest.raises(InputError, match="loading batch 1: raised OSError: disk gone"):
        recalibrate(nn.BatchNorm1d(2), gen())


def test_limits_and_progress() -> None:
    model, batches = make_convnet(), make_batches(10)
    calls: list[tuple[int, int | None]] = []
    result = recalibrate(
        model, batches, RecalibrationOptions(max_batches=3), progress=lambda d, t: calls.append((d, t))
    )
    assert result.batches == 3 and calls == [(1, 3), (2, 3), (3, 3)]
    assert_close(result, reference(model, batches[:3]))
    result = recalibrate(
        model, batches, RecalibrationOptions(max_samples=20)
    )  # whole batches of 8 until >= 20
    assert result.batches == 3 and result.samples == 24


def test_errors() -> None:
    with pytest.raises(NoBatchNormError):
        recalibrate(nn.Linear(2, 2), [torch.randn(2, 2)])
    with pytest.raises(InputError, match="no batches"):
        recalibrate(nn.BatchNorm1d(2), [])
    with pytest.raises(UsageError, match="--method"):
        recalibrate(nn.BatchNorm1d(2), [torch.randn(2, 2)], RecalibrationOptions(method="mean"))
    with pytest.raises(UsageError, match="--input-key"):
        recalibrate(nn.BatchNorm1d(2), [{"a": torch.randn(2, 2)}])
    with pytest.raises(UsageError) as info:
        recalibrate(nn.BatchNorm1d(2), [{"a": torch.randn(2, 2)}], RecalibrationOptions(input_key="b"))
    assert info.value.fields.where == "--input-key 'b'"
    assert info.value.fields.problem == "is not in the batch (keys: a)"


def test_instance_norm_with_running_stats_and_metrics() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.InstanceNorm1d(3, track_running_stats=True))
    batches = [torch.randn(4, 3, 10) + 2 for _ in range(3)]
    result = recalibrate(model, batches)
    # torch's definition: the mean over instances of each instance's mean and unbiased variance.
    instances = torch.cat(batches).double()  # 12 instances x 3 channels x 10 positions
    mean, var = instances.mean(2).mean(0).numpy(), instances.var(2).mean(0).numpy()
    np.testing.assert_allclose(result.layers[0].after_mean, mean, rtol=0, atol=1e-6)
    np.testing.assert_allclose(result.layers[0].after_var, var, rtol=1e-6)
    metrics = result.layers[0].metrics()
    assert metrics["max_kl"] is not None and metrics["max_kl"] > 0.5
    assert metrics["max_shift"] == pytest.approx(float(np.max(np.abs(mean) / np.sqrt(var + 1e-5))))


def test_sync_batchnorm_runs_on_cpu_single_process() -> None:
    model = nn.SyncBatchNorm.convert_sync_batchnorm(make_convnet())
    batches = make_batches(3)
    result = recalibrate(model, batches)
    assert_close(result, reference(make_convnet(), batches))
