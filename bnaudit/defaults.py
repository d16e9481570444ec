"""Default thresholds and choices, kept free of heavy imports so the command line starts fast."""

from __future__ import annotations

# BatchNorm's default eps; eps is not stored in state dicts.
DEFAULT_EPS = 1e-5

# compare: KL(N(pooled) || N(rank)) in nats, calibrated on the committed DDP fixtures (README "Thresholds").
DEFAULT_WARN_KL = 0.02
DEFAULT_ERROR_KL = 0.1

# drift: KL(N(data) || N(stored)) in nats, calibrated on the same fixtures. The noise floor matters here:
# with n values per channel the estimate alone gives KL ~ 1/n.
DEFAULT_DRIFT_WARN_KL = 0.025
DEFAULT_DRIFT_ERROR_KL = 0.05

MERGE_METHODS = ("pooled", "mean")
CONVERSION_FORMATS = ("pt", "safetensors")
