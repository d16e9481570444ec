"""InstanceNorm layers are recalibrated by torch's own definition of their running statistics.

torch's InstanceNorm updates ``running_mean`` / ``running_var`` with the mean over the batch's instances of
each instance's mean and unbiased variance, not with the statistics of all the values; the recalibrated
statistics must be the mean of those over every instance of the data.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import bnaudit


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.InstanceNorm2d(4, track_running_stats=True, affine=True),
        nn.ReLU(),
        nn.Conv2d(4, 5, 3, stride=2),
        nn.InstanceNorm2d(5, track_running_stats=True),
    )


def _batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(4, 3, 12, 12, generator=generator) * 2 + 1 for _ in range(3)]


def _reference(model: nn.Module, batches: list[torch.Tensor]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per InstanceNorm layer, in float64: the mean over all instances of their means and unbiased variances."""
    seen: dict[int, list[torch.Tensor]] = {}
    hooks = [
        m.register_forward_pre_hook(lambda m, a, i=i: seen.setdefault(i, []).append(a[0].detach().double()))
        for i, m in enumerate(model)
        if isinstance(m, nn.InstanceNorm2d)
    ]
    model.train()  # instance statistics in the forward, as during training and recalibration
    with torch.no_grad():
        for x in batches:
            model(x)
    for h in hooks:
        h.remove()
    out = {}
    for i, inputs in seen.items():
        x = torch.cat(inputs)  # instances along dim 0
        flat = x.flatten(2)
        out[i] = (flat.mean(2).mean(0).numpy(), flat.var(2, unbiased=True).mean(0).numpy())
    return out


def test_instancenorm_statistics_are_the_mean_over_instances():
    model, batches = _model(), _batches()
    expected = _reference(copy.deepcopy(model), batches)
    result = bnaudit.recalibrate(model, batches)
    for i, (mean, var) in expected.items():
        layer = model[i]
        np.testing.assert_allclose(layer.running_mean.double().numpy(), mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(layer.running_var.double().numpy(), var, rtol=1e-5)
        # Not the variance of all values pooled: that one also counts the spread between instances.
        assert not np.allclose(result.layer(str(i)).population_var, var, rtol=1e-3)


def test_it_matches_what_torch_itself_accumulates():
    """torch's own update with momentum 1 holds one batch's statistics; with equal batches the data's are
    their mean (InstanceNorm ignores momentum=None, so there is no cumulative mode to ask for)."""
    model, batches = _model(), _batches()
    own = copy.deepcopy(model)
    norms = [m for m in own if isinstance(m, nn.InstanceNorm2d)]
    for m in norms:
        m.momentum = 1.0
    own.train()
    per_batch: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
    with torch.no_grad():
        for x in batches:
            own(x)
            per_batch.append([(m.running_mean.clone(), m.running_var.clone()) for m in norms])
    bnaudit.recalibrate(model, batches)
    ours = [m for m in model if isinstance(m, nn.InstanceNorm2d)]
    for k, layer in enumerate(ours):
        mean = torch.stack([b[k][0] for b in per_batch]).mean(0)
        var = torch.stack([b[k][1] for b in per_batch]).mean(0)
        torch.testing.assert_close(layer.running_mean, mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.running_var, var, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["population", "batch-mean"])
def test_both_methods_give_torchs_definition(method):
    model, batches = _model(), _batches()
    expected = _reference(copy.deepcopy(model), batches)
    bnaudit.recalibrate(model, batches, bnaudit.RecalibrationOptions(method=method))
    for i, (_, var) in expected.items():
        np.testing.assert_allclose(model[i].running_var.double().numpy(), var, rtol=1e-5)
