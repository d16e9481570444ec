"""Merges and divergence metrics against independent float64 computations written here."""

from __future__ import annotations

import numpy as np
import pytest

from bnaudit.bn.stats import (
    ChannelStats,
    DivergenceAccumulator,
    MergeMethod,
    RankMerger,
    kl_normal,
)

rng = np.random.default_rng(0)


def _merged(means, variances, weights, method):
    """The streaming merge of the ranks, one rank at a time (what the rank scan does)."""
    merger = RankMerger(len(means[0]))
    for i, (m, v) in enumerate(zip(means, variances, strict=True)):
        merger.add(m, v, 1.0 if weights is None else weights[i])
    return merger.result(method)


def _reference_pooled(means, variances, weights):
    w = np.asarray(weights, dtype=np.float64)[:, None]
    m = np.asarray(means, dtype=np.float64)
    v = np.asarray(variances, dtype=np.float64)
    mean = (w * m).sum(0) / w.sum()
    var = (w * (v + (m - mean) ** 2)).sum(0) / w.sum()
    return mean, var


@pytest.mark.parametrize("weights", [None, [3.0, 3.0, 3.0, 2.0], [1.0, 100.0, 0.5, 7.0]])
def test_pooled_merge_matches_law_of_total_variance(weights):
    means = [rng.normal(size=5) * (r + 1) for r in range(4)]
    variances = [rng.uniform(0.1, 3.0, size=5) for _ in range(4)]
    mean, var = _merged(means, variances, weights, MergeMethod.POOLED)
    ref_mean, ref_var = _reference_pooled(means, variances, weights or [1.0] * 4)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(var, ref_var, rtol=1e-13)


@pytest.mark.parametrize("weights", [None, [5.0, 1.0, 2.0]])
def test_mean_merge_is_weighted_mean_of_variances(weights):
    means = [rng.normal(size=3) for _ in range(3)]
    variances = [rng.uniform(0.1, 3.0, size=3) for _ in range(3)]
    w = np.asarray(weights or [1.0, 1.0, 1.0])
    _, var = _merged(means, variances, weights, MergeMethod.MEAN)
    expected = sum(wi * vi for wi, vi in zip(w, variances, strict=True)) / w.sum()
    np.testing.assert_allclose(var, expected, rtol=1e-13)


def test_chan_merge_equals_statistics_of_concatenated_samples():
    chunks = [rng.normal(loc=i, scale=i + 1, size=(n, 4)) for i, n in enumerate([7, 1, 30, 2])]
    acc = ChannelStats.empty(4)
    for chunk in chunks:
        acc = acc.merge(ChannelStats.from_moments(len(chunk), chunk.mean(0), chunk.var(0)))
    everything = np.concatenate(chunks)
    np.testing.assert_allclose(acc.mean, everything.mean(0), rtol=1e-12)
    np.testing.assert_allclose(acc.var_biased, everything.var(0), rtol=1e-12)
    np.testing.assert_allclose(acc.var_unbiased, everything.var(0, ddof=1), rtol=1e-12)
    assert acc.count == len(everything)


def test_rank_weight_must_be_positive():
    with pytest.raises(ValueError):
        RankMerger(2).add(np.zeros(2), np.ones(2), 0.0)


def test_kl_normal_closed_form():
    mp, vp, mq, vq = 0.3, 2.0, -1.0, 0.5
    expected = np.log(np.sqrt(vq) / np.sqrt(vp)) + (vp + (mp - mq) ** 2) / (2 * vq) - 0.5
    got = kl_normal(np.array([mp]), np.array([vp]), np.array([mq]), np.array([vq]))
    np.testing.assert_allclose(got, [expected], rtol=1e-12)
    assert kl_normal(np.array([1.0]), np.array([2.0]), np.array([1.0]), np.array([2.0]))[0] == 0


def test_divergence_tracks_worst_rank_per_channel():
    eps = 1e-5
    pooled_mean, pooled_var = np.array([0.0, 0.0]), np.array([1.0, 1.0])
    acc = DivergenceAccumulator(pooled_mean, pooled_var, eps)
    acc.add(0, np.array([0.1, 2.0]), np.array([1.0, 1.0]))
    acc.add(1, np.array([1.5, 0.0]), np.array([4.0, 1.0]))
    res = acc.result
    assert list(res.kl_rank) == [1, 0]
    s = 1.0 + eps
    expected_shift = 2.0 / np.sqrt(s)
    assert res.shift[1] == pytest.approx(expected_shift)
    assert res.var_ratio[0] == pytest.approx((4.0 + eps) / s)
    kl_rank1_ch0 = 0.5 * (s / (4 + eps) - 1 - np.log(s / (4 + eps)) + 1.5**2 / (4 + eps))
    assert res.kl[0] == pytest.approx(kl_rank1_ch0)


def test_nonfinite_rank_ranks_worst():
    acc = DivergenceAccumulator(np.zeros(1), np.ones(1), 1e-5)
    acc.add(0, np.zeros(1), np.ones(1))
    acc.add(1, np.array([np.nan]), np.ones(1))
    assert np.isinf(acc.result.kl[0]) and acc.result.kl_rank[0] == 1


def test_divergence_of_concatenated_layers_matches_each_layer_alone():
    # Three layers (one without channels) in one accumulator: per layer, every result equals a float64
    # computation written here, rank by rank.
    eps = 1e-5
    rng = np.random.default_rng(7)
    sizes = [3, 0, 5]
    starts = [0, 3, 3]
    pooled_mean, pooled_var = rng.normal(size=8), rng.uniform(0.5, 2.0, size=8)
    ranks = [(rng.normal(size=8), rng.uniform(0.5, 2.0, size=8)) for _ in range(3)]
    acc = DivergenceAccumulator(pooled_mean, pooled_var, eps, layer_starts=starts)
    for index, (m, v) in enumerate(ranks):
        acc.add(index, m, v)
    for layer, (start, size) in enumerate(zip(starts, sizes, strict=True)):
        part = slice(start, start + size)
        res = acc.layer(layer)
        p_var = pooled_var[part] + eps
        kls, shifts = [], []
        for m, v in ranks:
            q_var = v[part] + eps
            kls.append(
                np.log(np.sqrt(q_var) / np.sqrt(p_var))
                + (p_var + (pooled_mean[part] - m[part]) ** 2) / (2 * q_var)
                - 0.5
            )
            shifts.append(np.abs(m[part] - pooled_mean[part]) / np.sqrt(p_var))
        np.testing.assert_allclose(res.kl, np.max(kls, axis=0), rtol=1e-12)
        assert list(res.kl_rank) == list(np.argmax(kls, axis=0))
        np.testing.assert_allclose(res.shift, np.max(shifts, axis=0), rtol=1e-12)
        expected_rank_kl = [float(k.max()) if size else 0.0 for k in kls]
        np.testing.assert_allclose(res.per_rank_max_kl, expected_rank_kl, rtol=1e-12)
        expected_rank_shift = [float(s.max()) if size else 0.0 for s in shifts]
        np.testing.assert_allclose(res.per_rank_max_shift, expected_rank_shift, rtol=1e-12)
    with pytest.raises(ValueError, match="3 layers"):
        _ = acc.result
