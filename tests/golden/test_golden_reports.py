"""Every command's report on every fixture, in every format, is identical to the committed golden text.

Numbers are compared to 10 significant digits: the last bits of a float64 sum depend on the SIMD kernels
NumPy picks for the machine's CPU, and the golden text must hold on every CI machine. Reports of commands
that run a model (drift, recalibrate) are compared to 6 digits and without the written file's SHA-256:
torch's float32 convolutions round differently with AVX2, AVX-512 and AMX kernels (about 1e-8 relative).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from tests.golden.cases import CASES, GOLDEN, run_case

HAS_TORCH = importlib.util.find_spec("torch") is not None
_SHA256 = re.compile(r'"sha256": "[0-9a-f]{64}"')


def stable(text: str, digits: int = 10) -> str:
    """``text`` with every float written with ``digits`` decimals or more rounded to ``digits`` digits."""
    long_float = re.compile(rf"-?\d+\.\d{{{digits},}}(?:[eE][-+]?\d+)?")
    return long_float.sub(lambda m: f"{float(m.group()):.{digits - 1}e}", text)


def test_stable_rounds_only_the_last_bits():
    assert stable('{"kl": 3.2026096586642135e-05}') == stable('{"kl": 3.202609658664213e-05}')
    assert stable('{"kl": 3.2026096586642135e-05}') != stable('{"kl": 3.20260970001e-05}')
    assert stable("0.06176474204077206", 6) == stable("0.06176474370466855", 6)
    assert stable("exit 1, 12 layers, 0.5") == "exit 1, 12 layers, 0.5"


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_report_matches_golden(case, tmp_path: Path) -> None:
    if case.needs_torch and not HAS_TORCH:
        pytest.skip("needs torch")
    expected, got = (GOLDEN / f"{case.name}.txt").read_text(), run_case(case, tmp_path)
    if case.needs_torch:
        expected, got = (_SHA256.sub('"sha256": "..."', stable(t, 6)) for t in (expected, got))
    assert stable(got) == stable(expected)
