"""``diff``: how each BatchNorm layer changed between two checkpoints of one model.

For every layer both files have: the mean over channels and the maximum of KL(N(base) || N(ckpt)) (nats,
variances with eps), the largest mean shift in base standard deviations, the largest variance ratio
(either way round, >= 1), the change of ``num_batches_tracked`` and the largest change of the affine
weight and bias. Layers matching a ``--frozen`` pattern must not change at all: any difference of their
statistics, counter or affine parameters is a ``frozen-changed`` error. Only BatchNorm tensors are read.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bnaudit.audit.layer_rows import finite_max
from bnaudit.audit.options import DiffOptions
from bnaudit.audit.rank_reader import load_logged
from bnaudit.bn.layers import BnLayer, find_bn_layers, is_ignored
from bnaudit.bn.layerstats import LayerStats, read_layers
from bnaudit.bn.stats import kl_normal
from bnaudit.checkpoint.discover import select_state_dicts
from bnaudit.checkpoint.types import Checkpoint, StateDictRef
from bnaudit.errors import InputError, UsageError
from bnaudit.report.model import Finding, FindingKind, InputInfo, LayerRow, Report, Severity, sort_findings
from bnaudit.report.sections import Column, Command

# The layer table's metrics after name, status and channels: (title, LayerRow.metrics key).
_METRICS = (
    ("mean KL", "mean_kl"),
    ("max shift", "max_shift"),
    ("max var ratio", "max_var_ratio"),
    ("batches +", "counter_delta"),
    ("weight change", "weight_change"),
    ("bias change", "bias_change"),
)
DIFF_COLUMNS = (Column("channels", attribute="channels"), *(Column(title, key) for title, key in _METRICS))


def _state_dict(ckpt: Checkpoint, key: str | None, display: str) -> StateDictRef:
    """``--key``'s state dict, or the first one holding BatchNorm layers (the live model)."""
    found = select_state_dicts(ckpt.state_dicts, key, source=display)
    with_bn = [sd for sd in found if find_bn_layers(sd.tensors)]
    if not with_bn:
        raise InputError(
            "no BatchNorm layers (keys ending in running_mean and running_var)",
            path=display,
            where=f"state dict {key!r}" if key is not None else None,
            fix="check that this is a model checkpoint, or pass --key",
        )
    return with_bn[0]


def _layers(sd: StateDictRef, options: DiffOptions) -> dict[str, BnLayer]:
    return {bn.name: bn for bn in find_bn_layers(sd.tensors) if not is_ignored(bn.name, options.ignore)}


def _max_change(a: np.ndarray | None, b: np.ndarray | None) -> float | None:
    if a is None or b is None or a.shape != b.shape:
        return None
    return finite_max(np.abs(a - b))


def _metrics(base: LayerStats, new: LayerStats, eps: float) -> dict[str, float | int | None]:
    with np.errstate(invalid="ignore", divide="ignore"):
        var_b, var_n = base.var + eps, new.var + eps
        kl = kl_normal(base.mean, var_b, new.mean, var_n)
        shift = np.abs(new.mean - base.mean) / np.sqrt(var_b)
        ratio = np.maximum(var_n / var_b, var_b / var_n)
    counts = (base.num_batches_tracked, new.num_batches_tracked)
    return {
        "mean_kl": float(np.mean(kl)) if np.isfinite(kl).all() else None,
        "max_kl": finite_max(kl),
        "max_shift": finite_max(shift),
        "max_var_ratio": finite_max(ratio),
        "counter_delta": None if None in counts else int(counts[1] or 0) - int(counts[0] or 0),
        "weight_change": _max_change(base.weight, new.weight),
        "bias_change": _max_change(base.bias, new.bias),
    }


def _text(value: float | int | None) -> str:
    return "not finite" if value is None else f"{value:.4g}"


def _changes(base: LayerStats, new: LayerStats, metrics: dict[str, float | int | None]) -> list[str]:
    """What differs at all between the two layers, in words (empty: bit-identical)."""
    out = []
    if not (
        np.array_equal(base.mean, new.mean, equal_nan=True)
        and np.array_equal(base.var, new.var, equal_nan=True)
    ):
        shift, ratio = (_text(metrics[k]) for k in ("max_shift", "max_var_ratio"))
        out.append(f"statistics (max shift {shift} std, max var ratio {ratio})")
    if base.num_batches_tracked != new.num_batches_tracked:
        out.append(f"num_batches_tracked {base.num_batches_tracked} -> {new.num_batches_tracked}")
    for attr, key in (("weight", "weight_change"), ("bias", "bias_change")):
        a, b = getattr(base, attr), getattr(new, attr)
        if (a is None) != (b is None):
            out.append(f"{attr} (in one checkpoint only)")
        elif a is not None and not np.array_equal(a, b, equal_nan=True):
            out.append(f"{attr} (max |change| {_text(metrics[key])})")
    return out


