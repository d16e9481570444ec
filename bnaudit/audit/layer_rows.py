"""Pieces the audits' layer rows share: finite extremes of a channel vector, and the layer-name hint."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from bnaudit.errors import InputError
from bnaudit.report.model import LayerRow


def finite_max(values: np.ndarray) -> float | None:
    """The largest finite value, or None when there is none."""
    finite = values[np.isfinite(values)]
    return float(finite.max()) if finite.size else None


def finite_min(values: np.ndarray) -> float | None:
    """The smallest finite value, or None when there is none."""
    finite = values[np.isfinite(values)]
    return float(finite.min()) if finite.size else None


def no_layer_named(layer: str, path: str, rows: Sequence[LayerRow]) -> InputError:
    """The error for a ``--layer`` that names no BatchNorm layer, listing the first layers there are."""
    names = [r.name for r in rows][:8]
    more = "" if len(rows) <= 8 else f", ... ({len(rows)} in all)"
    hint = "layers are: " + ", ".join(names) + more if names else "the file has no BatchNorm layers"
    return InputError(f"no BatchNorm layer named '{layer}'", path=path, where="--layer", fix=hint)
