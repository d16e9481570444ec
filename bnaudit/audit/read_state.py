"""The layers ``inspect`` read from one state dict, shared by its whole-checkpoint checks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bnaudit.bn.layers import BnLayer
from bnaudit.bn.layerstats import LayerStats
from bnaudit.checkpoint.types import StateDictRef


@dataclass(frozen=True)
class ReadStateDict:
    """One state dict's well-formed layers, as ``inspect`` read them."""

    sd: StateDictRef
    layers: tuple[tuple[BnLayer, LayerStats], ...]


def trained(stats: LayerStats) -> bool:
    """Whether the statistics moved away from their initial values (mean 0, var 1)."""
    return not (bool(np.all(stats.mean == 0)) and bool(np.all(stats.var == 1)))
