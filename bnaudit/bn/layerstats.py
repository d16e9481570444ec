"""Read one BatchNorm layer's tensors as float64 arrays, validate them, and check their health."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bnaudit.bn.layers import BnLayer
from bnaudit.bn.stats import segment_sums
from bnaudit.checkpoint.tensors import read_tensors
from bnaudit.checkpoint.types import StateDictRef, TensorRef
from bnaudit.errors import InputError
from bnaudit.report.model import Finding, FindingKind, Severity

# A variance this far below eps means normalisation divides by ~sqrt(eps) alone: any deviation of the input
# at eval time is amplified by up to 1/sqrt(eps) (316x for eps=1e-5).
TINY_VARIANCE_FACTOR = 1e-3


@dataclass
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
                f"{file}: BatchNorm layer '{layer.display_name}': {problem}; the statistics cannot be "
                "audited — check that the file is a model checkpoint (use `bnaudit inspect` to list its "
                "problems)"
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
    wanted = _layer_refs(layers, file)
    arrays = iter(read_tensors([ref for ref in wanted if ref is not None], path=path))
    values = [None if ref is None else next(arrays) for ref in wanted]
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
    return out


@dataclass(frozen=True)
class _Place:
    """Where findings about one layer point: file, state dict, layer and (compare) rank."""

    file: str
    state_dict: str
    layer: str
    rank: int | None

    @property
    def label(self) -> str:
        rank = f" of rank {self.rank}" if self.rank is not None else ""
        return f"layer '{self.layer or '<root>'}'{rank}"

    def finding(
        self, severity: Severity, kind: FindingKind, message: str, channel: int | None = None
    ) -> Finding:
        return Finding(
            severity,
            kind,
            f"{self.label}: {message}",
            file=self.file,
            state_dict=self.state_dict,
            layer=self.layer,
            rank=self.rank,
            channel=channel,
        )


def health_findings(
    stats: LayerStats,
    eps: float,
    *,
    file: str,
    state_dict: str,
    layer: str,
    rank: int | None = None,
) -> list[Finding]:
    """Problems of one layer's statistics that make eval-mode normalisation wrong or unsafe.

    Returns:
        Findings of kinds ``nonfinite``, ``negative-variance`` (errors), ``tiny-variance``,
        ``never-updated`` (warnings) and, for a zero ``num_batches_tracked`` beside trained statistics,
        ``never-updated`` (info).
    """
    place = _Place(file, state_dict, layer, rank)
    out: list[Finding] = []
    bad = ~np.isfinite(stats.mean) | ~np.isfinite(stats.var)
    if bad.any():
        ch = int(np.argmax(bad))
        out.append(
            place.finding(
                Severity.ERROR,
                FindingKind.NONFINITE,
                f"{int(bad.sum())} channel(s) hold NaN or Inf statistics (first: channel {ch}); "
                "recalibrate the layer with `bnaudit recalibrate`",
                ch,
            )
        )
    negative = np.isfinite(stats.var) & (stats.var < 0)
    if negative.any():
        ch = int(np.argmax(negative))
        out.append(
            place.finding(
                Severity.ERROR,
                FindingKind.NEGATIVE_VARIANCE,
                f"{int(negative.sum())} channel(s) have a negative running_var (first: channel "
                f"{ch}, {stats.var[ch]:.3g}); recalibrate the layer",
                ch,
            )
        )
    limit = eps * TINY_VARIANCE_FACTOR
    tiny = np.isfinite(stats.var) & (stats.var >= 0) & (stats.var < limit)
    if tiny.any():
        ch = int(np.argmax(tiny))
        out.append(
            place.finding(
                Severity.WARN,
                FindingKind.TINY_VARIANCE,
                f"{int(tiny.sum())} channel(s) have running_var below {limit:.0e} (first: "
                f"channel {ch}); eval output there is amplified up to 1/sqrt(eps) — harmless for "
                "dead channels, wrong for live ones",
                ch,
            )
        )
    out.extend(_never_updated(stats, place))
    return out


def differing_affine(reference: LayerStats, stats: LayerStats) -> Iterator[tuple[str, float]]:
    """(``weight`` or ``bias``, max |difference|) for each affine parameter that differs from the reference.

    DDP keeps parameters identical across ranks, so any difference means the files are not ranks of one step.
    """
    for attr in ("weight", "bias"):
        ref_value, value = getattr(reference, attr), getattr(stats, attr)
        if ref_value is None or value is None or np.array_equal(ref_value, value, equal_nan=True):
            continue
        yield attr, float(np.nanmax(np.abs(ref_value - value)))


def layers_to_check(stats: Sequence[LayerStats], eps: float) -> list[int]:
    """The layers for which :func:`health_findings` may find something; for the others it returns [].

    One vectorised pass over every layer's channels at once: a model's layers are nearly always healthy,
    and checking them one by one costs a dozen NumPy calls per layer.
    """
    if not stats:
        return []
    means = np.concatenate([s.mean for s in stats])
    variances = np.concatenate([s.var for s in stats])
    with np.errstate(invalid="ignore"):
        # Non-finite, negative and tiny variances all sit below the tiny-variance limit or are not finite.
        odd = ~np.isfinite(means) | ~np.isfinite(variances) | (variances < eps * TINY_VARIANCE_FACTOR)
    moved = (means != 0) | (variances != 1)  # a channel away from the initial statistics
    sizes = [s.channels for s in stats]
    odd_counts, moved_counts = segment_sums(odd, sizes), segment_sums(moved, sizes)
    return [
        i
        for i, s in enumerate(stats)
        if odd_counts[i] or (s.channels and not moved_counts[i]) or s.num_batches_tracked == 0
    ]


def _never_updated(stats: LayerStats, place: _Place) -> list[Finding]:
    at_reset = stats.channels > 0 and bool(np.all(stats.mean == 0) and np.all(stats.var == 1))
    if at_reset:
        return [
            place.finding(
                Severity.WARN,
                FindingKind.NEVER_UPDATED,
                "statistics are still at their initial values (mean 0, var 1): the layer never ran "
                "in train mode; recalibrate it on data with `bnaudit recalibrate`",
            )
        ]
    if stats.num_batches_tracked == 0:
        return [
            place.finding(
                Severity.INFO,
                FindingKind.NEVER_UPDATED,
                "num_batches_tracked is 0 but the statistics are set (typical of converted "
                "pretrained weights); nothing to do unless training should have updated them",
            )
        ]
    return []
