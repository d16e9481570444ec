"""The options of the audits (inspect, compare, drift): frozen dataclasses, light to import (no NumPy)."""

from __future__ import annotations

from dataclasses import dataclass

from bnaudit.bn.deploy_dtype import DeployDtype
from bnaudit.defaults import (
    DEFAULT_DRIFT_ERROR_KL,
    DEFAULT_DRIFT_NOISE_RATIO,
    DEFAULT_DRIFT_WARN_KL,
    DEFAULT_EPS,
    DEFAULT_ERROR_KL,
    DEFAULT_FLAT_FACTOR,
    DEFAULT_WARN_KL,
)
from bnaudit.errors import UsageError


@dataclass(frozen=True)
class InspectOptions:
    """What ``inspect`` audits and shows.

    Attributes:
        key: restrict to one state dict (``/``-separated path), e.g. ``state_dict_ema``.
        eps: BatchNorm's eps (not stored in state dicts), used by the tiny-variance check.
        ignore: glob patterns of layer names to leave out.
        layer: a layer name whose per-channel statistics are returned in ``Report.channel_rows``.
        security: list every global the file's pickles reference in ``Report.globals``.
        deploy_dtype: the dtype the model is deployed in: statistics, ``var + eps`` and the folded scale
            and shift that do not survive the cast are errors. None: fp16 is checked, as warnings.
    """

    key: str | None = None
    eps: float = DEFAULT_EPS
    ignore: tuple[str, ...] = ()
    layer: str | None = None
    security: bool = False
    deploy_dtype: DeployDtype | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "ignore", tuple(self.ignore))
        dtype = self.deploy_dtype  # the command line gives the value as a string
        object.__setattr__(self, "deploy_dtype", None if dtype is None else DeployDtype(dtype))


@dataclass(frozen=True)
class DiffOptions:
    """What ``diff`` reads and which layers must not change.

    Attributes:
        key: the state dict in both files (default: the first one with BatchNorm layers in each).
        eps: BatchNorm's eps, added to every variance before the KL, shift and variance ratio.
        ignore: glob patterns of layer names to leave out.
        frozen: glob patterns of layers meant to be frozen: any change of their statistics, counter or
            affine parameters is a ``frozen-changed`` error.
    """

    key: str | None = None
    eps: float = DEFAULT_EPS
    ignore: tuple[str, ...] = ()
    frozen: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("ignore", "frozen"):
            object.__setattr__(self, name, tuple(getattr(self, name)))


@dataclass(frozen=True)
class CompareOptions:
    """What ``compare`` reads and how it judges it.

    Attributes:
        key: restrict to one state dict.
        eps: BatchNorm's eps, added to every variance before the divergence metrics.
        warn_kl, error_kl: levels on a layer's mean KL(N(pooled) || N(rank)) in nats (mean over its channels,
            worst rank), for layers over feature maps; chosen by the calibration study (README "Thresholds").
        ignore: glob patterns of layer names to leave out.
        flat_factor: the levels of layers over one value per sample and channel (BatchNorm1d after a Linear)
            are this many times higher: their statistics average far fewer values, so independent ranks on
            the same data disagree that much more.
        check_weights: also compare every non-BatchNorm tensor across ranks.
        allow_empty: a model without BatchNorm layers passes instead of being an input error.
        jobs: read up to this many rank files ahead in threads (for high-latency storage).
        layer: a layer name whose per-channel detail goes to ``Report.channel_rows``.
    """

    key: str | None = None
    eps: float = DEFAULT_EPS
    warn_kl: float = DEFAULT_WARN_KL
    error_kl: float = DEFAULT_ERROR_KL
    ignore: tuple[str, ...] = ()
    flat_factor: float = DEFAULT_FLAT_FACTOR
    check_weights: bool = False
    allow_empty: bool = False
    jobs: int = 1
    layer: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "ignore", tuple(self.ignore))


@dataclass(frozen=True)
class DriftThresholds:
    """The gate of ``drift``, per layer, on the mean over channels of KL(N(data) || N(stored)) in nats.

    Attributes:
        warn_kl: a layer whose KL is real (see ``noise_ratio``) and exceeds the data's own noise by this
            much is a warning.
        error_kl: ... by this much is an error (not below ``warn_kl``).
        noise_ratio: a KL is real when it is at least this many times the KL the data sample's own noise
            gives (estimated from the spread between its batches; unknown, so not required, with one batch).
        ignore: glob patterns of layers left out of the report.

    Raises:
        UsageError: a threshold that is not positive, or ``warn_kl`` above ``error_kl``.
    """

    warn_kl: float = DEFAULT_DRIFT_WARN_KL
    error_kl: float = DEFAULT_DRIFT_ERROR_KL
    ignore: tuple[str, ...] = ()
    noise_ratio: float = DEFAULT_DRIFT_NOISE_RATIO

    def __post_init__(self) -> None:
        if not 0 < self.warn_kl <= self.error_kl:
            raise UsageError(
                "must be positive and not above --error-kl",
                where="--warn-kl",
                found=f"--warn-kl {self.warn_kl}, --error-kl {self.error_kl}",
            )
        if not self.noise_ratio >= 1:
            raise UsageError("must be at least 1", where="--noise-ratio", found=str(self.noise_ratio))
