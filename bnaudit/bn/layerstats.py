"""Read BatchNorm layers' tensors as float64 arrays (and the bytes of their statistics), and validate them."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bnaudit.bn.layers import BnLayer
from bnaudit.checkpoint.tensors import read_tensors
from bnaudit.checkpoint.types import StateDictRef, TensorRef
from bnaudit.errors import InputError


@dataclass(frozen=True)
class LayerStats:
    """A layer's tensors, read and widened to float64 (``num_batches_tracked`` as int)."""

    mean: np.ndarray
    var: np.ndarray
    weight: np.ndarray | None
    bias: np.ndarray | None
    num_batches_tracked: int | None

    @property
    def channels(self) -> int:
        return int(self.mean.shape[0])


def _ref(sd: StateDictRef, key: str | None) -> TensorRef | None:
    return None if key is None else sd.tensors.get(key)


def layer_problem(sd: StateDictRef, layer: BnLayer) -> str | None:
    """Why ``layer``'s tensors cannot be used as BatchNorm statistics, or None when they can.

    Checks that the statistics are floating, one-dimensional, and of one length with weight and bias.
    """
    mean, var = sd.tensors[layer.running_mean], sd.tensors[layer.running_var]
    for key, ref in ((layer.running_mean, mean), (layer.running_var, var)):
        if not ref.is_floating:
            return f"'{key}' has dtype {ref.dtype}, expected a floating dtype"
    if len(mean.shape) != 1:
        return f"'{layer.running_mean}' has shape {list(mean.shape)}, expected one value per channel"
    for other_key in (layer.running_var, layer.weight, layer.bias):
        other = _ref(sd, other_key)
        if other is not None and other.shape != mean.shape:
            mean_shape = list(mean.shape)
            return f"'{other_key}' has shape {list(other.shape)} but '{layer.running_mean}' has {mean_shape}"
    return None


def read_layer(sd: StateDictRef, layer: BnLayer, file: str) -> LayerStats:
    """Read a layer's tensors in float64.

    Raises:
        InputError: the layer's tensors are malformed (see :func:`layer_problem`).
    """
    return read_layers([(sd, layer)], file)[0]


_LAYER_TENSORS = 5  # running_mean, running_var, weight, bias, num_batches_tracked


def _layer_refs(layers: Sequence[tuple[StateDictRef, BnLayer]], file: str) -> list[TensorRef | None]:
    """Each layer's five tensors (running mean, running var, weight, bias, a one-value num_batches_tracked),
    None where absent."""
    wanted: list[TensorRef | None] = []
    for sd, layer in layers:
        problem = layer_problem(sd, layer)
        if problem:
            raise InputError(
                problem,
                path=file or None,
                where=f"BatchNorm layer '{layer.display_name}'",
                fix="the statistics cannot be audited — check that the file is a model checkpoint (use "
                "`bnaudit inspect` to list its problems)",
            )
        nbt = _ref(sd, layer.num_batches_tracked)
        wanted += [
            sd.tensors[layer.running_mean],
            sd.tensors[layer.running_var],
            _ref(sd, layer.weight),
            _ref(sd, layer.bias),
            nbt if nbt is not None and nbt.numel == 1 else None,
        ]
    return wanted


def layer_tensor_refs(layers: Sequence[tuple[StateDictRef, BnLayer]]) -> list[TensorRef]:
    """Every tensor :func:`read_layers` reads for ``layers``.

    Raises:
        InputError: a layer's tensors are malformed (see :func:`layer_problem`).
    """
    return [ref for ref in _layer_refs(layers, "") if ref is not None]


def read_layers(
    layers: Sequence[tuple[StateDictRef, BnLayer]], file: str, path: Path | None = None
) -> list[LayerStats]:
    """Read several layers' tensors in float64, with one open per file and one read per run of tensors.

    Args:
        layers: (state dict, layer) pairs.
        file: the file as the user named it, for messages.
        path: read the bytes from this file instead of the one the references name: a file proven to have
            the same layout (:mod:`bnaudit.checkpoint.same_layout`).

    Raises:
        InputError: a layer's tensors are malformed (see :func:`layer_problem`), or a tensor cannot be read.
    """
    return _read(layers, file, path, digest=False)[0]


def read_layers_with_digest(
    layers: Sequence[tuple[StateDictRef, BnLayer]], file: str, path: Path | None = None
) -> tuple[list[LayerStats], str]:
    """:func:`read_layers`, and the SHA-256 of every layer's running_mean then running_var as stored.

    The stored bytes come from the same reads as the values (a raw view of each statistic's span), so the
    provenance hash costs no second read. A compressed or strided statistic is hashed by its decoded values.

    Raises:
        InputError: as :func:`read_layers`.
    """
    stats, digest = _read(layers, file, path, digest=True)
    assert digest is not None
    return stats, digest


def _read(
    layers: Sequence[tuple[StateDictRef, BnLayer]], file: str, path: Path | None, digest: bool
) -> tuple[list[LayerStats], str | None]:
    wanted = _layer_refs(layers, file)
    raw = [_raw_view(ref) for ref in _stat_refs(wanted)] if digest else []
    plain = [ref for ref in (*wanted, *raw) if ref is not None]
    arrays = iter(read_tensors(plain, path=path))
    values = [None if ref is None else next(arrays) for ref in wanted]
    raw_values = [None if ref is None else next(arrays) for ref in raw]
    out = []
    for i in range(0, len(values), _LAYER_TENSORS):
        mean, var, weight, bias, nbt_value = values[i : i + _LAYER_TENSORS]
        assert mean is not None and var is not None  # layer_problem checked that both exist
        out.append(
            LayerStats(
                mean=mean.astype(np.float64, copy=False),
                var=var.astype(np.float64, copy=False),
                weight=None if weight is None else weight.astype(np.float64, copy=False),
                bias=None if bias is None else bias.astype(np.float64, copy=False),
                num_batches_tracked=None if nbt_value is None else int(nbt_value.reshape(-1)[0]),
            )
        )
    if not digest:
        return out, None
    stat_values = [v for i, v in enumerate(values) if i % _LAYER_TENSORS < 2]
    hasher = hashlib.sha256()
    for ref, value, stored in zip(_stat_refs(wanted), stat_values, raw_values, strict=True):
        hasher.update(_stored_bytes(ref, value, stored, path))
    return out, hasher.hexdigest()


def _stat_refs(wanted: list[TensorRef | None]) -> list[TensorRef]:
    """The running_mean and running_var references of :func:`_layer_refs`' list, in order."""
    return [ref for i, ref in enumerate(wanted) if i % _LAYER_TENSORS < 2 and ref is not None]


def _raw_view(ref: TensorRef) -> TensorRef | None:
    """The bytes a plain, contiguous, uncompressed tensor spans, as a uint8 tensor; None for others."""
    if type(ref) is not TensorRef or not ref.storage.in_file or not ref.is_contiguous():
        return None
    start, end = ref.byte_span()
    return TensorRef(ref.storage, "uint8", (end - start,), (1,), ref.offset * ref.itemsize)


def _stored_bytes(
    ref: TensorRef, value: np.ndarray | None, stored: np.ndarray | None, path: Path | None
) -> bytes:
    if stored is not None:
        return stored.tobytes()
    if not ref.storage.in_file or not ref.is_contiguous():
        assert value is not None
        return np.ascontiguousarray(value).tobytes()
    # A tensor assembled by its container's reader (DCP chunks): its span, read directly.
    start, end = ref.byte_span()
    fd = os.open(path or ref.storage.path, os.O_RDONLY)
    try:
        return os.pread(fd, end - start, start)
    finally:
        os.close(fd)
