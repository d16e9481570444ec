"""Small models and loaders used by the recalibration tests (importable as specs and by spawned workers)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class ConvNet(nn.Module):
    """conv -> BN2d -> ReLU -> dropout -> conv -> BN2d -> pool -> BN1d on (N, C) -> linear."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.drop = nn.Dropout(0.5)
        self.conv2 = nn.Conv2d(channels, 6, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(6, momentum=None)
        self.bn3 = nn.BatchNorm1d(6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(torch.relu(self.bn1(self.conv1(x))))
        x = self.bn2(self.conv2(x))
        x = self.bn3(x.mean(dim=(2, 3)))
        return self.fc(x)


def make_convnet(channels: int = 4, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return ConvNet(channels)


def make_batches(n: int = 10, batch_size: int = 8, seed: int = 1, rank: int | None = None,
                 world_size: int | None = None) -> list[torch.Tensor]:  # fmt: skip
    """Deterministic image batches; with rank/world_size, only that rank's share (round robin)."""
    g = torch.Generator().manual_seed(seed)
    batches = [torch.randn(batch_size, 3, 6, 6, generator=g) * 2 + 1 for _ in range(n)]
    if rank is not None and world_size is not None:
        return batches[rank::world_size]
    return batches


def make_uneven(seed: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 3, 6, 6, generator=g) + 3 for size in (5, 8, 2, 7, 3)]


class FailingBatches:
    """Yields make_batches() but global batch ``bad`` has 5 channels, so the model's forward raises on it."""

    def __init__(self, bad: int) -> None:
        self.bad = bad

    def __len__(self) -> int:
        return 10

    def __iter__(self) -> Any:
        for i, b in enumerate(make_batches()):
            yield torch.zeros(8, 5, 6, 6) if i == self.bad else b
