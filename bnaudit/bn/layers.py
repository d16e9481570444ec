"""Find BatchNorm layers in a flat state dict without the model, and normalise key prefixes."""

from __future__ import annotations

import fnmatch
import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

# Wrappers that prefix every key of the wrapped model: DistributedDataParallel / DataParallel add
# ``module.``, torch.compile adds ``_orig_mod.``; they stack in any order.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")

STAT_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked", "weight", "bias")


def normalize_key(key: str) -> str:
    """Strip wrapper prefixes (``module.``, ``_orig_mod.``) from the front of ``key``, repeatedly.

    Args:
        key: an original state-dict key, e.g. ``module._orig_mod.layer1.0.bn1.running_mean``.

    Returns:
        The key without wrapper prefixes, e.g. ``layer1.0.bn1.running_mean``.
    """
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix) and len(key) > len(prefix):
                key = key[len(prefix) :]
                changed = True
    return key


@dataclass(frozen=True)
class BnLayer:
    """A BatchNorm-like layer found in a state dict: a prefix holding ``running_mean`` and ``running_var``.

    Attributes:
        running_mean, running_var: original keys of the statistics.
        num_batches_tracked, weight, bias: original keys, or None when absent (FrozenBatchNorm2d,
            ``affine=False``, ``track_running_stats`` buffers without a counter).
        name: the normalised prefix (``layer1.0.bn1``; ``""`` for a state dict of a lone BatchNorm), from
            ``running_mean``'s key.
    """

    running_mean: str
    running_var: str
    num_batches_tracked: str | None = None
    weight: str | None = None
    bias: str | None = None

    @functools.cached_property
    def name(self) -> str:
        """The normalised prefix of the layer's keys (computed once: layers are looked up by name)."""
        return _split(normalize_key(self.running_mean))[0]

    @property
    def display_name(self) -> str:
        return self.name or "<root>"

    def all_keys(self) -> tuple[str, ...]:
        """Every original key that belongs to this layer."""
        found = (self.running_mean, self.running_var, self.num_batches_tracked, self.weight, self.bias)
        return tuple(k for k in found if k is not None)


def _split(key: str) -> tuple[str, str]:
    prefix, _, leaf = key.rpartition(".")
    return prefix, leaf


def find_bn_layers(keys: Iterable[str] | Mapping[str, Any]) -> list[BnLayer]:
    """Find every BatchNorm-like layer in a state dict, in the order of its keys.

    A layer is any key prefix that holds both ``running_mean`` and ``running_var``; ``weight``, ``bias`` and
    ``num_batches_tracked`` under the same prefix are attached when present. This covers BatchNorm1d/2d/3d,
    SyncBatchNorm, FrozenBatchNorm2d, QAT ``.bn.`` submodules, Hugging Face ``normalization`` modules and
    InstanceNorm with tracked statistics, without needing the model.

    Args:
        keys: the state dict's original keys (or the state dict itself).

    Returns:
        The layers, named by their normalised prefix, in first-seen order.
    """
    by_prefix: dict[str, dict[str, str]] = {}
    for key in keys:
        prefix, leaf = _split(key)
        if leaf in STAT_SUFFIXES:
            by_prefix.setdefault(prefix, {})[leaf] = key
    layers = []
    for leaves in by_prefix.values():
        if "running_mean" in leaves and "running_var" in leaves:
            layers.append(
                BnLayer(
                    running_mean=leaves["running_mean"],
                    running_var=leaves["running_var"],
                    num_batches_tracked=leaves.get("num_batches_tracked"),
                    weight=leaves.get("weight"),
                    bias=leaves.get("bias"),
                )
            )
    return layers


def is_ignored(name: str, patterns: Iterable[str]) -> bool:
    """True when the layer ``name`` matches one of the ``--ignore`` glob patterns."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)
