"""``--mode sequential`` against its definition, computed naively here: one layer at a time, in float64.

Layer k's statistics are the mean and unbiased variance of its input over all batches when the model runs in
eval mode and every earlier layer (in forward order) already normalises with its own sequential statistics.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from benchmarks.archs import DirectBatchNorm2d, ResNet, build
from bnaudit.errors import InputError, UsageError
from bnaudit.live.options import RecalibrationOptions
from bnaudit.live.recalibrate import recalibrate
from bnaudit.live.results import RecalibrationResult
from tests.conftest import FIXTURES, run_cli
from tests.live.test_architectures import TORCH_BATCH_NORM, images, stale
from tests.recal_helpers.models import make_batches, make_convnet

Stats = dict[str, tuple[np.ndarray, np.ndarray]]
Run = Callable[[nn.Module, Any], Any]


def _forward_order(model: nn.Module, batch: Any, run: Run) -> list[str]:
    order: list[str] = []
    handles = [
        m.register_forward_pre_hook(lambda mod, args, name=name: order.append(name))
        for name, m in model.named_modules()
        if isinstance(m, _BatchNorm)
    ]
    with torch.no_grad():
        run(model, batch)
    for h in handles:
        h.remove()
    return list(dict.fromkeys(order))


def naive_sequential(model: nn.Module, batches: Iterable[Any], run: Run | None = None) -> Stats:
    """One full float64 eval-mode pass per layer, layers set one after the other in forward order."""
    run = run or (lambda m, b: m(b))
    model = copy.deepcopy(model).double().eval()
    batches = [_double(b) for b in batches]
    modules = dict(model.named_modules())
    out: Stats = {}
    for name in _forward_order(model, batches[0], run):
        seen: list[np.ndarray] = []

        def keep(mod: nn.Module, args: tuple[Any, ...], seen: list[np.ndarray] = seen) -> None:
            x = args[0].detach().numpy()
            seen.append(np.moveaxis(x, 1, 0).reshape(x.shape[1], -1))

        handle = modules[name].register_forward_pre_hook(keep)
        with torch.no_grad():
            for b in batches:
                run(model, b)
        handle.remove()
        values = np.concatenate(seen, axis=1)
        out[name] = (values.mean(axis=1), values.var(axis=1, ddof=1))
        modules[name].running_mean.copy_(torch.from_numpy(out[name][0]))
        modules[name].running_var.copy_(torch.from_numpy(out[name][1]))
    return out


def _double(batch: Any) -> Any:
    if isinstance(batch, dict):
        return {k: _double(v) for k, v in batch.items()}
    return batch.double() if isinstance(batch, torch.Tensor) else batch


def largest_error(result: RecalibrationResult, ref: Stats, use: str = "after") -> float:
    """max over layers and channels of |mean - ref| / ref std and |var - ref| / ref var."""
    worst = 0.0
    assert {layer.name for layer in result.layers} == set(ref)
    for layer in result.layers:
        mean, var = ref[layer.name]
        got_mean, got_var = (
            (layer.after_mean, layer.after_var)
            if use == "after"
            else (layer.population_mean, layer.population_var)
        )
        assert got_mean is not None and got_var is not None
        worst = max(worst, float(np.max(np.abs(got_mean - mean) / np.sqrt(var))))
        worst = max(worst, float(np.max(np.abs(got_var - var) / var)))
    return worst


@pytest.mark.parametrize("resident", [256, 0])
@pytest.mark.parametrize("arch", ["resnet", "mobilenet", "plain"])
def test_sequential_equals_naive_float64_definition(arch: str, resident: int) -> None:
    model = stale(build(arch, width=8))
    batches = images(n=8, batch_size=2)
    ref = naive_sequential(model, batches)
    result = recalibrate(model, batches, RecalibrationOptions(mode="sequential", resident_batches=resident))
    assert result.mode == "sequential"
    # Lockstep: one pass. Refinement: pass p makes at least the first p layers exact.
    assert result.passes == 1 if resident else 2 < result.passes <= len(ref) + 1
    assert largest_error(result, ref) <= 1e-6
    # Population statistics (train-mode forward, batches of 2) are measurably not the definition.
    population = recalibrate(copy.deepcopy(model), batches, RecalibrationOptions(write=False))
    assert largest_error(population, ref) > 1e-3
    modules = dict(model.named_modules())
    for layer in result.layers:  # written
        np.testing.assert_allclose(
            modules[layer.name].running_var.double().numpy(), ref[layer.name][1], rtol=1e-6
        )
    assert nn.functional.batch_norm is TORCH_BATCH_NORM


@pytest.mark.parametrize("resident", [256, 0])
def test_sequential_with_dict_batches_forward_fn_and_full_forward(resident: int) -> None:
    model = stale(build("resnet", width=8))
    batches = [{"image": x, "label": 0} for x in images(n=6, batch_size=2)]

    def forward(m: nn.Module, batch: dict[str, Any]) -> Any:
        return m(batch["image"])

    ref = naive_sequential(model, batches, forward)
    options = RecalibrationOptions(
        mode="sequential", forward=forward, stop_after_last_bn=False, write=False, resident_batches=resident
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = recalibrate(model, batches, options)
    assert largest_error(result, ref) <= 1e-6
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_max_passes_bounds_the_passes_and_warns(caplog: pytest.LogCaptureFixture) -> None:
    model = stale(build("resnet", width=8))
    batches = images(n=4, batch_size=2)
    with caplog.at_level(logging.WARNING):
        result = recalibrate(
            model, batches, RecalibrationOptions(mode="sequential", max_passes=2, resident_batches=0)
        )
    assert result.passes == 2 and result.last_move is not None and result.last_move > 1e-7
    assert "stopped after 2 passes" in caplog.text
    first_only = RecalibrationOptions(mode="sequential", max_passes=1, resident_batches=0)
    one = recalibrate(stale(build("resnet", width=8)), batches, first_only)
    population = recalibrate(stale(build("resnet", width=8)), batches)
    for a, b in zip(one.layers, population.layers, strict=True):
        np.testing.assert_array_equal(a.after_var, b.after_var)


def test_sequential_option_errors() -> None:
    with pytest.raises(UsageError, match="population statistics only"):
        RecalibrationOptions(mode="sequential", method="batch-mean")
    with pytest.raises(UsageError, match="needs --mode sequential"):
        RecalibrationOptions(max_passes=3)
    with pytest.raises(UsageError, match="--max-passes"):
        RecalibrationOptions(mode="sequential", max_passes=0)
    with pytest.raises(UsageError, match="--mode"):
        RecalibrationOptions(mode="eval")
    with pytest.raises(UsageError, match="--resident-batches"):
        RecalibrationOptions(mode="sequential", resident_batches=-1)
    with pytest.raises(UsageError, match="one-shot iterator"):
        recalibrate(make_convnet(), iter(make_batches()), RecalibrationOptions(mode="sequential"))


def test_more_batches_than_resident_refines_pass_by_pass() -> None:
    model = stale(build("resnet", width=8))
    batches = images(n=6, batch_size=2)
    ref = naive_sequential(model, batches)
    result = recalibrate(model, batches, RecalibrationOptions(mode="sequential", resident_batches=5))
    assert result.passes > 2 and largest_error(result, ref) <= 1e-6


def test_layer_that_bypasses_the_tap_refines_pass_by_pass() -> None:
    torch.manual_seed(0)
    model = stale(ResNet(width=8, norm=DirectBatchNorm2d))
    batches = images(n=4, batch_size=2)
    ref = naive_sequential(model, batches)
    result = recalibrate(model, batches, RecalibrationOptions(mode="sequential"))
    assert result.passes > 2 and largest_error(result, ref) <= 1e-6


class Branchy(nn.Module):
    """Data-dependent control flow: a batch whose mean is positive skips the second BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.bn1, self.bn2 = nn.BatchNorm2d(3), nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(x)
        return x if float(x.mean()) > 0 else self.bn2(x)


