"""A user file named by path in spec tests (``tests/recal_helpers/userfile.py:make``)."""

from __future__ import annotations

from typing import Any

import torch

NOT_CALLABLE = 3


def make(channels: int = 2, scale: float = 1.0) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.BatchNorm1d(channels))


def not_a_module() -> Any:
    return "model"


class Factory:
    @staticmethod
    def build() -> torch.nn.Module:
        return torch.nn.BatchNorm2d(1)


def loader(batch_size: int = 2, rank: int | None = None, world_size: int | None = None) -> list[torch.Tensor]:
    data = [torch.full((batch_size, 2), float(i)) for i in range(6)]
    return data if rank is None or world_size is None else data[rank::world_size]
