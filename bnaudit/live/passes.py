"""Fit each state dict of a checkpoint to the model and run one recalibration pass over the data per fit."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bnaudit.bn.corrupt_pickle import load_or_unsafe
from bnaudit.checkpoint.discover import select_state_dicts
from bnaudit.checkpoint.types import Checkpoint, StateDictRef
from bnaudit.errors import InputError, ModelMismatchError, NonFiniteStatisticsError
from bnaudit.live.options import CalibrationSpec, ProgressCallback, RecalibrationOptions

if TYPE_CHECKING:
    from bnaudit.live.results import RecalibrationResult

log = logging.getLogger(__name__)


@dataclass
class StateDictPass:
    """One state dict recalibrated (or measured): where it sits in the model and what the pass found."""

    state_dict: StateDictRef
    prefix: str
    unused_keys: list[str]
    result: RecalibrationResult
    metrics_before: dict[str, float] | None = None
    metrics_after: dict[str, float] | None = None

    def checkpoint_key(self, module: str, buffer: str) -> str:
        """The original key of ``module.buffer`` in the checkpoint (with the prefix the model lacks)."""
        return f"{self.prefix}{module}.{buffer}" if module else f"{self.prefix}{buffer}"


def _fitting_state_dicts(
    ckpt: Checkpoint, display: str, model: Any, spec: CalibrationSpec
) -> list[tuple[StateDictRef, str, list[str]]]:
    from bnaudit.live.modelload import match_prefix, model_key_shapes

    model_keys = model_key_shapes(model)
    fitting, reasons = [], []
    for sd in select_state_dicts(ckpt.state_dicts, spec.key, source=display):
        shapes = {k: t.shape for k, t in sd.tensors.items()}
        try:
            match = match_prefix(model_keys, shapes, spec.prefix, source=f"{display}:{sd.display_name}")
        except ModelMismatchError as exc:
            reasons.append(str(exc))
            continue
        fitting.append((sd, match.prefix, list(match.unused_keys)))
    if not fitting:
        why = reasons[0] if reasons else f"{display}: holds no state dict"
        raise ModelMismatchError(f"no state dict fits the --model: {why}", path=display)
    return fitting


def _evaluate(spec: CalibrationSpec, model: Any) -> dict[str, float] | None:
    if spec.eval is None:
        return None
    from bnaudit.live.specs import load_callable, one_line

    fn = load_callable(spec.eval, "--eval")
    try:
        metrics = fn(model)
    except Exception as exc:
        raise InputError(f"raised {one_line(exc)}", where=f"--eval {spec.eval}") from None
    if not isinstance(metrics, dict):
        raise InputError(
            f"returned {type(metrics).__name__}, expected a dict of metrics", where=f"--eval {spec.eval}"
        )
    return {str(k): float(v) for k, v in metrics.items()}


def _recalibrate(
    sd_name: str, model: Any, batches: Any, options: RecalibrationOptions, progress: ProgressCallback | None
) -> RecalibrationResult:
    """One state dict's pass; a refusal to write NaN / Inf statistics names the state dict."""
    from bnaudit.live.recalibrate import recalibrate

    try:
        return recalibrate(model, batches, options, progress=progress)
    except NonFiniteStatisticsError as exc:
        exc.state_dict = sd_name
        raise


def run_passes(
    path: str | Path, spec: CalibrationSpec, *, write: bool, progress: ProgressCallback | None = None
) -> tuple[Checkpoint, list[StateDictPass]]:
    """Recalibrate (``write=False``: only measure) every state dict of a checkpoint that fits the model.

    Each fitting state dict (model and EMA copies alike) is loaded into a fresh instance of ``spec.model``
    through the inert reader and gets its own pass over ``spec.data``. Under torch.distributed every rank
    runs this with its own shard of the batches; the results are identical on every rank.

    Args:
        path: the checkpoint.
        spec: model, data and pass options.
        write: keep the new statistics in the model (needed for ``--eval`` after the pass).
        progress: called after each local batch.

    Returns:
        The checkpoint (for the writer) and one StateDictPass per fitting state dict.

    Raises:
        UnsafePickleError: the pickle is corrupt after referencing a dangerous callable (exit 1).
        ModelMismatchError: no state dict fits the model (the message says why for the first).
        InputError / UsageError: bad specs, data or batches.
        NonFiniteStatisticsError: ``write`` and a layer's new statistics are NaN / Inf (its state dict named).
    """
    from bnaudit.live.batch_source import build_batches
    from bnaudit.live.distributed import current_context, local_device
    from bnaudit.live.modelload import load_state_dict_into
    from bnaudit.live.specs import build_model, load_forward

    display = str(path)
    # A dangerous global named before the pickle broke is still the finding (exit 1), as in inspect.
    ckpt = load_or_unsafe(path, display)
    device = local_device(spec.options.device)
    ctx = current_context()
    forward = load_forward(spec.forward) if spec.forward else None
    options = dataclasses.replace(
        spec.options, forward=forward, device=device, write=write or spec.eval is not None
    )
    passes = []
    for sd, prefix, unused in _fitting_state_dicts(
        ckpt, display, build_model(spec.model, spec.model_kwargs), spec
    ):
        model = build_model(spec.model, spec.model_kwargs).to(device)
        load_state_dict_into(model, sd, prefix=prefix, source=f"{display}:{sd.display_name}")
        before = _evaluate(spec, model)
        source = build_batches(
            spec.data,
            spec.data_kwargs,
            spec.batch_size,
            rank=ctx.rank if ctx else None,
            world_size=ctx.world_size if ctx else None,
        )
        log.debug("%s:%s: calibrating on %s", display, sd.display_name, source.description)
        pass_options = dataclasses.replace(options, sharded=source.sharded)
        result = _recalibrate(sd.name, model, source.batches, pass_options, progress)
        after = _evaluate(spec, model) if spec.eval else None
        passes.append(StateDictPass(sd, prefix, unused, result, before, after))
    return ckpt, passes
