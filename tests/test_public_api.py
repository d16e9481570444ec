"""The public names of ``bnaudit`` all resolve, lazily: ``import bnaudit`` alone loads none of them."""

from __future__ import annotations

import subprocess
import sys

import bnaudit
from tests.conftest import FIXTURES, REPO


def test_every_public_name_resolves() -> None:
    missing = [name for name in bnaudit.__all__ if getattr(bnaudit, name, None) is None]
    assert missing == []


def test_import_bnaudit_loads_nothing_heavy() -> None:
    probe = (
        "import sys, bnaudit; print(sorted(m for m in sys.modules if m.startswith(('bnaudit.', 'numpy'))))"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_one_pattern_string_is_one_argument(tmp_path):
    """compare_ranks / average_checkpoints take a quoted pattern as one string, not its characters."""
    pattern = str(FIXTURES / "ddp_nosync_sorted" / "ckpt_rank*.pt")
    report = bnaudit.compare_ranks(pattern)
    assert [i.rank for i in report.inputs] == [0, 1, 2, 3]
    result = bnaudit.average_checkpoints(pattern, None, bnaudit.AverageOptions(dry_run=True))
    assert len(result.weights) == 4 and result.output is None
