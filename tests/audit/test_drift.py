"""drift_checkpoint called as a library: the measured statistics, the Report, the thresholds."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

import bnaudit
from bnaudit.audit.drift import DriftResult, DriftThresholds, drift_checkpoint
from bnaudit.defaults import DEFAULT_DRIFT_ERROR_KL, DEFAULT_DRIFT_NOISE_RATIO, DEFAULT_DRIFT_WARN_KL
from bnaudit.errors import UsageError
from bnaudit.live.passes import CalibrationSpec
from bnaudit.report.model import FindingKind, Severity
from tests.live.test_recalibrate import reference
from tests.recal_helpers.models import make_batches, make_convnet

SPEC = CalibrationSpec(
    model="tests.recal_helpers.models:make_convnet", data="tests.recal_helpers.models:make_batches"
)


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """A checkpoint whose running statistics are BatchNorm's initial ones (0 / 1): far from the data."""
    path = tmp_path / "ckpt.pt"
    torch.save({"model": make_convnet().state_dict()}, path)
    return path


def test_measures_the_data_and_flags_every_layer(checkpoint: Path) -> None:
    before = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    result = drift_checkpoint(checkpoint, SPEC)
    assert isinstance(result, DriftResult) and len(result.passes) == 1
    measured = result.passes[0].result
    assert not measured.written and measured.batches == 10
    for name, (pm, pv, _, _) in reference(make_convnet(), make_batches()).items():
        layer = measured.layer(name)
        np.testing.assert_array_equal(layer.before_mean, np.zeros(layer.channels))
        assert np.all(np.abs(layer.population_mean - pm) <= 1e-6 * np.sqrt(pv) + 1e-12), name
        assert np.all(np.abs(layer.population_var - pv) <= 1e-6 * pv + 1e-12), name
    report = result.report
    assert report.command == "drift" and report.headline == "excess_kl"
    assert (report.settings["warn_kl"], report.settings["error_kl"]) == (
        DEFAULT_DRIFT_WARN_KL,
        DEFAULT_DRIFT_ERROR_KL,
    )
    assert report.settings["noise_ratio"] == DEFAULT_DRIFT_NOISE_RATIO
    rows = {row.name: row.metrics for row in report.layers}
    for name, (pm, pv, _, _) in reference(make_convnet(), make_batches()).items():
        # KL(N(data) || N(stored)) in float64, stored statistics BatchNorm's initial 0 / 1, eps 1e-5.
        vd, vs = pv + 1e-5, 1.0 + 1e-5
        kl = 0.5 * (np.log(vs / vd) + (vd + pm**2) / vs - 1.0)
        metrics = rows[name]
        assert metrics["mean_kl"] == pytest.approx(kl.mean(), rel=1e-6)
        assert metrics["excess_kl"] == pytest.approx(kl.mean() - metrics["noise_kl"], rel=1e-6)
        assert metrics["noise_ratio"] == pytest.approx(kl.mean() / metrics["noise_kl"], rel=1e-6)
    assert report.settings["model"] == SPEC.model and report.settings["method"] == "population"
    assert {row.name for row in report.layers} == {"bn1", "bn2", "bn3"}
    assert all(row.severity is Severity.ERROR for row in report.layers)
    assert {f.layer for f in report.findings if f.kind is FindingKind.DRIFT} == {"bn1", "bn2", "bn3"}
    assert report.next_step is not None and "ckpt.recalibrated.pt" in report.next_step
    assert hashlib.sha256(checkpoint.read_bytes()).hexdigest() == before


def test_thresholds_and_ignored_layers(checkpoint: Path) -> None:
    lenient = DriftThresholds(warn_kl=1e6, error_kl=1e7, ignore=("bn3",))
    report = drift_checkpoint(checkpoint, SPEC, lenient).report
    assert {row.name for row in report.layers} == {"bn1", "bn2"}
    assert all(row.severity is Severity.OK for row in report.layers) and report.findings == ()
    assert report.settings["ignore"] == ["bn3"]
    with pytest.raises(UsageError) as info:
        DriftThresholds(warn_kl=0.5, error_kl=0.1)
    assert info.value.fields.where == "--warn-kl"


def test_exported_from_the_package() -> None:
    assert bnaudit.drift_checkpoint is drift_checkpoint and bnaudit.DriftThresholds is DriftThresholds
