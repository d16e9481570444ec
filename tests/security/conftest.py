"""The corpus is generated once per session, and each case's execution under torch.load proved once."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from tests.security.corpus import Built, build_corpus
from tests.security.sandbox import Verdict, victim_loads


@dataclass(frozen=True)
class Proven:
    built: Built
    verdict: Verdict


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Proven]:
    folder = tmp_path_factory.mktemp("redteam")
    built = build_corpus(folder)
    jobs = [
        {"name": name, "path": str(b.path), "load": b.case.load, "marker": str(b.marker)}
        for name, b in built.items()
    ]
    verdicts = victim_loads(jobs)
    for b in built.values():
        b.marker.unlink(missing_ok=True)  # the CLI runs must start without any marker
    return {name: Proven(b, verdicts[name]) for name, b in built.items()}
