"""bnaudit inspect: health findings of one checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bnaudit.audit.inspect import InspectOptions, inspect_checkpoint, inspect_checkpoints
from bnaudit.bn.health import health_findings, layers_to_check
from bnaudit.bn.layerstats import LayerStats
from bnaudit.errors import InputError
from bnaudit.report.model import FailOn, FindingKind, Severity
from tests.conftest import bn_state

CHANNELS = {"a": 4, "b": 4, "c": 4, "d": 4, "e": 4, "f": 4}


def _kinds(report, severity=None):
    return {(f.layer, f.kind) for f in report.findings if severity is None or f.severity is severity}


def test_each_problem_is_a_finding(tmp_path, rng):
    sd = bn_state(CHANNELS, rng)
    sd["a.bn.running_mean"][1] = float("nan")
    sd["b.bn.running_var"][2] = -0.5
    sd["c.bn.running_var"][0] = 0.0
    sd["d.bn.running_mean"].zero_()
    sd["d.bn.running_var"].fill_(1.0)
    sd["e.bn.num_batches_tracked"] = torch.tensor(0)
    sd["f.bn.running_var"] = torch.ones(5)
    path = tmp_path / "c.pt"
    torch.save({"model": sd}, path)
    report = inspect_checkpoint(path)
    assert _kinds(report, Severity.ERROR) == {
        ("a.bn", FindingKind.NONFINITE),
        ("b.bn", FindingKind.NEGATIVE_VARIANCE),
        ("f.bn", FindingKind.MALFORMED_LAYER),
    }
    assert _kinds(report, Severity.WARN) == {
        ("c.bn", FindingKind.TINY_VARIANCE),
        ("d.bn", FindingKind.NEVER_UPDATED),
    }
    assert _kinds(report, Severity.INFO) == {("e.bn", FindingKind.NEVER_UPDATED)}
    assert report.verdict(FailOn.ERROR) == "fail"
    assert report.layers[0].severity is Severity.ERROR
    rows = {r.name: r for r in report.layers}
    assert rows["e.bn"].severity is Severity.OK
    assert rows["c.bn"].metrics["var_min"] == 0.0


def test_non_floating_statistics_are_malformed(tmp_path, rng):
    sd = bn_state({"a": 3}, rng)
    sd["a.bn.running_mean"] = torch.zeros(3, dtype=torch.int64)
    torch.save(sd, tmp_path / "x.pt")
    report = inspect_checkpoint(tmp_path / "x.pt")
    (f,) = report.findings
    assert f.kind is FindingKind.MALFORMED_LAYER and "int64" in f.message


def test_healthy_checkpoint_passes_and_layer_detail(tmp_path, rng):
    sd = bn_state({"a": 3}, rng)
    torch.save(sd, tmp_path / "ok.pt")
    report = inspect_checkpoint(tmp_path / "ok.pt", InspectOptions(layer="a.bn"))
    assert report.verdict(FailOn.WARN) == "pass"
    np.testing.assert_allclose(
        [r["running_var"] for r in report.channel_rows], sd["a.bn.running_var"].double().numpy()
    )
    with pytest.raises(InputError, match="no BatchNorm layer named 'zz'") as exc:
        inspect_checkpoint(tmp_path / "ok.pt", InspectOptions(layer="zz"))
    assert exc.value.fields.path == str(tmp_path / "ok.pt") and exc.value.fields.where == "--layer"
    assert exc.value.fields.fix == "layers are: a.bn"


def test_no_batchnorm_is_a_warning(tmp_path):
    torch.save({"fc.weight": torch.ones(2)}, tmp_path / "n.pt")
    report = inspect_checkpoint(tmp_path / "n.pt")
    (f,) = report.findings
    assert f.kind is FindingKind.NO_BATCHNORM and f.severity is Severity.WARN


def _layer(rng, channels, problem):
    mean, var = rng.normal(size=channels), rng.uniform(0.5, 2.0, size=channels)
    nbt = 100
    if problem == "nan":
        mean[rng.integers(channels)] = np.nan
    elif problem == "inf-var":
        var[rng.integers(channels)] = np.inf
    elif problem == "negative":
        var[rng.integers(channels)] = -0.5
    elif problem == "tiny":
        var[rng.integers(channels)] = 1e-12
    elif problem == "at-init":
        mean[:], var[:] = 0.0, 1.0
    elif problem == "zero-counter":
        nbt = 0
    elif problem == "almost-at-init":
        mean[:], var[:] = 0.0, 1.0
        var[rng.integers(channels)] = 1.5
    return LayerStats(mean=mean, var=var, weight=None, bias=None, num_batches_tracked=nbt)


def test_vectorised_pre_check_picks_exactly_the_layers_with_health_findings(rng):
    # layers_to_check lets compare skip health_findings on healthy layers: it must never skip a layer with
    # a finding, and flags only layers that have one.
    problems = ["none", "nan", "inf-var", "negative", "tiny", "at-init", "zero-counter", "almost-at-init"]
    for _ in range(20):
        layers = [
            _layer(rng, int(rng.integers(1, 6)), problems[int(rng.integers(len(problems)))])
            for _ in range(12)
        ]
        layers.insert(int(rng.integers(len(layers))), LayerStats(np.zeros(0), np.zeros(0), None, None, 5))
        with_findings = [
            i
            for i, s in enumerate(layers)
            if health_findings(s, 1e-5, file="f", state_dict="", layer=f"l{i}")
        ]
        assert layers_to_check(layers, 1e-5) == with_findings


def test_several_checkpoints_make_one_report(tmp_path, rng):
    good, bad = bn_state({"a": 3}, rng), bn_state({"a": 3}, rng)
    bad["a.bn.running_var"][1] = -1.0
    torch.save(good, tmp_path / "m_0.pt")
    torch.save(bad, tmp_path / "m_1.pt")
    report = inspect_checkpoints(str(tmp_path / "m_*.pt"), InspectOptions(security=True))
    assert [i.path for i in report.inputs] == [str(tmp_path / "m_0.pt"), str(tmp_path / "m_1.pt")]
    assert len(report.layers) == 2 and report.layers[0].severity is Severity.ERROR
    (f,) = [f for f in report.findings if f.severity is Severity.ERROR]
    assert f.kind is FindingKind.NEGATIVE_VARIANCE and f.file == str(tmp_path / "m_1.pt")
    assert report.globals is not None
    single = inspect_checkpoints([tmp_path / "m_0.pt"])
    assert single == inspect_checkpoint(tmp_path / "m_0.pt")
