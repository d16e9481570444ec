"""Provenance of repaired checkpoints: the ``OUT.bnaudit.json`` sidecar and the short safetensors header "
"entry."""

from __future__ import annotations

import datetime
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bnaudit import __version__

SIDECAR_SUFFIX = ".bnaudit.json"
HEADER_KEY = "bnaudit"  # the safetensors __metadata__ entry written into repaired files
PROVENANCE_VERSION = 1

# Metadata keys of the per-rank statistics files written by ``bnaudit.save_rank_stats``.
RANK_KEY = "bnaudit.rank"
WORLD_SIZE_KEY = "bnaudit.world_size"
SAMPLES_KEY = "bnaudit.samples"
KIND_KEY = "bnaudit.kind"
RANK_STATS_KIND = "rank-bn-stats"


def sidecar_path(out: Path) -> Path:
    """The provenance file written next to ``out`` (``fixed.pt`` -> ``fixed.pt.bnaudit.json``)."""
    return out.with_name(out.name + SIDECAR_SUFFIX)


def _clean(value: Any) -> Any:
    # JSON has no NaN or Infinity: write null (the report says what was wrong).
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def sidecar_text(record: Mapping[str, Any]) -> str:
    """The sidecar document: ``record`` plus the tool, its version and the time, as indented JSON."""
    doc = {
        "provenance_version": PROVENANCE_VERSION,
        "tool": {"name": "bnaudit", "version": __version__},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **record,
    }
    return json.dumps(_clean(doc), indent=2) + "\n"


def header_entry(command: str, method: str, ranks: int, reference_sha256: str | None) -> dict[str, str]:
    """The short ``bnaudit`` entry added to a repaired safetensors file's ``__metadata__`` (strings only)."""
    summary: dict[str, Any] = {
        "tool_version": __version__,
        "command": command,
        "method": method,
        "ranks": ranks,
    }
    if reference_sha256:
        summary["reference_sha256"] = reference_sha256
    return {HEADER_KEY: json.dumps(summary, separators=(",", ":"))}


def rank_stats_metadata(rank: int, world_size: int, samples: float | None) -> dict[str, str]:
    """Metadata of one per-rank statistics file (what ``average`` reads its weights from)."""
    meta = {
        KIND_KEY: RANK_STATS_KIND,
        RANK_KEY: str(rank),
        WORLD_SIZE_KEY: str(world_size),
        "bnaudit.version": __version__,
        "format": "pt",
    }
    if samples is not None:
        meta[SAMPLES_KEY] = repr(float(samples)) if not float(samples).is_integer() else str(int(samples))
    return meta


def samples_from_metadata(metadata: Mapping[str, str]) -> float | None:
    """The sample count recorded by ``save_rank_stats``, or None when the file records none.

    Raises:
        ValueError: the entry is present but not a positive finite number.
    """
    raw = metadata.get(SAMPLES_KEY)
    if raw is None:
        return None
    value = float(raw)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{SAMPLES_KEY} is {raw!r}, expected a positive number")
    return value


def input_records(
    paths: Sequence[str], ranks: Sequence[int], weights: Sequence[float], hashes: Sequence[str]
) -> list[dict[str, Any]]:
    """One sidecar entry per rank: path, rank, weight and the sha256 of the statistics bytes read from it."""
    return [
        {"path": p, "rank": r, "weight": w, "stats_sha256": h}
        for p, r, w, h in zip(paths, ranks, weights, hashes, strict=True)
    ]
