"""The red-team corpus: generators that write malicious checkpoints (one module per attack class) and
benign ones written by real libraries. ``build_corpus`` writes them all into a folder."""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

from tests.security.corpus import (
    benign,
    callables,
    containers,
    opcodes,
    resolution,
    torch_callables,
    ziptricks,
)
from tests.security.corpus.registry import CASES, Case

__all__ = ["CASES", "Built", "Case", "build_corpus", "classes"]
_MODULES = (callables, torch_callables, resolution, containers, opcodes, ziptricks, benign)


@dataclass(frozen=True)
class Built:
    case: Case
    path: Path
    marker: Path


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def available(case: Case) -> bool:
    return all(importlib.util.find_spec(module) is not None for module in case.requires)


def build_corpus(folder: Path, names: list[str] | None = None) -> dict[str, Built]:
    """Write every case (or those ``names``) into its own subfolder of ``folder``; markers go in
    ``folder/markers`` (a payload creates its marker, nothing else)."""
    markers = folder / "markers"
    markers.mkdir(parents=True, exist_ok=True)
    built: dict[str, Built] = {}
    for name, case in CASES.items():
        if (names is not None and name not in names) or not available(case):
            continue
        where = folder / "cases" / _slug(name)
        where.mkdir(parents=True, exist_ok=True)
        marker = markers / _slug(name)
        built[name] = Built(case, case.build(where, str(marker)), marker)
    return built


def classes() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, case in CASES.items():
        out.setdefault(case.attack_class, []).append(name)
    return out


assert _MODULES
