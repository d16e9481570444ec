"""Recalibration of the architectures users run, against the float64 reference of tests/live/test_recalibrate.

Subclasses of ``_BatchNorm`` with their own forward (timm's ``BatchNormAct2d``) are measured at their
``batch_norm`` call; one that bypasses ``torch.nn.functional`` is still measured, by its hooks.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import bnaudit.live.accumulate as accumulate
from benchmarks.archs import DirectBatchNorm2d, ResNet, build
from bnaudit.errors import InputError
from bnaudit.live.options import RecalibrationOptions
from bnaudit.live.recalibrate import recalibrate
from tests.live.test_recalibrate import assert_close, assert_written, reference

TORCH_BATCH_NORM = nn.functional.batch_norm


def images(n: int = 4, batch_size: int = 8, size: int = 16, seed: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shift = torch.tensor([0.5, -1.0, 2.0]).view(1, 3, 1, 1)
    return [torch.randn(batch_size, 3, size, size, generator=g) * 1.5 + shift for _ in range(n)]


def stale(model: nn.Module) -> nn.Module:
    """Running statistics far from the data's, so that a layer left unmeasured would show."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.fill_(3.0)
            m.running_var.fill_(7.0)
    return model


def count_moments(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the calls of accumulate.moments: the separate pass over an input the kernel path avoids."""
    calls = [0]
    original = accumulate.moments

    def counted(x: torch.Tensor, dims: list[int]) -> Any:
        calls[0] += 1
        return original(x, dims)

    monkeypatch.setattr(accumulate, "moments", counted)
    return calls


@pytest.mark.parametrize("arch", ["plain", "resnet", "mobilenet", "head"])
@pytest.mark.parametrize("stop", [True, False])
def test_architecture_exact_to_float64_reference(arch: str, stop: bool) -> None:
    model = stale(build(arch, width=8))
    batches = images()
    ref = reference(model, batches)
    result = recalibrate(model, batches, RecalibrationOptions(stop_after_last_bn=stop))
    assert len(ref) == len(result.layers)
    assert_close(result, ref)
    assert_written(model, result)
    assert nn.functional.batch_norm is TORCH_BATCH_NORM


@pytest.mark.parametrize("kind", ["batchnorm-act", "sync-batchnorm"])
def test_subclasses_with_their_own_forward_take_the_kernel_path(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = count_moments(monkeypatch)
    torch.manual_seed(0)
    if kind == "batchnorm-act":
        model = stale(build("mobilenet", width=8))
    else:  # SyncBatchNorm's forward calls functional batch_norm itself outside a multi-rank group
        model = stale(nn.SyncBatchNorm.convert_sync_batchnorm(ResNet(width=8)))
    batches = images(n=2)
    ref = reference(model, batches)
    result = recalibrate(model, batches)
    assert all(layer.reached for layer in result.layers)
    assert_close(result, ref)
    # Only the (N, C, 1, 1)-shaped last layers would need moments; none here: every call took the kernel.
    assert calls[0] == 0


def test_subclass_calling_torch_batch_norm_directly_is_measured_by_its_fallback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = count_moments(monkeypatch)
    torch.manual_seed(0)
    model = stale(ResNet(width=8, norm=DirectBatchNorm2d))
    batches = images()
    ref = reference(model, batches)
    result = recalibrate(model, batches)
    assert_close(result, ref)
    assert calls[0] == len(result.layers) * len(batches)  # every call measured once, by the fallback


def test_tap_removed_and_state_restored_when_a_batch_raises() -> None:
    model = stale(build("mobilenet", width=8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    bad = [images(n=1)[0], torch.randn(2, 5, 16, 16)]
    with pytest.raises(InputError, match="batch 1"):
        recalibrate(model, bad)
    assert nn.functional.batch_norm is TORCH_BATCH_NORM
    assert model.training and all(m.training for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_measure_only_leaves_buffers_and_channels_last_model_format() -> None:
    model = stale(build("mobilenet", width=8)).to(memory_format=torch.channels_last)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [x.contiguous(memory_format=torch.channels_last) for x in images()]
    ref = reference(model, batches)
    result = recalibrate(model, batches, RecalibrationOptions(write=False))
    # 2e-6: the reference's own float32 channels-last forward (single-threaded AVX-512 kernels) drifts from
    # the measuring one by about 1e-6 of a standard deviation by the sixth block, before any statistic.
    assert_close(result, ref, rel=2e-6)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert model.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
