"""SyncBatchNorm's computation on CPU: torch's ``nn.SyncBatchNorm`` refuses CPU tensors (CUDA-only kernels).

In train mode every rank normalises with the statistics of the global batch (all ranks' samples) and updates
its running buffers with them, as ``nn.SyncBatchNorm`` does: per-channel count, sum and sum of squares are
all-reduced (differentiably, so the backward pass is synchronised too). The buffers therefore end identical on
every rank. State-dict keys are those of ``nn.BatchNorm2d/1d``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import Tensor, nn


class CpuSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the global batch of every rank (any input rank: N x C x ...)."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {input.dim()}D")

    def forward(self, input: Tensor) -> Tensor:
        if not (self.training and dist.is_initialized()):
            return super().forward(input)
        dims = [0, *range(2, input.dim())]
        count = torch.tensor(float(input.numel() // input.shape[1]), dtype=torch.float64)
        moments = torch.stack([input.sum(dims), (input * input).sum(dims)]).double()
        moments = dist_fn.all_reduce(moments)
        total = dist_fn.all_reduce(count.clone())
        mean = moments[0] / total
        var = moments[1] / total - mean * mean
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            m = self.momentum if self.momentum is not None else 0.1
            self.running_mean.mul_(1 - m).add_(m * mean.float())
            self.running_var.mul_(1 - m).add_(m * (var * total / (total - 1)).float())
        shape = [1, -1] + [1] * (input.dim() - 2)
        scale = torch.rsqrt(var.float() + self.eps).view(shape)
        out = (input - mean.float().view(shape)) * scale
        return out * self.weight.view(shape) + self.bias.view(shape)


def convert(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm layer of ``module`` by a :class:`CpuSyncBatchNorm` holding the same state."""
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            sync = CpuSyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine)
            sync.load_state_dict(child.state_dict())
            setattr(module, name, sync)
        else:
            convert(child)
    return module
