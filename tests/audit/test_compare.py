"""bnaudit compare: divergence numbers against a float64 reference, model checks, findings and ordering."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bnaudit.audit.compare import CompareOptions, compare_ranks
from bnaudit.errors import InputError, ModelMismatchError, NoBatchNormError, UsageError
from bnaudit.report.model import FailOn, FindingKind, Severity
from tests.conftest import bn_state, save_ranks

CHANNELS = {"stem": 4, "layer1": 8, "layer2": 6}


def _reference_layer(means, variances, eps):
    """Independent float64 computation of the compare metrics of one layer."""
    m = np.asarray(means, dtype=np.float64)
    v = np.asarray(variances, dtype=np.float64)
    mean = m.mean(0)
    var = (v + (m - mean) ** 2).mean(0)
    s, sr = var + eps, v + eps
    kl = 0.5 * (np.log(sr / s) + (s + (mean - m) ** 2) / sr - 1.0)
    shift = np.abs(m - mean) / np.sqrt(s)
    ratio = np.maximum(sr / s, s / sr)
    return mean, var, kl, shift, ratio


def _stats(states, layer):
    means = [sd[f"{layer}.bn.running_mean"].double().numpy() for sd in states]
    variances = [sd[f"{layer}.bn.running_var"].double().numpy() for sd in states]
    return means, variances


def test_metrics_match_float64_reference(tmp_path, rng):
    states = [bn_state(CHANNELS, rng, shift=0.3 * r) for r in range(3)]
    paths = save_ranks(tmp_path, states)
    eps = 1e-3
    report = compare_ranks(paths, CompareOptions(eps=eps, warn_kl=1e-9, error_kl=1e9))
    rows = {r.name: r for r in report.layers}
    for layer in CHANNELS:
        mean, var, kl, shift, ratio = _reference_layer(*_stats(states, layer), eps)
        row = rows[f"{layer}.bn"]
        np.testing.assert_allclose(row.arrays["pooled_mean"], mean, rtol=1e-12)
        np.testing.assert_allclose(row.arrays["pooled_var"], var, rtol=1e-12)
        assert row.metrics["max_kl"] == pytest.approx(kl.max(), rel=1e-10)
        assert row.metrics["max_shift"] == pytest.approx(shift.max(), rel=1e-10)
        assert row.metrics["max_var_ratio"] == pytest.approx(ratio.max(), rel=1e-10)
        per_rank_mean = kl.mean(axis=1)  # the gated metric: each rank's mean over channels, worst rank
        assert row.metrics["mean_kl"] == pytest.approx(per_rank_mean.max(), rel=1e-10)
        np.testing.assert_allclose(row.arrays["per_rank_mean_kl"], per_rank_mean, rtol=1e-10)
        _, channel = np.unravel_index(np.argmax(kl), kl.shape)
        assert (row.worst_rank, row.worst_channel) == (int(np.argmax(per_rank_mean)), channel)
        assert row.severity is Severity.WARN


def test_identical_ranks_pass_and_divergent_rank_fails(tmp_path, rng):
    base = bn_state(CHANNELS, rng)
    (tmp_path / "same").mkdir()
    same = save_ranks(tmp_path / "same", [base, base])
    report = compare_ranks(same)
    assert report.verdict(FailOn.ERROR) == "pass"
    assert all(r.metrics["max_kl"] == 0 for r in report.layers)
    bad = {k: v.clone() for k, v in base.items()}
    bad["layer1.bn.running_mean"] += 5.0
    (tmp_path / "bad").mkdir()
    paths = save_ranks(tmp_path / "bad", [base, base, bad])
    report = compare_ranks(paths)
    assert report.verdict(FailOn.ERROR) == "fail"
    assert report.layers[0].name == "layer1.bn" and report.layers[0].worst_rank == 2
    first = report.findings[0]
    assert first.kind is FindingKind.DIVERGENCE and first.layer == "layer1.bn" and first.rank == 2
    assert "average" in (report.next_step or "")


def test_ignore_leaves_layers_out(tmp_path, rng):
    paths = save_ranks(tmp_path, [bn_state(CHANNELS, rng, shift=3 * r) for r in range(2)])
    report = compare_ranks(paths, CompareOptions(ignore=("layer*",)))
    assert [r.name for r in report.layers] == ["stem.bn"]


def test_different_models_are_an_input_error(tmp_path, rng):
    a = bn_state(CHANNELS, rng)
    b = bn_state({**CHANNELS, "layer2": 7}, rng)
    paths = save_ranks(tmp_path, [a, b])
    with pytest.raises(ModelMismatchError, match=r"layer2\.conv\.weight. has shape \[7, 1, 1, 1\]"):
        compare_ranks(paths)
    c = bn_state({"stem": 4}, rng)
    paths = save_ranks(tmp_path, [a, c], name="other")
    with pytest.raises(ModelMismatchError, match="missing"):
        compare_ranks(paths)


def test_dtype_difference_is_reported(tmp_path, rng):
    a = bn_state(CHANNELS, rng)
    b = {k: (v.half() if k == "stem.bn.running_var" else v) for k, v in a.items()}
    paths = save_ranks(tmp_path, [a, b])
    with pytest.raises(ModelMismatchError, match="dtype float16"):
        compare_ranks(paths)


def test_weights_differ_and_check_weights(tmp_path, rng):
    a = bn_state(CHANNELS, rng)
    b = {k: v.clone() for k, v in a.items()}
    b["stem.bn.weight"][0] += 1
    b["layer1.conv.weight"][0] += 1
    paths = save_ranks(tmp_path, [a, b])
    report = compare_ranks(paths)
    differ = [f for f in report.findings if f.kind is FindingKind.WEIGHTS_DIFFER]
    assert [f.tensor for f in differ] == ["stem.bn.weight"]
    report = compare_ranks(paths, CompareOptions(check_weights=True))
    differ = {f.tensor for f in report.findings if f.kind is FindingKind.WEIGHTS_DIFFER}
    assert differ == {"stem.bn.weight", "layer1.conv.weight"}
    assert report.verdict(FailOn.ERROR) == "fail"


def test_counter_mismatch_is_a_warning(tmp_path, rng):
    a = bn_state(CHANNELS, rng)
    b = {k: v.clone() for k, v in a.items()}
    b["stem.bn.num_batches_tracked"] = torch.tensor(50)
    report = compare_ranks(save_ranks(tmp_path, [a, b]))
    (f,) = [f for f in report.findings if f.kind is FindingKind.COUNTER_MISMATCH]
    assert f.severity is Severity.WARN and "rank 1: 50" in f.message
    assert report.verdict(FailOn.ERROR) == "pass" and report.verdict(FailOn.WARN) == "fail"


def test_prefixed_keys_match_across_ranks(tmp_path, rng):
    a = bn_state(CHANNELS, rng)
    b = {f"module.{k}": v for k, v in a.items()}
    report = compare_ranks(save_ranks(tmp_path, [a, b]))
    assert report.verdict(FailOn.WARN) == "pass" and len(report.layers) == 3


def test_every_state_dict_is_compared_and_key_selects(tmp_path, rng):
    paths = []
    for r in range(2):
        path = tmp_path / f"t_rank{r}.pt"
        torch.save(
            {"state_dict": bn_state(CHANNELS, rng), "state_dict_ema": bn_state(CHANNELS, rng), "epoch": 1},
            path,
        )
        paths.append(path)
    report = compare_ranks(paths)
    assert {r.state_dict for r in report.layers} == {"state_dict", "state_dict_ema"}
    report = compare_ranks(paths, CompareOptions(key="state_dict_ema"))
    assert {r.state_dict for r in report.layers} == {"state_dict_ema"}
    with pytest.raises(InputError, match="nope"):
        compare_ranks(paths, CompareOptions(key="nope"))


def test_no_batchnorm(tmp_path):
    paths = save_ranks(tmp_path, [{"fc.weight": torch.ones(2, 2)}] * 2)
    with pytest.raises(NoBatchNormError):
        compare_ranks(paths)
    report = compare_ranks(paths, CompareOptions(allow_empty=True))
    assert report.verdict(FailOn.WARN) == "pass"


def test_threshold_order_is_checked(tmp_path, rng):
    paths = save_ranks(tmp_path, [bn_state(CHANNELS, rng)] * 2)
    with pytest.raises(UsageError):
        compare_ranks(paths, CompareOptions(warn_kl=1.0, error_kl=0.5))


def test_nan_rank_is_nonfinite_error(tmp_path, rng):
    a = bn_state(CHANNELS, rng)
    b = {k: v.clone() for k, v in a.items()}
    b["layer2.bn.running_var"][3] = float("nan")
    report = compare_ranks(save_ranks(tmp_path, [a, b]))
    kinds = {f.kind for f in report.findings if f.severity is Severity.ERROR}
    assert {FindingKind.NONFINITE, FindingKind.DIVERGENCE} <= kinds


def test_layer_detail(tmp_path, rng):
    states = [bn_state(CHANNELS, rng, shift=r) for r in range(2)]
    report = compare_ranks(save_ranks(tmp_path, states), CompareOptions(layer="layer2.bn"))
    assert len(report.channel_rows) == 6 and {"pooled_mean", "max_kl"} <= set(report.channel_rows[0])
    with pytest.raises(InputError, match="no BatchNorm layer named"):
        compare_ranks(save_ranks(tmp_path, states), CompareOptions(layer="missing"))


@pytest.mark.parametrize("jobs", [1, 3])
@pytest.mark.parametrize("budget", [0, 1 << 30])
def test_jobs_and_rereading_give_identical_reports(tmp_path, rng, monkeypatch, jobs, budget):
    """Prefetching threads and the re-read second pass (no cache) must not change any number."""
    states = [bn_state(CHANNELS, rng, shift=0.2 * r) for r in range(7)]
    paths = save_ranks(tmp_path, states)
    expected = compare_ranks(paths)
    monkeypatch.setattr("bnaudit.audit.scan.CACHE_BUDGET_BYTES", budget)
    got = compare_ranks(paths, CompareOptions(jobs=jobs))
    assert [r.to_dict() for r in got.layers] == [r.to_dict() for r in expected.layers]
    assert [f.to_dict() for f in got.findings] == [f.to_dict() for f in expected.findings]
    assert [i.rank for i in got.inputs] == list(range(7))
