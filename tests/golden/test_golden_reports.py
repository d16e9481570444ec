"""Every command's report on every fixture, in every format, is byte-identical to the committed golden text."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.golden.cases import CASES, GOLDEN, run_case

HAS_TORCH = importlib.util.find_spec("torch") is not None


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_report_matches_golden(case, tmp_path: Path) -> None:
    if case.needs_torch and not HAS_TORCH:
        pytest.skip("needs torch")
    expected = (GOLDEN / f"{case.name}.txt").read_text()
    assert run_case(case, tmp_path) == expected
