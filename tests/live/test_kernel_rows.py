"""The kernel's per-call statistics kept in a table and merged in blocks (live/kernel_rows.py), against the
float64 reference of test_recalibrate: tables that fill several times, the first-call rule, a layer whose
means drift to dwarf their spread mid-pass, and a module's own forward attribute kept across the pass."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

from bnaudit.live import kernel_rows
from bnaudit.live.options import RecalibrationOptions
from bnaudit.live.recalibrate import recalibrate
from tests.live.test_recalibrate import assert_close, reference


def shifted_batches(count: int, shifts: list[float], seed: int = 0) -> list[torch.Tensor]:
    """``count`` small 4-D batches of 2 channels, batch i shifted by shifts[i % len(shifts)] (varied means)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([1.0, 0.3]).view(1, 2, 1, 1)
    return [torch.randn(3, 2, 4, 4, generator=g) * scale + shifts[i % len(shifts)] for i in range(count)]


@pytest.mark.parametrize("method", ["population", "batch-mean"])
def test_tables_that_fill_several_times_merge_exactly(method: str) -> None:
    batches = shifted_batches(2 * kernel_rows.ROWS + 7, [0.0, 0.4, -0.3, 0.1])
    model = nn.Sequential(nn.BatchNorm2d(2))
    result = recalibrate(model, batches, RecalibrationOptions(method=method))
    assert_close(result, reference(model, batches), method=method)
    assert result.layer("0").calls == len(batches)


def test_first_call_with_means_above_the_ratio_keeps_float64(caplog: pytest.LogCaptureFixture) -> None:
    # |mean| / std = 500 from the first call: a float32 mean would be off by up to 3e-5 std.
    batches = shifted_batches(5, [150.0])
    model = nn.Sequential(nn.BatchNorm2d(2))
    with caplog.at_level(logging.WARNING):
        result = recalibrate(model, batches)
    assert_close(result, reference(model, batches))
    assert not caplog.records  # decided at the first call: nothing to warn about


def _rounding_bound(batches: list[torch.Tensor], first: int) -> np.ndarray:
    """In stds, per channel: what float32 rounding of the first ``first`` calls' means can move the merged
    mean by (half an ulp of each mean, weighted by its count), in float64."""
    xs = [np.moveaxis(b.double().numpy(), 1, 0).reshape(2, -1) for b in batches]
    allx = np.concatenate(xs, axis=1)
    head = sum(np.abs(x.mean(axis=1)) * x.shape[1] for x in xs[:first]) * 2.0**-24
    return head / allx.shape[1] / allx.std(axis=1)


def test_means_that_drift_mid_pass_are_reported_and_the_rest_is_float64(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The first call passes the rule (means near 0); from call 10 on, means of 400 std.
    shifts = [0.0] * 10 + [120.0] * (kernel_rows.ROWS + 20)
    batches = shifted_batches(len(shifts), [0.0])
    batches = [b + s for b, s in zip(batches, shifts, strict=True)]
    model = nn.Sequential(nn.BatchNorm2d(2))
    with caplog.at_level(logging.WARNING):
        result = recalibrate(model, batches)
    assert any("dwarf their spread" in r.getMessage() for r in caplog.records)
    pm, pv, _, _ = reference(model, batches)["0"]
    layer = result.layer("0")
    # Only the first table's calls went through the kernel: their rounding is all the error can be.
    allowed = _rounding_bound(batches, kernel_rows.ROWS) + 1e-9
    assert np.all(np.abs(layer.after_mean - pm) / np.sqrt(pv) <= allowed)
    assert np.allclose(layer.after_var, pv, rtol=1e-6)


class OwnForward(nn.BatchNorm2d):
    """A subclass with its own forward; instances may also carry a forward attribute of their own."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(
            nn.functional.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, True, 0.1, self.eps
            )
        )


def test_a_forward_attribute_of_the_instance_is_put_back() -> None:
    bn = OwnForward(2)
    original = bn.forward
    calls = [0]

    def own(x: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return original(x)

    bn.forward = own  # type: ignore[method-assign]
    model = nn.Sequential(bn)
    batches = shifted_batches(3, [0.2])
    ref = reference(model, batches)
    assert_close(recalibrate(model, batches), ref)
    assert calls[0] >= 3 and bn.forward is own  # the instance's forward ran inside the pass and is back
    plain = OwnForward(2)
    recalibrate(nn.Sequential(plain), batches)
    assert "forward" not in plain.__dict__
