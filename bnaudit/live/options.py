"""The options of a recalibration pass and of a checkpoint-level pass, as frozen dataclasses (light to import:
no torch, no NumPy)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bnaudit.errors import UsageError
from bnaudit.live.methods import RecalibrationMethod, RecalibrationMode, parse_mode

if TYPE_CHECKING:
    import torch

ProgressCallback = Callable[[int, "int | None"], None]
# forward(model, batch), replacing model(input)
ForwardFn = Callable[[Any, Any], Any]


@dataclass(frozen=True)
class RecalibrationOptions:
    """How :func:`bnaudit.live.recalibrate.recalibrate` runs its pass; checked when built.

    Attributes:
        method: ``population`` (exact) or ``batch-mean`` (see :mod:`bnaudit.live.estimators`); a string is
            turned into a :class:`RecalibrationMethod`. Both methods' statistics are in the result.
        max_batches: use at most this many batches (counted over all ranks).
        max_samples: stop once this many samples were used (whole batches; per rank, ceil(max_samples / N)
            in distributed mode, so use ``max_batches`` for results identical to one process).
        input_index, input_key: where the input is in a tuple/list or dict batch.
        forward: ``forward(model, batch)`` replacing ``model(input)``.
        stop_after_last_bn: skip the rest of each forward once the last BatchNorm call of the first batch's
            forward is recorded. Assumes the BatchNorm call sequence does not depend on the data; turn it off
            for models with data-dependent control flow.
        device: where batches go; None: the device of the model's first parameter or buffer.
        write: overwrite ``running_mean`` / ``running_var`` of the reached layers (False: measure only).
        channels_last: run the pass with the model's 4-D (5-D) parameters and inputs in channels_last
            (channels_last_3d) memory format, often faster for convolutions; the original formats are put
            back afterwards. The statistics are the same to float32 rounding.
        amp: run each forward under ``torch.autocast`` (mixed precision). The layer inputs are then computed
            in low precision, but their moments are still taken in float32 / float64 from the exact widened
            values; only the forward's own rounding changes the statistics (measured in BENCHMARKS.md).
        amp_dtype: ``bfloat16`` / ``float16`` (or a torch dtype) for ``amp``; default bfloat16 on CPU,
            float16 elsewhere.
        distributed: None: automatic; False: ignore torch.distributed even when initialised.
        sharded: the batches already hold only this rank's share (a loader built with rank/world_size).
        status_timeout_s: how long a finished rank waits for the others (distributed only).
        mode: ``population`` (one train-mode pass) or ``sequential`` (statistics consistent with eval mode,
            refined pass after pass: :mod:`bnaudit.live.sequential`); a string is turned into a
            :class:`RecalibrationMode`.
        max_passes: ``sequential`` only: at most this many passes over the data in all (None: as many as it
            takes to converge, at most one per layer plus one) when the batches do not fit in memory.
        resident_batches: ``sequential`` only: run it in one pass, every batch's forward open at once, when
            each process has at most this many batches (0: never; refinement passes instead).

    Raises:
        UsageError: an unknown method, a limit that is not positive, or ``amp_dtype`` without ``amp``.
    """

    method: RecalibrationMethod | str = RecalibrationMethod.POPULATION
    max_batches: int | None = None
    max_samples: int | None = None
    input_index: int = 0
    input_key: str | None = None
    forward: ForwardFn | None = None
    stop_after_last_bn: bool = True
    device: str | torch.device | None = None
    write: bool = True
    channels_last: bool = False
    amp: bool = False
    amp_dtype: str | torch.dtype | None = None
    distributed: bool | None = None
    sharded: bool = False
    status_timeout_s: float | None = None
    mode: RecalibrationMode | str = RecalibrationMode.POPULATION
    max_passes: int | None = None
    resident_batches: int = 256

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", RecalibrationMethod.parse(self.method))
        object.__setattr__(self, "mode", parse_mode(self.mode))
        limits = (("--max-batches", self.max_batches), ("--max-samples", self.max_samples))
        for option, value in (*limits, ("--max-passes", self.max_passes)):
            if value is not None and value <= 0:
                raise UsageError("must be a positive integer", where=option, found=str(value))
        if self.amp_dtype is not None and not self.amp:
            raise UsageError("needs --amp", where="--amp-dtype", fix="add --amp or drop --amp-dtype")
        if (
            self.chosen_mode is RecalibrationMode.SEQUENTIAL
            and self.method is not RecalibrationMethod.POPULATION
        ):
            raise UsageError(
                "measures population statistics only", where="--mode sequential", fix="drop --method"
            )
        if self.resident_batches < 0:
            raise UsageError(
                "must be 0 or more", where="--resident-batches", found=str(self.resident_batches)
            )
        if self.max_passes is not None and self.chosen_mode is not RecalibrationMode.SEQUENTIAL:
            raise UsageError("needs --mode sequential", where="--max-passes", fix="add --mode sequential")

    @property
    def chosen_method(self) -> RecalibrationMethod:
        """``method`` as the enum (it always is one once built)."""
        return RecalibrationMethod.parse(self.method)

    @property
    def chosen_mode(self) -> RecalibrationMode:
        """``mode`` as the enum (it always is one once built)."""
        return parse_mode(self.mode)


@dataclass(frozen=True)
class CalibrationSpec:
    """What a checkpoint-level pass runs: the model and data (specs are trusted user code) and the pass.

    Attributes:
        model, data: the ``--model`` / ``--data`` specs; model_kwargs, data_kwargs: their keyword arguments.
        batch_size: rows per batch of a tensor file (also given to a data callable that takes it).
        forward: a ``--forward`` spec (imported by :func:`run_passes` into ``options.forward``).
        prefix: the key prefix the checkpoint adds to the model's keys (None: found automatically).
        key: the one state dict to use (None: every state dict that fits the model).
        eval: an ``--eval`` spec, a callable(model) -> dict of metrics run before and after the pass.
        options: the pass itself (method, limits, device, ...); ``forward``, ``write`` and ``sharded`` are
            set per pass.
    """

    model: str
    data: str
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    data_kwargs: Mapping[str, Any] = field(default_factory=dict)
    batch_size: int | None = None
    forward: str | None = None
    prefix: str | None = None
    key: str | None = None
    eval: str | None = None
    options: RecalibrationOptions = field(default_factory=RecalibrationOptions)

    @property
    def method(self) -> str:
        """The name of the recalibration method (``population`` / ``batch-mean``)."""
        return self.options.chosen_method.value
