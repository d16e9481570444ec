"""Everything the study records about one trained run: accuracies, bnaudit's verdicts, candidate metrics.

Accuracies are held-out accuracies in eval mode, measured with torch on the run's deployment data (every
node's domain mixed). The repaired checkpoints are made by bnaudit itself (``average_checkpoints``
pooled and mean, ``recalibrate_checkpoint`` of rank 0 on the calibration split), as a user would make
them; ``drift`` runs on a separate drift split, so a recalibrated checkpoint is never judged on the
data it was fitted to.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import torch
from calibration import data, metrics, models
from calibration.matrix import RunConfig
from torch import nn

import bnaudit

HERE = Path(__file__).resolve().parent
MODEL_SPEC = f"{HERE / 'models.py'}:build"
DATA_SPEC = f"{HERE / 'data.py'}:batches"
# drift's batches: enough of them (8 for 200 images) for its batch-means estimate of its own noise.
DRIFT_BATCH = 25


def state_dict_of(path: Path) -> dict[str, torch.Tensor]:
    """The model's state dict in a study checkpoint (``model``, timm ``state_dict``, Lightning ``model.``)."""
    payload = torch.load(path, map_location="cpu", weights_only=False)  # files this study wrote itself
    state = payload.get("model") or payload["state_dict"]
    return {k.removeprefix("model."): v for k, v in state.items()}


def accuracy(run: RunConfig, state: dict[str, torch.Tensor]) -> float:
    model = models.build(run.arch, run.dataset)
    model.load_state_dict(state)
    model.eval()
    heldout = data.mixed(run.dataset, "heldout", run.shift, run.world_size)
    with torch.no_grad():
        return float((model(heldout.x).argmax(dim=1) == heldout.y).double().mean())


def bn_layers(run: RunConfig) -> dict[str, str]:
    """Each BatchNorm layer's name and input kind: ``flat`` (BatchNorm1d on N x C) or ``spatial``."""
    model = models.build(run.arch, run.dataset)
    return {
        n: "flat" if isinstance(m, nn.BatchNorm1d) else "spatial"
        for n, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    }


def _spec(run: RunConfig, split_name: str, batch_size: int) -> bnaudit.CalibrationSpec:
    return bnaudit.CalibrationSpec(
        model=MODEL_SPEC,
        data=DATA_SPEC,
        model_kwargs={"arch": run.arch, "dataset": run.dataset},
        data_kwargs={
            "dataset": run.dataset,
            "split_name": split_name,
            "shift": run.shift,
            "world_size": run.world_size,
            "batch_size": batch_size,
        },
    )


def _rows(report: bnaudit.Report) -> list[dict[str, Any]]:
    return [{"layer": r.name, "severity": r.severity.value, **r.metrics} for r in report.layers]


def _verdict(report: bnaudit.Report) -> dict[str, Any]:
    counts = report.counts()
    return {
        "verdict": report.verdict(bnaudit.FailOn.ERROR),
        "errors": counts.get("error", 0),
        "warnings": counts.get("warn", 0),
        "findings": [f"{f.severity.value}:{f.kind.value}" for f in report.findings],
        "cause": report.cause.to_json()["cause"] if report.cause else None,
        "rows": _rows(report),
    }


def drift(run: RunConfig, path: Path) -> dict[str, Any]:
    """``drift`` on the drift split: bnaudit's verdict and rows, plus the candidate summaries."""
    result = bnaudit.drift_checkpoint(path, _spec(run, "drift", DRIFT_BATCH))
    layers = {
        lr.name: (lr.population_mean, lr.population_var, lr.before_mean, lr.before_var, lr.noise)
        for p in result.passes
        for lr in p.result.layers
        if lr.population_mean is not None and lr.population_var is not None
    }
    return {**_verdict(result.report), "profile": metrics.data_divergence(layers)}


def measure(run: RunConfig, folder: Path) -> dict[str, Any]:
    """The study's record of one run (see the module docstring)."""
    ranks = sorted(folder.glob("ckpt_rank*.pt"), key=lambda p: int(p.stem.removeprefix("ckpt_rank")))
    states = [state_dict_of(p) for p in ranks]
    kinds = bn_layers(run)
    names = list(kinds)
    stats = {
        n: (
            [s[f"{n}.running_mean"].double().numpy() for s in states],
            [s[f"{n}.running_var"].double().numpy() for s in states],
        )
        for n in names
    }
    record: dict[str, Any] = {"config": run.to_json(), "layers": names, "kinds": kinds}
    record["rank_accuracy"] = [accuracy(run, s) for s in states]
    record["rank_profile"] = metrics.per_layer_rank_divergence(stats)
    record["counters"] = [int(s[f"{names[0]}.num_batches_tracked"]) for s in states]
    record["ranks_identical"] = all(
        np.array_equal(a, b) for means, _ in stats.values() for a, b in itertools.pairwise(means)
    )
    record["compare"] = _verdict(bnaudit.compare_ranks([str(p) for p in ranks]))
    repaired: dict[str, Path] = {}
    for method in ("pooled", "mean"):
        out = folder / f"average_{method}.pt"
        bnaudit.average_checkpoints(ranks, out, bnaudit.AverageOptions(method=method, force=True))
        repaired[method] = out
    out = folder / "recalibrated_rank0.pt"
    bnaudit.recalibrate_checkpoint(
        ranks[0], _spec(run, "calib", 50), out, write=bnaudit.WriteOptions(force=True)
    )
    repaired["recalibrated"] = out
    record["repaired_accuracy"] = {k: accuracy(run, state_dict_of(p)) for k, p in repaired.items()}
    record["drift"] = {f"rank{i}": drift(run, p) for i, p in enumerate(ranks)}
    record["drift"].update({k: drift(run, p) for k, p in repaired.items()})
    return record