def _frozen_finding(name: str, pattern: str, changes: list[str], state_dict: str, file: str) -> Finding:
    message = (
        f"layer '{name or '<root>'}' matches --frozen '{pattern}' but changed: {'; '.join(changes)} — "
        "BatchNorm updates its statistics in train mode even when requires_grad is False: put the frozen "
        "modules in eval mode after every model.train() (pytorch #86590), or restore them from BASE"
    )
    return Finding(Severity.ERROR, FindingKind.FROZEN_CHANGED, message, file, state_dict, name)


def _check_patterns(options: DiffOptions, names: Sequence[str]) -> None:
    for pattern in options.frozen:
        if not any(is_ignored(n, [pattern]) for n in names):
            shown = ", ".join(list(names)[:8]) or "none"
            raise UsageError(
                f"--frozen '{pattern}' matches no BatchNorm layer",
                where="--frozen",
                fix=f"layers are: {shown}",
            )


def _same_layers(base: dict[str, BnLayer], new: dict[str, BnLayer], paths: tuple[str, str]) -> list[str]:
    if set(base) != set(new):
        only = sorted(set(base) ^ set(new))
        raise InputError(
            "the two checkpoints do not have the same BatchNorm layers",
            path=paths[1],
            where=f"compared with {paths[0]}",
            expected="the same model before and after",
            found=f"{len(only)} layer(s) in one file only, e.g. '{only[0]}'",
            fix="pass the right files, --key, or leave those layers out with --ignore",
        )
    return list(base)


def _check_channels(name: str, old: LayerStats, new: LayerStats, paths: tuple[str, str]) -> None:
    if old.channels != new.channels:
        raise InputError(
            "the layer has a different number of channels in the two checkpoints",
            path=paths[1],
            where=f"BatchNorm layer '{name or '<root>'}'",
            expected=f"{old.channels} channels, as in {paths[0]}",
            found=f"{new.channels}",
            fix="diff compares two checkpoints of one model: pass the right files or --key",
        )


def diff_checkpoints(
    base: str | Path, checkpoint: str | Path, options: DiffOptions = DiffOptions()
) -> Report:
    """Per-layer change of the BatchNorm statistics from ``base`` to ``checkpoint``.

    Returns:
        A Report with one row per layer (columns: see ``DIFF_COLUMNS``) and ``frozen-changed`` errors.

    Raises:
        InputError: a file cannot be read, has no BatchNorm layers, or the layer sets differ.
        UsageError: a ``--frozen`` pattern matches no layer.
    """
    paths = (str(base), str(checkpoint))
    ckpts = [load_logged(p, p) for p in paths]
    sds = [_state_dict(c, options.key, p) for c, p in zip(ckpts, paths, strict=True)]
    layer_maps = [_layers(sd, options) for sd in sds]
    names = _same_layers(layer_maps[0], layer_maps[1], paths)
    _check_patterns(options, names)
    stats = [
        read_layers([(sd, m[n]) for n in names], p) for sd, m, p in zip(sds, layer_maps, paths, strict=True)
    ]
    rows, findings = [], []
    for name, old, new in zip(names, stats[0], stats[1], strict=True):
        _check_channels(name, old, new, paths)
        metrics = _metrics(old, new, options.eps)
        pattern = next((p for p in options.frozen if is_ignored(name, [p])), None)
        changes = _changes(old, new, metrics) if pattern is not None else []
        if pattern is not None and changes:
            findings.append(_frozen_finding(name, pattern, changes, sds[1].name, paths[1]))
        severity = Severity.ERROR if changes else Severity.OK
        rows.append(LayerRow(name, sds[1].name, severity, new.channels, metrics))
    rows.sort(key=lambda r: (-r.severity.rank, -(r.metrics.get("max_kl") or 0.0)))
    return Report(
        command=Command.DIFF,
        inputs=tuple(
            InputInfo(p, c.format, None, (sd.name,)) for p, c, sd in zip(paths, ckpts, sds, strict=True)
        ),
        settings={
            "eps": options.eps,
            "key": options.key,
            "ignore": list(options.ignore),
            "frozen": list(options.frozen),
        },
        layers=tuple(rows),
        findings=sort_findings(findings),
        headline="max_kl",
        columns=DIFF_COLUMNS,
    )