def test_lockstep_refuses_data_dependent_flow_and_restores_state() -> None:
    model = Branchy()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 3, 5, 5, generator=g) + shift for shift in (0.0, 0.0, 5.0)]
    batches[0] -= batches[0].mean() + 1  # the first goes through both layers, the last (mean 5) does not
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InputError, match="different orders"):
        recalibrate(model, batches, RecalibrationOptions(mode="sequential", stop_after_last_bn=False))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert nn.functional.batch_norm is TORCH_BATCH_NORM and model.training


def test_lockstep_failing_batch_is_named_and_state_restored() -> None:
    model = stale(build("mobilenet", width=8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = [*images(n=2, batch_size=2), torch.randn(2, 5, 16, 16)]
    with pytest.raises(InputError, match="batch 2"):
        recalibrate(model, bad, RecalibrationOptions(mode="sequential"))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert nn.functional.batch_norm is TORCH_BATCH_NORM


def test_cli_mode_sequential_writes_eval_consistent_statistics(tmp_path: Path) -> None:
    ckpt = FIXTURES / "ddp_nosync_sorted" / "ckpt_rank0.pt"
    common = ["--model", "fixtures/digits.py:build_model", "--data", "fixtures/digits.py:calibration_data",
              "--data-arg", "batch_size=4", "--max-batches", "6"]  # fmt: skip
    outs = {mode: tmp_path / f"{mode}.pt" for mode in ("population", "sequential")}
    for mode, out in outs.items():
        done = run_cli("recalibrate", str(ckpt), *common, "--mode", mode, "-o", str(out), "--format", "json")
        assert done.returncode == 0, done.stderr
    record = json.loads(Path(f"{outs['sequential']}.bnaudit.json").read_text())
    assert record["pass_options"]["mode"] == "sequential" and record["pass_options"]["passes"] == 1
    seq = torch.load(outs["sequential"], weights_only=True)["model"]
    pop = torch.load(outs["population"], weights_only=True)["model"]
    keys = [k for k in seq if k.endswith("running_var")]
    assert keys and any(not torch.allclose(seq[k], pop[k], rtol=1e-3) for k in keys[1:])
    first = keys[0]  # the first layer sees the raw input in both modes
    torch.testing.assert_close(seq[first], pop[first], rtol=1e-6, atol=0)
    bad = run_cli("recalibrate", str(ckpt), *common, "--max-passes", "2", "--dry-run")
    assert bad.returncode == 2 and "needs --mode sequential" in bad.stderr and "Traceback" not in bad.stderr
    bad = run_cli(
        "recalibrate", str(ckpt), *common, "--mode", "sequential", "--method", "batch-mean", "--dry-run"
    )
    assert bad.returncode == 2 and "population statistics only" in bad.stderr
