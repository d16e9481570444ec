"""Exactness of ``bnaudit.recalibrate`` on real architectures: every layer against a float64 reference.

For each model (``benchmarks/archs.py`` names; ``timm:<name>`` builds a real timm model where timm is
installed, e.g. in a benchmark venv), random weights, synthetic images: the reference captures every
BatchNorm layer's input in one train-mode forward per batch (each earlier layer normalising with its
batch's statistics: population mode's definition) and computes, in float64, the mean and unbiased variance
of each channel over all batches. bnaudit's population statistics must be within 1e-6 of it (means relative
to the std, variances relative to the variance). Also counts the layers whose every call took BatchNorm's
kernel path (the fast one) rather than the ``var_mean`` one.

Usage:
    python benchmarks/exactness_timm.py                                 # the four models of archs.py
    /path/to/timm-venv/bin/python benchmarks/exactness_timm.py --arch timm:efficientnet_b0 \\
        --arch timm:mobilenetv3_large_100 --size 64
    python benchmarks/exactness_timm.py --smoke                         # one small model (CI)
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.archs import build
from bnaudit.live.accumulate import LayerAccumulator
from bnaudit.live.options import RecalibrationOptions
from bnaudit.live.recalibrate import recalibrate

TOLERANCE = 1e-6
_OFF_KERNEL: set[str] = set()  # layers that took the var_mean path for at least one call


def _count_off_kernel() -> None:
    """Note every layer whose statistics went through ``LayerAccumulator.add`` (not BatchNorm's kernel)."""
    real = LayerAccumulator.add

    def add(self: LayerAccumulator, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        _OFF_KERNEL.add(self.name)
        return real(self, x)

    LayerAccumulator.add = add  # type: ignore[method-assign]


def reference(model: nn.Module, batches: list[torch.Tensor]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per layer: float64 (mean, unbiased variance) of its inputs in train-mode forwards (population)."""
    model = copy.deepcopy(model).eval()
    seen: dict[str, list[np.ndarray]] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm):
            module.train()

            def keep(_m: nn.Module, args: tuple[torch.Tensor, ...], name: str = name) -> None:
                x = args[0].detach().double().transpose(0, 1).reshape(args[0].shape[1], -1)
                seen.setdefault(name, []).append(x.numpy())

            hooks.append(module.register_forward_pre_hook(keep))
    with torch.no_grad():
        for x in batches:
            model(x)
    for hook in hooks:
        hook.remove()
    out = {}
    for name, parts in seen.items():
        values = np.concatenate(parts, axis=1)
        out[name] = (values.mean(axis=1), values.var(axis=1, ddof=1))
    return out


def worst_errors(arch: str, size: int, batches: int, batch_size: int) -> tuple[float, float, int, int]:
    """(largest mean error in stds, largest relative variance error, layers, layers on the kernel path)."""
    model = build(arch, width=16)
    gen = torch.Generator().manual_seed(3)
    data = [torch.randn(batch_size, 3, size, size, generator=gen) * 1.5 + 0.3 for _ in range(batches)]
    expected = reference(model, data)
    _OFF_KERNEL.clear()
    result = recalibrate(copy.deepcopy(model), data, RecalibrationOptions(stop_after_last_bn=False))
    mean_err = var_err = 0.0
    for layer in result.layers:
        mean, var = expected[layer.name]
        std = np.sqrt(var)
        mean_err = max(mean_err, float(np.max(np.abs(layer.after_mean - mean) / std)))
        var_err = max(var_err, float(np.max(np.abs(layer.after_var - var) / var)))
    kernel = sum(layer.name not in _OFF_KERNEL for layer in result.layers)
    return mean_err, var_err, len(expected), kernel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", action="append", default=None, help="models (repeatable)")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    archs = args.arch or (["mobilenet"] if args.smoke else ["plain", "resnet", "mobilenet", "head"])
    print(f"{args.batches} batches of {args.batch_size} images of {args.size} px; tolerance {TOLERANCE:g}")
    heads = f"{'layers':>6} {'kernel path':>11} {'mean err (std)':>15} {'var err (rel)':>14}"
    print(f"{'model':<30} {heads}  verdict")
    _count_off_kernel()
    failed = []
    for arch in archs:
        mean_err, var_err, layers, kernel = worst_errors(arch, args.size, args.batches, args.batch_size)
        ok = mean_err <= TOLERANCE and var_err <= TOLERANCE
        failed += [] if ok else [arch]
        verdict = "exact" if ok else "NOT EXACT"
        print(f"{arch:<30} {layers:>6} {kernel:>11} {mean_err:>15.2e} {var_err:>14.2e}  {verdict}")
    if failed:
        raise SystemExit(f"not exact to {TOLERANCE:g}: {', '.join(failed)}")
    print("exactness: done")


if __name__ == "__main__":
    main()
