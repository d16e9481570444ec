"""Candidate gate metrics, computed here in float64 from the stored statistics (independently of bnaudit).

Every metric starts from the per-channel KL divergence between two diagonal Gaussians and differs in how it
summarises a layer's channels: the worst channel (bnaudit's rule before the study), the mean over channels
(the KL of the whole layer's diagonal Gaussian divided by its width), or the sum (the layer's KL).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

EPS = 1e-5
SUMMARIES = ("max_channel", "mean_channel", "layer_sum")
DRIFT_SUMMARIES = (*SUMMARIES, "excess_mean", "noise_ratio")


def kl(mean_p: np.ndarray, var_p: np.ndarray, mean_q: np.ndarray, var_q: np.ndarray) -> np.ndarray:
    """Per channel KL(N(mean_p, var_p + eps) || N(mean_q, var_q + eps)) in nats."""
    vp, vq = var_p + EPS, var_q + EPS
    return 0.5 * (np.log(vq / vp) + (vp + (mean_p - mean_q) ** 2) / vq - 1.0)


def summarise(per_channel: np.ndarray) -> dict[str, float]:
    return {
        "max_channel": float(per_channel.max()),
        "mean_channel": float(per_channel.mean()),
        "layer_sum": float(per_channel.sum()),
    }


def pooled(means: Sequence[np.ndarray], variances: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The equal-weight mixture's mean and variance (law of total variance)."""
    m = np.mean(means, axis=0)
    second = np.mean([v + mu**2 for mu, v in zip(means, variances, strict=True)], axis=0)
    return m, second - m**2


def per_layer_rank_divergence(
    layers: dict[str, tuple[list[np.ndarray], list[np.ndarray]]],
) -> list[dict[str, float]]:
    """Per layer (model order), each summary's worst value over ranks."""
    rows = []
    for name, (means, variances) in layers.items():
        pm, pv = pooled(means, variances)
        values = [summarise(kl(pm, pv, mu, var)) for mu, var in zip(means, variances, strict=True)]
        rows.append({"layer": name, **{s: max(v[s] for v in values) for s in SUMMARIES}})  # type: ignore[dict-item]
    return rows


def data_divergence(
    layers: dict[
        str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray] | None]
    ],
) -> list[dict[str, float]]:
    """Per layer, each summary of KL(N(data) || N(stored)), and ``excess_mean``: the mean over channels less
    the KL the data sample's own noise adds (from the sampling variances of its mean and variance, by batch
    means), at least 0; ``noise_ratio``: the mean over channels in units of that noise. Each layer is
    (data mean, var, stored mean, var, noise or None)."""
    rows = []
    for name, (dm, dv, sm, sv, noise) in layers.items():
        per_channel = kl(dm, dv, sm, sv)
        floor = noise[0] / (2 * (dv + EPS)) + noise[1] / (4 * (dv + EPS) ** 2) if noise else 0.0 * dm
        noise = float(np.mean(floor))
        rows.append(
            {
                "layer": name,
                **summarise(per_channel),
                "excess_mean": max(0.0, float(np.mean(per_channel - floor))),
                "noise_mean": noise,
                "noise_ratio": float(np.mean(per_channel)) / noise if noise > 0 else 0.0,
            }
        )
    return rows  # type: ignore[return-value]


def score(
    profile: Sequence[dict[str, float]], kinds: dict[str, str], summary: str, flat_factor: float
) -> tuple[float, str]:
    """A checkpoint's value under a rule: the worst layer's summary, a flat layer's divided by
    ``flat_factor``.

    A BatchNorm1d layer over N x C inputs averages one value per sample and channel, a spatial one H x W
    values per sample: the same number of samples leaves the flat layer's statistics far noisier.
    """
    best, where = 0.0, ""
    for row in profile:
        value = row[summary] / (flat_factor if kinds[str(row["layer"])] == "flat" else 1.0)
        if value > best:
            best, where = value, str(row["layer"])
    return best, where
