"""The recalibration methods by name (``--method``), light to import; their estimators live in
:mod:`bnaudit.live.estimators`."""

from __future__ import annotations

from enum import Enum

from bnaudit.errors import UsageError


class RecalibrationMethod(str, Enum):
    """How the statistics written are made from the pass (``--method``).

    Each maps to an estimator in :data:`bnaudit.live.estimators.ESTIMATORS`.
    """

    POPULATION = "population"
    BATCH_MEAN = "batch-mean"

    @classmethod
    def parse(cls, value: RecalibrationMethod | str) -> RecalibrationMethod:
        """The method named ``value``.

        Raises:
            UsageError: ``value`` names no method (the message lists the choices).
        """
        return cls(_checked(value, choices(), "--method"))


def choices() -> tuple[str, ...]:
    """Every method's name, the default first (for ``--method`` and error messages)."""
    return tuple(method.value for method in RecalibrationMethod)


class RecalibrationMode(str, Enum):
    """Which forward the statistics are measured in (``--mode``).

    ``population``: one train-mode forward, every BatchNorm normalising by its batch's statistics (what
    ``update_bn`` does). ``sequential``: each layer measured on the inputs eval mode feeds it, every earlier
    layer normalising with its new statistics (:mod:`bnaudit.live.sequential`).
    """

    POPULATION = "population"
    SEQUENTIAL = "sequential"


def parse_mode(value: RecalibrationMode | str) -> RecalibrationMode:
    """The mode named ``value``; UsageError listing the modes when there is none."""
    return RecalibrationMode(_checked(value, tuple(mode.value for mode in RecalibrationMode), "--mode"))


def _checked(value: Enum | str, names: tuple[str, ...], option: str) -> str:
    """``value``'s name when it is one of ``names``; else UsageError listing them."""
    name = value.value if isinstance(value, Enum) else value
    if name not in names:
        raise UsageError(f"must be one of {', '.join(names)}", where=option, found=repr(str(value)))
    return str(name)
