"""recalibrate_checkpoint called as a library: result and Report fields, exact statistics, refusals."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import bnaudit
from bnaudit.errors import OutputError, UsageError
from bnaudit.live.options import RecalibrationOptions
from bnaudit.live.passes import CalibrationSpec
from bnaudit.repair.recalibrate import CheckpointRecalibrationResult, WriteOptions, recalibrate_checkpoint
from bnaudit.report.sections import RecalibrationOutcome
from tests.conftest import ShellPayload
from tests.live.test_recalibrate import reference
from tests.recal_helpers.models import make_batches, make_convnet

SPEC = CalibrationSpec(
    model="tests.recal_helpers.models:make_convnet", data="tests.recal_helpers.models:make_batches"
)
STATS = ("running_mean", "running_var")


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "ckpt.pt"
    torch.save({"model": make_convnet().state_dict(), "epoch": 7}, path)
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _assert_exact(written: dict[str, torch.Tensor], method: str = "population") -> None:
    """The written statistics against the float64 reference of tests/live/test_recalibrate.py."""
    ref = reference(make_convnet(), make_batches())
    for layer, (pm, pv, bm, bv) in ref.items():
        mean, var = (pm, pv) if method == "population" else (bm, bv)
        got_mean = written[f"{layer}.running_mean"].double().numpy()
        got_var = written[f"{layer}.running_var"].double().numpy()
        # float32 storage rounding on top of the estimator's 1e-6 tolerance
        assert np.all(np.abs(got_mean - mean) <= 1e-6 * np.sqrt(pv) + 1e-6 * np.abs(mean) + 1e-7), layer
        assert np.all(np.abs(got_var - var) <= 2e-6 * var + 1e-9), layer


def test_writes_exact_statistics_and_the_provenance(checkpoint: Path, tmp_path: Path) -> None:
    before = _sha(checkpoint)
    out = tmp_path / "fixed.pt"
    result = recalibrate_checkpoint(checkpoint, SPEC, out)
    assert isinstance(result, CheckpointRecalibrationResult)
    assert result.output == out and result.sidecar == tmp_path / "fixed.pt.bnaudit.json"
    assert not result.refused and len(result.passes) == 1
    assert result.passes[0].result.batches == 10 and result.passes[0].result.samples == 80
    report = result.report
    assert report.command == "recalibrate" and report.settings["method"] == "population"
    assert report.recalibration is not None and report.recalibration.output == str(out)
    assert report.calibration is not None and report.calibration.batches == 10
    assert {row.name for row in report.layers} == {"bn1", "bn2", "bn3"}
    assert all(row.state_dict == "model" for row in report.layers)
    assert _sha(checkpoint) == before
    fixed = torch.load(out, weights_only=True)
    _assert_exact(fixed["model"])
    original = torch.load(checkpoint, weights_only=True)
    for key, value in original["model"].items():
        if not key.endswith(STATS):
            assert torch.equal(fixed["model"][key], value), key
    assert fixed["epoch"] == 7
    sidecar = json.loads(result.sidecar.read_text())  # type: ignore[union-attr]
    assert sidecar["inputs"][0]["sha256"] == before and sidecar["output"]["sha256"] == _sha(out)
    assert sidecar["method"] == "population" and sidecar["batches"] == 10


def test_batch_mean_and_dry_run_write_nothing(checkpoint: Path, tmp_path: Path) -> None:
    spec = CalibrationSpec(SPEC.model, SPEC.data, options=RecalibrationOptions(method="batch-mean"))
    result = recalibrate_checkpoint(checkpoint, spec, write=WriteOptions(dry_run=True))
    assert result.output is None and result.sidecar is None and result.report.recalibration is not None
    assert result.report.recalibration.output is None
    assert result.report.settings["method"] == "batch-mean"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]
    layers = result.passes[0].result.layers
    _assert_exact({f"{la.name}.{b}": torch.from_numpy(getattr(la, f"after_{b[8:]}")) for la in layers
                   for b in STATS}, "batch-mean")  # fmt: skip


def test_output_refusals(checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError) as info:
        recalibrate_checkpoint(checkpoint, SPEC)
    assert info.value.fields.fix is not None and "--dry-run" in info.value.fields.fix
    with pytest.raises(OutputError):
        recalibrate_checkpoint(checkpoint, SPEC, checkpoint, write=WriteOptions(force=True))
    existing = tmp_path / "exists.pt"
    existing.write_bytes(b"keep")
    with pytest.raises(OutputError):
        recalibrate_checkpoint(checkpoint, SPEC, existing)
    assert existing.read_bytes() == b"keep"
    assert (
        recalibrate_checkpoint(checkpoint, SPEC, existing, write=WriteOptions(force=True)).output == existing
    )


def test_unsafe_pickle_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"model": make_convnet().state_dict(), "payload": ShellPayload(marker)}, evil)
    out = tmp_path / "out.pt"
    result = recalibrate_checkpoint(evil, SPEC, out)
    assert result.refused and result.output is None and result.passes == ()
    assert [f.kind.value for f in result.report.findings] == ["unsafe-pickle"]
    assert result.report.recalibration == RecalibrationOutcome(None, refused=True)
    assert result.report.calibration is None
    assert not out.exists() and not marker.exists()
    allowed = recalibrate_checkpoint(evil, SPEC, out, write=WriteOptions(allow_unsafe_input=True))
    assert not allowed.refused and allowed.output == out and not marker.exists()


def test_exported_from_the_package() -> None:
    assert bnaudit.recalibrate_checkpoint is recalibrate_checkpoint
    assert bnaudit.CheckpointRecalibrationResult is CheckpointRecalibrationResult
    assert bnaudit.CalibrationSpec is CalibrationSpec and bnaudit.RecalibrationOptions is RecalibrationOptions
