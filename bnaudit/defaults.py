"""Default thresholds and choices, kept free of heavy imports so the command line starts fast."""

from __future__ import annotations

# BatchNorm's default eps; eps is not stored in state dicts.
DEFAULT_EPS = 1e-5

# compare: a layer's mean over channels of KL(N(pooled) || N(rank)) in nats, worst rank; the levels of
# layers over feature maps, times DEFAULT_FLAT_FACTOR for layers over one value per sample and channel.
# Chosen by the calibration study on its tuning half (benchmarks/results/gate_calibration/rule.json,
# README "Thresholds"); tests/test_gate_calibration.py keeps these equal to the study's rule.
DEFAULT_WARN_KL = 0.0015
DEFAULT_ERROR_KL = 0.0021
DEFAULT_FLAT_FACTOR = 4.0

# drift: a layer's mean over channels of KL(N(data) || N(stored)) is judged against the KL the data
# sample's own noise gives (estimated from the spread between its batches). A layer fails when the KL is
# real (at least DEFAULT_DRIFT_NOISE_RATIO times that noise) and large (at least DEFAULT_DRIFT_ERROR_KL
# nats above it); it warns when real and above DEFAULT_DRIFT_WARN_KL. Chosen by the same study.
DEFAULT_DRIFT_NOISE_RATIO = 3.1
DEFAULT_DRIFT_WARN_KL = 0.00055
DEFAULT_DRIFT_ERROR_KL = 0.0011

MERGE_METHODS = ("pooled", "mean")
CONVERSION_FORMATS = ("pt", "safetensors")
