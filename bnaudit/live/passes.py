"""Checkpoint-level recalibration: fit each state dict to the model, run the pass, report drift or patches."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bnaudit.bn.layers import is_ignored
from bnaudit.bn.pickle_policy import pickle_findings
from bnaudit.checkpoint import load_checkpoint
from bnaudit.checkpoint.discover import select_state_dicts
from bnaudit.checkpoint.types import Checkpoint, StateDictRef
from bnaudit.defaults import DEFAULT_DRIFT_ERROR_KL, DEFAULT_DRIFT_WARN_KL
from bnaudit.errors import InputError, ModelMismatchError
from bnaudit.report.model import (
    Finding,
    FindingKind,
    InputInfo,
    LayerRow,
    Report,
    Severity,
    sort_by_layer_metric,
    sort_findings,
)
from bnaudit.report.sections import CalibrationData, Column, Command, RecalibrationOutcome

log = logging.getLogger(__name__)

# The layer table's columns after name and status. recalibrate shows how far each layer moved, old -> new,
# in the same units as drift.
DRIFT_COLUMNS = (
    Column("max KL", "max_kl"),
    Column("max shift (std)", "max_shift"),
    Column("max std ratio", "max_std_ratio"),
    Column("channel", attribute="worst_channel"),
    Column("values/channel", "samples"),
)
RECALIBRATE_COLUMNS = (
    Column("KL old->new", "max_kl"),
    Column("mean move (std)", "max_shift"),
    Column("std change (x)", "max_std_ratio"),
    Column("channel", attribute="worst_channel"),
    Column("values/channel", "samples"),
)


@dataclass(frozen=True)
class CalibrationSpec:
    """Everything a recalibration pass needs from the command line (specs are trusted user code)."""

    model: str
    data: str
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    data_kwargs: dict[str, Any] = field(default_factory=dict)
    batch_size: int | None = None
    input_index: int = 0
    input_key: str | None = None
    forward: str | None = None
    max_batches: int | None = None
    max_samples: int | None = None
    device: str | None = None
    prefix: str | None = None
    method: str = "population"
    stop_after_last_bn: bool = True
    eval: str | None = None
    channels_last: bool = False
    amp: bool = False
    amp_dtype: str | None = None


@dataclass
class StateDictPass:
    """One state dict recalibrated (or measured): where it sits in the model and what the pass found."""

    state_dict: StateDictRef
    prefix: str
    unused_keys: list[str]
    result: Any  # bnaudit.live.recalibrate.RecalibrationResult (torch-side type, imported lazily)
    metrics_before: dict[str, float] | None = None
    metrics_after: dict[str, float] | None = None

    def checkpoint_key(self, module: str, buffer: str) -> str:
        """The original key of ``module.buffer`` in the checkpoint (with the prefix the model lacks)."""
        return f"{self.prefix}{module}.{buffer}" if module else f"{self.prefix}{buffer}"


Progress = Callable[[int, "int | None"], None]


def _fitting_state_dicts(
    ckpt: Checkpoint, display: str, model: Any, key: str | None, prefix: str | None
) -> list[tuple[StateDictRef, str, list[str]]]:
    from bnaudit.live.modelload import match_prefix, model_key_shapes

    model_keys = model_key_shapes(model)
    fitting, reasons = [], []
    for sd in select_state_dicts(ckpt.state_dicts, key, source=display):
        shapes = {k: t.shape for k, t in sd.tensors.items()}
        try:
            match = match_prefix(model_keys, shapes, prefix, source=f"{display}:{sd.display_name}")
        except ModelMismatchError as exc:
            reasons.append(str(exc))
            continue
        fitting.append((sd, match.prefix, list(match.unused_keys)))
    if not fitting:
        why = reasons[0] if reasons else f"{display}: holds no state dict"
        raise ModelMismatchError(f"no state dict of {display} fits the --model: {why}")
    return fitting


def _evaluate(spec: CalibrationSpec, model: Any) -> dict[str, float] | None:
    if spec.eval is None:
        return None
    from bnaudit.live.specs import load_callable

    fn = load_callable(spec.eval, "--eval")
    try:
        metrics = fn(model)
    except Exception as exc:
        raise InputError(f"--eval {spec.eval} raised {type(exc).__name__}: {exc}") from None
    if not isinstance(metrics, dict):
        raise InputError(f"--eval {spec.eval} returned {type(metrics).__name__}, expected a dict of metrics")
    return {str(k): float(v) for k, v in metrics.items()}


def run_passes(
    path: str | Path,
    spec: CalibrationSpec,
    *,
    key: str | None = None,
    write: bool,
    progress: Progress | None = None,
) -> tuple[Checkpoint, list[StateDictPass]]:
    """Recalibrate (``write=False``: only measure) every state dict of a checkpoint that fits the model.

    Each fitting state dict (model and EMA copies alike) is loaded into a fresh instance of ``spec.model``
    through the inert reader and gets its own pass over ``spec.data``. Under torch.distributed every rank
    runs this with its own shard of the batches; the results are identical on every rank.

    Args:
        path: the checkpoint.
        spec: model, data and pass options.
        key: restrict to one state dict.
        write: keep the new statistics in the model (needed for ``--eval`` after the pass).
        progress: called after each local batch.

    Returns:
        The checkpoint (for the writer) and one StateDictPass per fitting state dict.

    Raises:
        ModelMismatchError: no state dict fits the model (the message says why for the first).
        InputError / UsageError: bad specs, data or batches.
    """
    from bnaudit.live.distributed import current_context, local_device
    from bnaudit.live.modelload import load_state_dict_into
    from bnaudit.live.recalibrate import recalibrate
    from bnaudit.live.specs import build_batches, build_model, load_forward

    display = str(path)
    ckpt = load_checkpoint(path)
    device = local_device(spec.device)
    ctx = current_context()
    forward = load_forward(spec.forward) if spec.forward else None
    probe = build_model(spec.model, spec.model_kwargs)
    passes = []
    for sd, prefix, unused in _fitting_state_dicts(ckpt, display, probe, key, spec.prefix):
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
        result = recalibrate(
            model, source.batches, method=spec.method, forward=forward, input_index=spec.input_index,
            input_key=spec.input_key, max_batches=spec.max_batches, max_samples=spec.max_samples,
            device=device, write=write or spec.eval is not None, progress=progress,
            stop_after_last_bn=spec.stop_after_last_bn, sharded=source.sharded,
            channels_last=spec.channels_last, amp=spec.amp, amp_dtype=spec.amp_dtype,
        )  # fmt: skip
        after = _evaluate(spec, model) if spec.eval else None
        passes.append(StateDictPass(sd, prefix, unused, result, before, after))
    return ckpt, passes


# ----------------------------------------------------------------------------------------------- reports


def _severity(value: float | None, warn: float, error: float) -> Severity:
    if value is None:
        return Severity.WARN
    if value >= error:
        return Severity.ERROR
    return Severity.WARN if value >= warn else Severity.OK


def _unreached_finding(display: str, sd_name: str, name: str, *, changed: bool) -> Finding:
    tail = "left unchanged" if changed else "its stored statistics were not checked"
    return Finding(
        Severity.WARN,
        FindingKind.UNREACHED_LAYER,
        f"layer '{name}': no calibration batch reached it, so it was {tail}; check --forward / the "
        "model's control flow, or --ignore it",
        file=display,
        state_dict=sd_name,
        layer=name,
    )


def _layer_row(sd_name: str, layer: Any, severity: Severity) -> LayerRow:
    metrics = layer.metrics()
    worst = metrics.pop("worst_channel")
    metrics["samples"] = int(metrics["samples"] or 0)  # values per channel: a count
    return LayerRow(layer.name, sd_name, severity, layer.channels, metrics, None, worst)


def drift_report(
    display: str,
    ckpt: Checkpoint,
    passes: Sequence[StateDictPass],
    *,
    warn_kl: float = DEFAULT_DRIFT_WARN_KL,
    error_kl: float = DEFAULT_DRIFT_ERROR_KL,
    ignore: Sequence[str] = (),
    settings: dict[str, Any] | None = None,
) -> Report:
    """Compare the stored statistics with the population statistics the pass measured (``bnaudit drift``).

    The metric is the one ``compare`` uses, with the data's statistics in place of the pooled ones:
    KL(N(data mean, data var + eps) || N(stored mean, stored var + eps)) per channel, max per layer.
    """
    rows: list[LayerRow] = []
    findings: list[Finding] = pickle_findings(ckpt.globals, display)
    for p in passes:
        for layer in p.result.layers:
            if is_ignored(layer.name, ignore):
                continue
            if not layer.reached:
                findings.append(_unreached_finding(display, p.state_dict.name, layer.name, changed=False))
                rows.append(_layer_row(p.state_dict.name, layer, Severity.WARN))
                continue
            metrics = layer.metrics()
            severity = _severity(metrics["max_kl"], warn_kl, error_kl)
            rows.append(_layer_row(p.state_dict.name, layer, severity))
            if severity is not Severity.OK:
                findings.append(_drift_finding(display, p, layer, metrics, severity, warn_kl, error_kl))
    rows.sort(key=lambda r: (-r.severity.rank, -float(r.metrics.get("max_kl") or 0.0)))
    sort_by_layer_metric(findings, rows, FindingKind.DRIFT)
    return Report(
        command=Command.DRIFT,
        inputs=(InputInfo(display, ckpt.format, None, tuple(p.state_dict.name for p in passes)),),
        settings={"warn_kl": warn_kl, "error_kl": error_kl, "ignore": list(ignore), **(settings or {})},
        layers=tuple(rows),
        findings=sort_findings(findings),
        headline="max_kl",
        next_step=(
            f"bnaudit recalibrate {display} --model {(settings or {}).get('model', 'SPEC')} --data "
            f"CALIBRATION_DATA -o {_recalibrated_name(display)}"
        ),
        columns=DRIFT_COLUMNS,
        calibration=_calibration_data(passes),
    )


def _recalibrated_name(display: str) -> str:
    path = Path(display)
    return str(path.with_name(f"{path.stem}.recalibrated{path.suffix}"))


def _drift_finding(
    display: str,
    p: StateDictPass,
    layer: Any,
    metrics: dict[str, Any],
    severity: Severity,
    warn_kl: float,
    error_kl: float,
) -> Finding:
    limit = error_kl if severity is Severity.ERROR else warn_kl
    samples = int(metrics["samples"] or 0)
    message = (
        f"layer '{layer.name}': the stored running statistics do not describe the data (channel "
        f"{metrics['worst_channel']}: KL {metrics['max_kl']:.3g} >= {limit:g}; mean off by up to "
        f"{metrics['max_shift']:.2f} std, std off by up to x{metrics['max_std_ratio']:.2f}; {samples} values "
        "per channel). Running statistics are an average over the last training batches of one rank, taken "
        "while the weights still moved; recalibrate them on data"
    )
    return Finding(
        severity,
        FindingKind.DRIFT,
        message,
        file=display,
        state_dict=p.state_dict.name,
        layer=layer.name,
        channel=metrics["worst_channel"],
    )


def recalibration_report(
    display: str,
    ckpt: Checkpoint,
    passes: Sequence[StateDictPass],
    *,
    output: str | None,
    settings: dict[str, Any] | None = None,
) -> Report:
    """The before/after table of ``bnaudit recalibrate``: how far each layer moved (KL of new vs old)."""
    rows: list[LayerRow] = []
    findings: list[Finding] = pickle_findings(ckpt.globals, display)
    for p in passes:
        for layer in p.result.layers:
            if not layer.reached:
                findings.append(_unreached_finding(display, p.state_dict.name, layer.name, changed=True))
                rows.append(_layer_row(p.state_dict.name, layer, Severity.WARN))
            else:
                rows.append(_layer_row(p.state_dict.name, layer, Severity.OK))
    rows.sort(key=lambda r: -float(r.metrics.get("max_kl") or 0.0))
    evals = {p.state_dict.name: {"before": p.metrics_before, "after": p.metrics_after}
             for p in passes if p.metrics_before is not None}  # fmt: skip
    return Report(
        command=Command.RECALIBRATE,
        inputs=(InputInfo(display, ckpt.format, None, tuple(p.state_dict.name for p in passes)),),
        settings=settings or {},
        layers=tuple(rows),
        findings=sort_findings(findings),
        headline="max_kl",
        columns=RECALIBRATE_COLUMNS,
        calibration=_calibration_data(passes),
        recalibration=RecalibrationOutcome(output, evals),
    )


def _calibration_data(passes: Sequence[StateDictPass]) -> CalibrationData:
    return CalibrationData(
        samples=passes[0].result.samples if passes else None,
        batches=passes[0].result.batches if passes else None,
        unused_keys={p.state_dict.name: p.unused_keys for p in passes if p.unused_keys},
    )


def statistic_patches(passes: Sequence[StateDictPass]) -> list[Any]:
    """The writer's patches: new ``running_mean`` / ``running_var`` of each reached layer, by original key."""
    from bnaudit.checkpoint.writer import TensorPatch

    patches = []
    for p in passes:
        for layer in p.result.layers:
            if not layer.reached:
                continue
            for buffer, values in (("running_mean", layer.after_mean), ("running_var", layer.after_var)):
                key = p.checkpoint_key(layer.name, buffer)
                ref = p.state_dict.tensors[key]
                patches.append(TensorPatch(p.state_dict.name, key, ref, np.asarray(values, dtype=np.float64)))
    return patches
