"""The two ways per-rank variances are merged (``--method``), light to import."""

from __future__ import annotations

from enum import Enum


class MergeMethod(str, Enum):
    """How per-rank variances are combined.

    ``pooled``: the law of total variance, var = sum w_r (v_r + (m_r - mean)^2) / W — the variance of the
    union of the ranks' data when each rank's statistics describe its own shard.
    ``mean``: the weighted arithmetic mean of the variances, sum w_r v_r / W — what an all-reduce average of
    ``running_var`` inside a training loop computes; it misses the spread between the rank means.
    """

    POOLED = "pooled"
    MEAN = "mean"
