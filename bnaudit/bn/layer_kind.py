"""What a BatchNorm layer normalises: one value per sample and channel (flat) or a feature map (spatial).

The kind sets how noisy a rank's running statistics are. A BatchNorm1d after a Linear layer averages one
value per sample per channel; a BatchNorm2d after a convolution averages H x W values per sample, so the
same batches leave its statistics many times less noisy, and independent ranks on the same data disagree
far less (``compare``'s thresholds are scaled by the kind, README "Thresholds"). State dicts do not store
module classes, so the kind is read from the layer that feeds the BatchNorm: the weight tensor nearest to
it (same module first, then order in the file) whose output dimension is the layer's channel count; a
convolution weight has three or more dimensions, a linear weight two.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from enum import Enum

from bnaudit.bn.layers import BnLayer, normalize_key
from bnaudit.checkpoint.types import TensorRef


class InputKind(str, Enum):
    """``spatial`` (BatchNorm2d/3d, or 1d over N x C x L), ``flat`` (BatchNorm1d over N x C), ``unknown``."""

    SPATIAL = "spatial"
    FLAT = "flat"
    UNKNOWN = "unknown"


def _module(key: str) -> list[str]:
    return normalize_key(key).split(".")[:-1]


def _shared_depth(a: list[str], b: list[str]) -> int:
    depth = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        depth += 1
    return depth


def _feeds(shape: tuple[int, ...], channels: int) -> bool:
    # Conv / Linear weights are (out, in, ...); transposed convolutions are (in, out, ...).
    return len(shape) >= 2 and (shape[0] == channels or (len(shape) >= 3 and shape[1] == channels))


def input_kinds(tensors: Mapping[str, TensorRef], layers: Sequence[BnLayer]) -> dict[str, InputKind]:
    """Each layer's input kind, by layer name (see the module docstring).

    Args:
        tensors: the state dict's tensors, in the file's order.
        layers: its BatchNorm layers.
    """
    keys = list(tensors)
    position = {k: i for i, k in enumerate(keys)}
    owned = {k for layer in layers for k in layer.all_keys()}
    weights = [(i, k) for i, k in enumerate(keys) if k not in owned and k.endswith("weight")]
    kinds: dict[str, InputKind] = {}
    for layer in layers:
        channels = tensors[layer.running_mean].shape[0] if tensors[layer.running_mean].shape else 0
        here, home = position[layer.running_mean], _module(layer.running_mean)
        fitting = [(i, k) for i, k in weights if _feeds(tensors[k].shape, channels)]
        if not fitting:
            kinds[layer.name] = InputKind.UNKNOWN
            continue
        # Same module first, then a weight before the layer (forward order), then the nearest one.
        _, key = max(
            fitting, key=lambda ik: (_shared_depth(_module(ik[1]), home), ik[0] < here, -abs(ik[0] - here))
        )
        kinds[layer.name] = InputKind.SPATIAL if len(tensors[key].shape) >= 3 else InputKind.FLAT
    return kinds
