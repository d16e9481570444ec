"""The study's data: real datasets shipped inside packages, fixed splits, per-rank shards and domains.

``digits`` is scikit-learn's copy of the UCI handwritten digits (1,797 8x8 images); ``fair`` is statsmodels'
copy of Fair's affairs survey (6,366 women, 8 features; the label is whether ``affairs`` > 0), a tabular set
large enough for accuracies to resolve one point (1,166 held-out rows).

Every function is deterministic: the same arguments give the same samples in the same order, on every rank
and in the driver, so the trainer, ``bnaudit recalibrate`` / ``drift`` (through the ``batches`` spec) and the
accuracy evaluation all see the same data.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
import torch

SPLIT_SEED = 20261201
# Sizes of (train, calib, drift, heldout).
SPLIT_SIZES = {"digits": (1100, 200, 200, 297), "fair": (4000, 600, 600, 1166)}
SPLITS = ("train", "calib", "drift", "heldout")
# Per-node input domains ("sensors"): (contrast, brightness) applied as x * contrast + brightness.
DOMAINS = (
    (1.0, 0.0),
    (0.6, 0.25),
    (1.5, -0.1),
    (0.8, 0.4),
    (1.3, 0.15),
    (0.7, -0.2),
    (1.2, 0.3),
    (0.9, -0.3),
)


@dataclass(frozen=True)
class Split:
    """One split: inputs (float32, N x ...) and labels (int64)."""

    x: torch.Tensor
    y: torch.Tensor


@cache
def _dataset(name: str) -> tuple[np.ndarray, np.ndarray]:
    if name in ("digits", "digits_flat"):
        from sklearn.datasets import load_digits

        bunch = load_digits()
        return bunch.images.astype(np.float32) / 16.0, bunch.target.astype(np.int64)
    if name == "fair":
        from statsmodels.datasets import fair

        frame = fair.load_pandas().data
        features = frame.drop(columns="affairs").to_numpy(dtype=np.float64)
        return features, (frame["affairs"].to_numpy() > 0).astype(np.int64)
    raise ValueError(f"unknown dataset {name!r}; expected digits, digits_flat or fair")


@cache
def split(dataset: str, name: str) -> Split:
    """One of the four disjoint splits of ``dataset``, inputs shaped for the dataset's models.

    ``digits``: N x 1 x 8 x 8 in [0, 1]; ``digits_flat``: the same images as 64 features; ``fair``: 8
    features standardised with the training split's mean and standard deviation.
    """
    x, y = _dataset(dataset)
    sizes = SPLIT_SIZES["fair" if dataset == "fair" else "digits"]
    order = np.random.default_rng(SPLIT_SEED).permutation(len(y))
    bounds = np.cumsum((0, *sizes))
    parts = {s: np.sort(order[bounds[i] : bounds[i + 1]]) for i, s in enumerate(SPLITS)}
    idx = parts[name]
    if dataset == "fair":
        train = x[parts["train"]]
        features = (x[idx] - train.mean(axis=0)) / train.std(axis=0)
        inputs = torch.from_numpy(features.astype(np.float32))
    elif dataset == "digits_flat":
        inputs = torch.from_numpy(x[idx].reshape(len(idx), 64))
    else:
        inputs = torch.from_numpy(x[idx]).unsqueeze(1)
    return Split(inputs, torch.from_numpy(y[idx]))


def apply_domain(x: torch.Tensor, domain: int) -> torch.Tensor:
    """The input as node ``domain``'s sensor records it (domain 0 is the identity)."""
    contrast, brightness = DOMAINS[domain % len(DOMAINS)]
    return x * contrast + brightness


def domains_for(shift: str, world_size: int) -> list[int]:
    """The domain of each rank: ``all`` gives every node its own, ``one`` only the last node, else none."""
    if shift == "all":
        return list(range(world_size))
    if shift == "one":
        return [0] * (world_size - 1) + [1]
    return [0] * world_size


def mixed(dataset: str, name: str, shift: str, world_size: int) -> Split:
    """A split as deployment sees it: sample i recorded by the domain of node i mod world_size."""
    s = split(dataset, name)
    domains = domains_for(shift, world_size)
    if not any(domains):
        return s
    x = s.x.clone()
    for i in range(len(x)):
        x[i] = apply_domain(x[i], domains[i % world_size])
    return Split(x, s.y)


def shard_indices(labels: np.ndarray, shards: str, world_size: int, seed: int) -> list[np.ndarray]:
    """The training rows of each rank.

    ``iid`` / ``domain_*``: a seeded shuffle cut in equal parts; ``sorted``: contiguous blocks of the
    label-sorted set; ``dirichlet0.1`` / ``dirichlet1.0``: each class spread over ranks with Dirichlet(alpha)
    proportions; ``uneven``: a shuffle cut in parts of relative sizes 1, 2, ..., world_size.
    """
    rng = np.random.default_rng(seed)
    n = len(labels)
    if shards == "sorted":
        return list(np.array_split(np.argsort(labels, kind="stable"), world_size))
    if shards.startswith("dirichlet"):
        return _dirichlet(labels, float(shards.removeprefix("dirichlet")), world_size, rng)
    order = rng.permutation(n)
    if shards == "uneven":
        weights = np.arange(1, world_size + 1, dtype=np.float64)
        cuts = np.round(np.cumsum(weights / weights.sum())[:-1] * n).astype(int)
        return list(np.split(order, cuts))
    return list(np.array_split(order, world_size))


def _dirichlet(
    labels: np.ndarray, alpha: float, world_size: int, rng: np.random.Generator
) -> list[np.ndarray]:
    # Redraw until every rank holds at least 30% of a fair share, so every rank can fill its batches.
    floor = int(0.3 * len(labels) / world_size)
    for _ in range(1000):
        parts: list[list[int]] = [[] for _ in range(world_size)]
        for c in np.unique(labels):
            rows = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet([alpha] * world_size))[:-1] * len(rows)).astype(int)
            for r, chunk in enumerate(np.split(rows, cuts)):
                parts[r].extend(chunk.tolist())
        if min(len(p) for p in parts) >= floor:
            return [np.sort(np.array(p, dtype=np.int64)) for p in parts]
    raise RuntimeError(f"no Dirichlet({alpha}) split over {world_size} ranks leaves every rank {floor} rows")


def batches(
    dataset: str, split_name: str, shift: str = "none", world_size: int = 1, batch_size: int = 50
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The ``--data`` spec of the study: a split (mixed over the run's domains) in fixed batches."""
    s = mixed(dataset, split_name, shift, world_size)
    return [(s.x[i : i + batch_size], s.y[i : i + batch_size]) for i in range(0, len(s.y), batch_size)]
