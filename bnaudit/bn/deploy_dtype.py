"""The dtypes ``inspect`` checks a deployment in (``--deploy-dtype``); light to import (no NumPy)."""

from __future__ import annotations

from enum import Enum


class DeployDtype(str, Enum):
    """A floating dtype a model is cast to for deployment."""

    FP16 = "fp16"
    BF16 = "bf16"
    FP32 = "fp32"
